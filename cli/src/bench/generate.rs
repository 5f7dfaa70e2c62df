//! `troupe bench generate`: the decoder's speed, in llama.cpp's workloads.
//!
//! - `--model-dir DIR`: the engine alone, as `llama-bench` and `llama-batched-bench` measure
//!   llama.cpp: prefill tokens/s at 128 and 512 prompt tokens; decode tokens/s of one stream
//!   (128 tokens); and aggregate decode tokens/s of 1, 4 and 16 streams stepped together.
//! - `--addr API --model NAME`: closed-loop generation streams against a node's
//!   `Inference/Generate`, at several concurrencies: aggregate tokens/s, time to first token
//!   and inter-token latency (p50, p99).
//! - `--openai URL --model NAME`: the same load against an OpenAI-compatible server's
//!   streaming `/v1/completions` (llama.cpp's `llama-server`, or troupe's own HTTP port).

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use troupe_models::decoder::{Decoder, SeqStep, BLOCK_TOKENS};
use troupe_proto::v1::GenerateRequest;

use crate::error::CliError;
use crate::init_threads;

#[derive(Debug, Args)]
pub struct GenerateBenchArgs {
    /// The engine alone: a GGUF file or a directory holding one.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["addr", "openai"])]
    pub model_dir: Option<std::path::PathBuf>,
    /// A node's API address: load through Inference/Generate.
    #[arg(
        long,
        value_name = "API",
        requires = "model",
        conflicts_with = "openai"
    )]
    pub addr: Option<String>,
    /// An OpenAI-compatible server, e.g. http://127.0.0.1:8080: load through its streaming
    /// /v1/completions.
    #[arg(long, value_name = "URL", requires = "model")]
    pub openai: Option<String>,
    /// The model name the server knows.
    #[arg(long)]
    pub model: Option<String>,
    /// Prompt lengths for prefill (engine).
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 512])]
    pub prompt_tokens: Vec<usize>,
    /// Concurrent streams (engine: sequences stepped together; server: clients).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    pub streams: Vec<usize>,
    /// Tokens each stream generates.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Repetitions of each engine point (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Server: seconds of load per concurrency.
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Compute threads for the engine (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct EnginePoint {
    test: String,
    tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
struct ServePoint {
    streams: usize,
    requests: usize,
    tokens: usize,
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
    errors: usize,
}

/// Prompts of about 40-60 tokens, different enough that no cache could share them.
const PROMPTS: [&str; 4] = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle. The story should describe the weather, the sea and the keeper's thoughts in detail.",
    "Explain how a refrigerator works to a curious ten-year-old, step by step, with an everyday example for each part of the cycle and why it matters.",
    "Describe a walk through a busy market in a coastal town at dawn: the sounds, the smells, the colours of the stalls and the people setting up.",
    "List the main differences between rivers and canals, covering how they are made, how water moves in them, and what they are used for today.",
];

pub fn run(args: GenerateBenchArgs) -> Result<(), CliError> {
    if let Some(dir) = &args.model_dir {
        init_threads(args.threads)?;
        return engine(&args, dir);
    }
    if args.addr.is_none() && args.openai.is_none() {
        return Err(CliError::Usage(
            "give --model-dir DIR (the engine), --addr API --model NAME (a node), or --openai URL --model NAME".into(),
        ));
    }
    crate::remote::block_on(serve(&args))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

fn engine(args: &GenerateBenchArgs, dir: &std::path::Path) -> Result<(), CliError> {
    let decoder = Decoder::load(dir).map_err(|e| CliError::Usage(e.to_string()))?;
    let model = &decoder.model;
    let vocab = model.config().vocab as u32;
    // Token ids spread over the vocabulary (not special tokens).
    let ids = |n: usize, salt: usize| -> Vec<u32> {
        (0..n)
            .map(|i| 100 + ((i * 7919 + salt * 104_729) as u32 % (vocab - 200)))
            .collect()
    };
    let largest = args
        .prompt_tokens
        .iter()
        .copied()
        .chain([args.tokens + 64])
        .max()
        .unwrap_or(0);
    let streams = args.streams.iter().copied().max().unwrap_or(1);
    let blocks = streams * (largest + 128).div_ceil(BLOCK_TOKENS) + 8;
    let mut pool = model.new_pool(BLOCK_TOKENS, blocks);
    let mut points = Vec::new();
    for &prompt in &args.prompt_tokens {
        let mut rates = Vec::new();
        for rep in 0..args.reps.max(1) {
            let tokens = ids(prompt, rep);
            let table = pool
                .allocate(pool.blocks_for(prompt))
                .ok_or_else(|| CliError::Runtime("the KV pool is too small".into()))?;
            let started = Instant::now();
            // llama-bench's pp test: the whole prompt, in batches of up to 512.
            for chunk in (0..prompt).step_by(512) {
                let end = (chunk + 512).min(prompt);
                model.step(
                    &mut pool,
                    &[SeqStep {
                        tokens: &tokens[chunk..end],
                        start: chunk,
                        blocks: &table,
                        logits: end == prompt,
                    }],
                );
            }
            rates.push(prompt as f64 / started.elapsed().as_secs_f64());
            pool.release(table);
        }
        points.push(EnginePoint {
            test: format!("prefill {prompt}"),
            tokens_per_s: median(rates),
        });
    }
    for &count in &args.streams {
        let mut rates = Vec::new();
        for rep in 0..args.reps.max(1) {
            // Each stream: a 64-token prompt, then `tokens` decode steps, all streams at once.
            let prompts: Vec<Vec<u32>> = (0..count).map(|s| ids(64, rep * 31 + s)).collect();
            let tables: Vec<Vec<u32>> = (0..count)
                .map(|_| pool.allocate(pool.blocks_for(64 + args.tokens)))
                .collect::<Option<_>>()
                .ok_or_else(|| CliError::Runtime("the KV pool is too small".into()))?;
            let steps: Vec<SeqStep> = prompts
                .iter()
                .zip(&tables)
                .map(|(p, t)| SeqStep {
                    tokens: p,
                    start: 0,
                    blocks: t,
                    logits: true,
                })
                .collect();
            model.step(&mut pool, &steps);
            let started = Instant::now();
            for position in 64..64 + args.tokens {
                let next: Vec<[u32; 1]> =
                    (0..count).map(|s| [ids(1, position * 13 + s)[0]]).collect();
                let steps: Vec<SeqStep> = next
                    .iter()
                    .zip(&tables)
                    .map(|(token, t)| SeqStep {
                        tokens: token,
                        start: position,
                        blocks: t,
                        logits: true,
                    })
                    .collect();
                model.step(&mut pool, &steps);
            }
            rates.push((count * args.tokens) as f64 / started.elapsed().as_secs_f64());
            for table in tables {
                pool.release(table);
            }
        }
        points.push(EnginePoint {
            test: format!(
                "decode, {count} stream{}",
                if count == 1 { "" } else { "s" }
            ),
            tokens_per_s: median(rates),
        });
    }
    if args.json {
        return crate::remote::print_json(&serde_json::json!({
            "engine": points,
            "threads": rayon::current_num_threads(),
        }));
    }
    println!("| test | tokens/s |");
    println!("|---|---:|");
    for point in &points {
        println!("| {} | {:.1} |", point.test, point.tokens_per_s);
    }
    Ok(())
}

/// One stream's timings.
#[derive(Default)]
struct StreamTimes {
    ttft: Option<f64>,
    gaps: Vec<f64>,
    tokens: usize,
}

async fn serve(args: &GenerateBenchArgs) -> Result<(), CliError> {
    let model = args.model.clone().unwrap_or_default();
    let mut points = Vec::new();
    for &count in &args.streams {
        let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
        let started = Instant::now();
        let mut clients = Vec::new();
        for client in 0..count {
            let (model, addr, openai, tokens) = (
                model.clone(),
                args.addr.clone(),
                args.openai.clone(),
                args.tokens,
            );
            clients.push(tokio::spawn(async move {
                let mut results = Vec::new();
                let mut errors = 0;
                let mut n = client;
                while Instant::now() < deadline {
                    // A distinct start per request: no server can reuse a cached prefix.
                    let prompt = format!("Request {n}. {}", PROMPTS[n % PROMPTS.len()]);
                    let prompt = prompt.as_str();
                    n += count;
                    let result = match (&addr, &openai) {
                        (Some(addr), _) => grpc_stream(addr, &model, prompt, tokens).await,
                        (_, Some(url)) => openai_stream(url, &model, prompt, tokens).await,
                        _ => unreachable!("checked by run"),
                    };
                    match result {
                        Ok(times) => results.push(times),
                        Err(error) => {
                            errors += 1;
                            tracing::warn!(%error, "a generation failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                (results, errors)
            }));
        }
        let mut streams = Vec::new();
        let mut errors = 0;
        for client in clients {
            let (results, failed) = client.await.map_err(|e| CliError::Runtime(e.to_string()))?;
            streams.extend(results);
            errors += failed;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let tokens: usize = streams.iter().map(|s| s.tokens).sum();
        let mut ttft: Vec<f64> = streams.iter().filter_map(|s| s.ttft).collect();
        ttft.sort_by(f64::total_cmp);
        let mut gaps: Vec<f64> = streams.iter().flat_map(|s| s.gaps.clone()).collect();
        gaps.sort_by(f64::total_cmp);
        points.push(ServePoint {
            streams: count,
            requests: streams.len(),
            tokens,
            tokens_per_s: tokens as f64 / elapsed,
            ttft_p50_ms: percentile(&ttft, 0.5) * 1e3,
            itl_p50_ms: percentile(&gaps, 0.5) * 1e3,
            itl_p99_ms: percentile(&gaps, 0.99) * 1e3,
            errors,
        });
    }
    if args.json {
        return crate::remote::print_json(&serde_json::json!({ "serve": points }));
    }
    println!("| streams | requests | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for p in &points {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            p.streams,
            p.requests,
            p.tokens_per_s,
            p.ttft_p50_ms,
            p.itl_p50_ms,
            p.itl_p99_ms,
            p.errors
        );
    }
    Ok(())
}

async fn grpc_stream(
    addr: &str,
    model: &str,
    prompt: &str,
    tokens: usize,
) -> Result<StreamTimes, CliError> {
    let mut client = crate::remote::inference(addr, Duration::from_secs(300)).await?;
    let started = Instant::now();
    let mut stream = client
        .generate(GenerateRequest {
            model: model.to_owned(),
            prompt: prompt.to_owned(),
            max_tokens: tokens as u32,
            ignore_eos: true,
            ..GenerateRequest::default()
        })
        .await?
        .into_inner();
    let mut times = StreamTimes::default();
    let mut last = None;
    while let Some(chunk) = stream.message().await? {
        if chunk.token_ids.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => times.ttft = Some(now.duration_since(started).as_secs_f64()),
            Some(previous) => times.gaps.push(now.duration_since(previous).as_secs_f64()),
        }
        last = Some(now);
        times.tokens += chunk.token_ids.len();
    }
    Ok(times)
}

/// A streaming `/v1/completions` over plain HTTP/1.1, timed per server-sent event.
async fn openai_stream(
    url: &str,
    model: &str,
    prompt: &str,
    tokens: usize,
) -> Result<StreamTimes, CliError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let body = serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
        // llama-server reuses a slot's cached prompt unless told not to; troupe has no prefix
        // cache, so neither side may have one.
        "cache_prompt": false,
    })
    .to_string();
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(&host)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot connect to {host}: {e}")))?;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket
        .write_all(request.as_bytes())
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    // Events are read line by line; chunked-encoding size lines are not `data:` lines, and
    // the server flushes each event whole, so a line is never split across chunks.
    let mut lines = BufReader::new(socket).lines();
    let mut times = StreamTimes::default();
    let mut last = None;
    let status = lines
        .next_line()
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?
        .unwrap_or_default();
    if !status.contains(" 200") {
        return Err(CliError::Runtime(format!("{host} answered {status}")));
    }
    while let Some(line) = lines
        .next_line()
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?
    {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data.trim() == "[DONE]" {
            break;
        }
        let event: serde_json::Value = serde_json::from_str(data)
            .map_err(|e| CliError::Runtime(format!("a bad event from {host}: {e}")))?;
        let text = event["choices"][0]["text"].as_str().unwrap_or_default();
        if text.is_empty() && event["choices"][0]["finish_reason"].is_string() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => times.ttft = Some(now.duration_since(started).as_secs_f64()),
            Some(previous) => times.gaps.push(now.duration_since(previous).as_secs_f64()),
        }
        last = Some(now);
        times.tokens += 1;
    }
    Ok(times)
}
