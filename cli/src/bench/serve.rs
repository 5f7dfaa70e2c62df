//! `troupe bench serve`: closed-loop Embed load over gRPC against a running node, one
//! sentence per request, at each concurrency: throughput, p50/p95/p99 and the node's mean
//! batch size. Then, in the same run and with the node idle, the raw engine on the same
//! sentence at the batch size the node reached, for the serving efficiency, and at batch 1
//! for the latency the batcher adds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use troupe_models::bench::sentence_with_tokens;
use troupe_models::{CpuBackend, Embedder, SentenceTokenizer};
use troupe_proto::v1::inference_client::InferenceClient;
use troupe_proto::v1::{ActorTreeRequest, EmbedRequest};

use crate::error::CliError;
use crate::remote::{admin, block_on, channel};
use crate::{init_threads, ModelSource};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// API address of the node to load.
    #[arg(long)]
    pub addr: String,
    /// Registered model name to embed with (its active version).
    #[arg(long)]
    pub model: String,
    /// Local copy of the same model, for the sentence and the raw engine figures (default:
    /// the fetched model of the same name, in $TROUPE_HOME).
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
    /// Concurrent clients, each a closed loop on its own connection.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 64])]
    pub concurrency: Vec<usize>,
    /// Measured seconds per concurrency.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Unmeasured seconds before each measured window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Tokens per sentence ([CLS]/[SEP] included).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Repeat the whole sequence (every concurrency, then the raw engine) this many times and
    /// report medians: on a shared machine one round can land in a noisy minute.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Skip the raw engine runs (no efficiency figure).
    #[arg(long)]
    pub no_engine: bool,
    /// Compute threads of the raw engine run (0: one per core, as a node's default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON document to this file.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServePoint {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Texts per batch on the node during the window.
    pub mean_batch: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnginePoint {
    pub batch: usize,
    pub sentences_per_sec: f64,
    /// Per forward pass (tokenise, forward, pool, normalise).
    pub p50_ms: f64,
    pub p95_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ServeReport {
    pub addr: String,
    pub model: String,
    pub tokens: usize,
    pub seconds: f64,
    pub points: Vec<ServePoint>,
    pub engine_batch1: Option<EnginePoint>,
    /// The raw engine at the node's mean batch size at saturation.
    pub engine_at_saturation: Option<EnginePoint>,
    /// Best throughput ÷ raw engine throughput at the same batch size.
    pub serving_efficiency: Option<f64>,
    /// Throughput at 16 clients ÷ at 1 client.
    pub batching_gain: Option<f64>,
    /// p95 at 16 clients ÷ p95 at 1 client.
    pub p95_ratio_16_to_1: Option<f64>,
    /// p95 at 1 client ÷ the raw engine's batch-1 p95: what the serving path adds.
    pub p95_ratio_1_client_to_engine_batch1: Option<f64>,
}

/// Nearest-rank percentile of sorted samples (NaN when there are none), as the peers'
/// scripts compute it.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

/// (batches, rows) of the model's batchers on the node.
async fn batch_totals(addr: &str, model: &str) -> Result<(u64, u64), CliError> {
    let tree = admin(addr)
        .await?
        .actor_tree(ActorTreeRequest {})
        .await?
        .into_inner();
    Ok(tree
        .batchers
        .iter()
        .filter(|b| b.model == model)
        .fold((0, 0), |(b, r), e| (b + e.batches, r + e.rows)))
}

async fn load_point(
    args: &ServeArgs,
    sentence: &str,
    concurrency: usize,
) -> Result<ServePoint, CliError> {
    let timeout = Duration::from_secs(30);
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let channel = channel(&args.addr, timeout).await?;
        clients.push(InferenceClient::new(channel).max_decoding_message_size(usize::MAX));
    }
    let warmup = Duration::from_secs_f64(args.warmup);
    let window = Duration::from_secs_f64(args.seconds);
    let start = Instant::now() + warmup;
    let end = start + window;
    let mut before = None;
    let counter = {
        let (addr, model) = (args.addr.clone(), args.model.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            batch_totals(&addr, &model).await
        })
    };
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let request = EmbedRequest {
                model: args.model.clone(),
                version: String::new(),
                texts: vec![sentence.to_owned()],
                task: String::new(),
                request_id: String::new(),
                routing_key: String::new(),
            };
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0usize;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let ok = client.embed(request.clone()).await.is_ok();
                    if sent >= start {
                        if ok {
                            latencies.push(sent.elapsed().as_secs_f64());
                        } else {
                            errors += 1;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut l, e) = task.await.map_err(|e| CliError::Runtime(e.to_string()))?;
        latencies.append(&mut l);
        errors += e;
    }
    if let Ok(Ok(totals)) = counter.await {
        before = Some(totals);
    }
    let after = batch_totals(&args.addr, &args.model).await?;
    let mean_batch = match before {
        Some((batches, rows)) if after.0 > batches => {
            (after.1 - rows) as f64 / (after.0 - batches) as f64
        }
        _ => f64::NAN,
    };
    latencies.sort_by(f64::total_cmp);
    Ok(ServePoint {
        concurrency,
        requests: latencies.len(),
        errors,
        throughput: latencies.len() as f64 / window.as_secs_f64(),
        p50_ms: percentile(&latencies, 50.0) * 1e3,
        p95_ms: percentile(&latencies, 95.0) * 1e3,
        p99_ms: percentile(&latencies, 99.0) * 1e3,
        mean_batch,
    })
}

/// The raw engine on `batch` copies of the sentence for at least `min_time`.
fn engine_point(
    embedder: &Embedder<CpuBackend>,
    sentence: &str,
    batch: usize,
    min_time: Duration,
) -> Result<EnginePoint, CliError> {
    let texts = vec![sentence.to_owned(); batch];
    embedder.embed(&texts, batch)?;
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < min_time || samples.len() < 20 {
        let began = Instant::now();
        embedder.embed(&texts, batch)?;
        samples.push(began.elapsed().as_secs_f64());
    }
    let seconds = start.elapsed().as_secs_f64();
    let reps = samples.len();
    samples.sort_by(f64::total_cmp);
    Ok(EnginePoint {
        batch,
        sentences_per_sec: (reps * batch) as f64 / seconds,
        p50_ms: percentile(&samples, 50.0) * 1e3,
        p95_ms: percentile(&samples, 95.0) * 1e3,
    })
}

fn point(points: &[ServePoint], concurrency: usize) -> Option<&ServePoint> {
    points.iter().find(|p| p.concurrency == concurrency)
}

fn render(report: &ServeReport, rounds: usize) -> String {
    let mut out = format!(
        "troupe bench serve: {} at {}, {}-token sentences, {} s per point{}\n\n",
        report.model,
        report.addr,
        report.tokens,
        report.seconds,
        if rounds > 1 {
            format!(", medians of {rounds} rounds (each ratio taken within its round)")
        } else {
            String::new()
        }
    );
    out.push_str("| clients | req/s | p50 ms | p95 ms | p99 ms | mean batch | errors |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for p in &report.points {
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {} |\n",
            p.concurrency, p.throughput, p.p50_ms, p.p95_ms, p.p99_ms, p.mean_batch, p.errors
        ));
    }
    for (label, engine) in [
        ("raw engine, batch 1", &report.engine_batch1),
        (
            "raw engine at the saturation batch size",
            &report.engine_at_saturation,
        ),
    ] {
        if let Some(e) = engine {
            out.push_str(&format!(
                "\n{label} ({}): {:.1} sentences/s, p50 {:.2} ms, p95 {:.2} ms per pass",
                e.batch, e.sentences_per_sec, e.p50_ms, e.p95_ms
            ));
        }
    }
    out.push('\n');
    let ratio = |name: &str, value: Option<f64>, goal: &str| match value {
        Some(v) => format!("\n{name}: {v:.2} ({goal})"),
        None => format!("\n{name}: not measured ({goal})"),
    };
    out.push_str(&ratio(
        "serving efficiency",
        report.serving_efficiency,
        "goal >= 0.9",
    ));
    out.push_str(&ratio(
        "batching gain c16/c1",
        report.batching_gain,
        "goal >= 3",
    ));
    out.push_str(&ratio(
        "p95 at 1 client / raw batch-1 p95",
        report.p95_ratio_1_client_to_engine_batch1,
        "goal <= 1.2",
    ));
    out.push_str(&ratio("p95 c16/c1", report.p95_ratio_16_to_1, "reported"));
    out.push('\n');
    out
}

pub fn run(args: ServeArgs) -> Result<(), CliError> {
    if !(args.seconds.is_finite()
        && args.seconds > 0.0
        && args.warmup.is_finite()
        && args.warmup >= 0.0)
    {
        return Err(CliError::Usage(
            "--seconds must be positive and --warmup not negative".into(),
        ));
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        return Err(CliError::Usage(
            "--concurrency needs positive client counts, e.g. 1,4,16,64".into(),
        ));
    }
    init_threads(args.threads)?;
    let dir = ModelSource {
        model_dir: args.model_dir.clone(),
        model: args.model_dir.is_none().then(|| args.model.clone()),
    }
    .resolve()?;
    let tokenizer = SentenceTokenizer::from_file(
        &dir.join("tokenizer.json"),
        troupe_models::BertConfig::from_model_dir(&dir)?.max_seq_length,
    )?;
    let sentence = sentence_with_tokens(&tokenizer, args.tokens)?;
    let embedder = if args.no_engine {
        None
    } else {
        Some(Embedder::<CpuBackend>::load(
            &dir,
            &troupe_models::cpu_device(),
        )?)
    };
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds.max(1) {
        if !args.json && args.rounds > 1 {
            eprintln!("round {}/{}", round + 1, args.rounds);
        }
        rounds.push(one_round(&args, &sentence, embedder.as_ref())?);
    }
    let report = if rounds.len() == 1 {
        rounds.remove(0)
    } else {
        median_report(&rounds)
    };
    let report = ServeRounds { report, rounds };
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, &json).map_err(CliError::Output)?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", render(&report.report, report.rounds.len()));
    }
    Ok(())
}

/// Every round, and the medians the table shows.
#[derive(Debug, Serialize)]
pub struct ServeRounds {
    #[serde(flatten)]
    pub report: ServeReport,
    pub rounds: Vec<ServeReport>,
}

fn one_round(
    args: &ServeArgs,
    sentence: &str,
    embedder: Option<&Embedder<CpuBackend>>,
) -> Result<ServeReport, CliError> {
    let points = block_on(async {
        let mut points = Vec::new();
        for &concurrency in &args.concurrency {
            let point = load_point(args, sentence, concurrency).await?;
            if !args.json {
                eprintln!(
                    "clients={:3} req/s={:8.1} p50={:7.2} ms p95={:7.2} ms mean batch={:5.1} errors={}",
                    point.concurrency, point.throughput, point.p50_ms, point.p95_ms, point.mean_batch, point.errors
                );
            }
            points.push(point);
        }
        Ok(points)
    })?;
    let saturation = points
        .iter()
        .max_by(|a, b| a.throughput.total_cmp(&b.throughput))
        .cloned();
    let (engine_batch1, engine_at_saturation) = match embedder {
        None => (None, None),
        Some(embedder) => {
            let min_time = Duration::from_secs_f64(args.seconds.min(5.0));
            let batch1 = engine_point(embedder, sentence, 1, min_time)?;
            let at = match &saturation {
                Some(s) if s.mean_batch.is_finite() => {
                    let batch = (s.mean_batch.round() as usize).max(1);
                    Some(engine_point(embedder, sentence, batch, min_time)?)
                }
                _ => None,
            };
            (Some(batch1), at)
        }
    };
    let c1 = point(&points, 1);
    let c16 = point(&points, 16);
    Ok(ServeReport {
        addr: args.addr.clone(),
        model: args.model.clone(),
        tokens: args.tokens,
        seconds: args.seconds,
        serving_efficiency: saturation
            .as_ref()
            .zip(engine_at_saturation.as_ref())
            .map(|(s, e)| s.throughput / e.sentences_per_sec),
        batching_gain: c1.zip(c16).map(|(a, b)| b.throughput / a.throughput),
        p95_ratio_16_to_1: c1.zip(c16).map(|(a, b)| b.p95_ms / a.p95_ms),
        p95_ratio_1_client_to_engine_batch1: c1
            .zip(engine_batch1.as_ref())
            .map(|(a, e)| a.p95_ms / e.p95_ms),
        points,
        engine_batch1,
        engine_at_saturation,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Per-point medians over rounds; each ratio is the median of the rounds' ratios (each
/// taken within one round, so both sides of it saw the same machine).
fn median_report(rounds: &[ServeReport]) -> ServeReport {
    let first = &rounds[0];
    let points = first
        .points
        .iter()
        .map(|p| {
            let same: Vec<&ServePoint> = rounds
                .iter()
                .filter_map(|r| point(&r.points, p.concurrency))
                .collect();
            let m = |f: fn(&ServePoint) -> f64| median(same.iter().map(|p| f(p)).collect());
            ServePoint {
                concurrency: p.concurrency,
                requests: same.iter().map(|p| p.requests).sum(),
                errors: same.iter().map(|p| p.errors).sum(),
                throughput: m(|p| p.throughput),
                p50_ms: m(|p| p.p50_ms),
                p95_ms: m(|p| p.p95_ms),
                p99_ms: m(|p| p.p99_ms),
                mean_batch: m(|p| p.mean_batch),
            }
        })
        .collect();
    let engine = |pick: fn(&ServeReport) -> &Option<EnginePoint>| {
        let all: Vec<&EnginePoint> = rounds.iter().filter_map(|r| pick(r).as_ref()).collect();
        // Rounds may saturate at different batch sizes: summarise the most common one.
        let batch = all
            .iter()
            .map(|e| e.batch)
            .max_by_key(|b| all.iter().filter(|e| e.batch == *b).count())?;
        let all: Vec<&EnginePoint> = all.into_iter().filter(|e| e.batch == batch).collect();
        Some(EnginePoint {
            batch,
            sentences_per_sec: median(all.iter().map(|e| e.sentences_per_sec).collect()),
            p50_ms: median(all.iter().map(|e| e.p50_ms).collect()),
            p95_ms: median(all.iter().map(|e| e.p95_ms).collect()),
        })
    };
    let ratio = |pick: fn(&ServeReport) -> Option<f64>| {
        let all: Vec<f64> = rounds.iter().filter_map(pick).collect();
        (!all.is_empty()).then(|| median(all))
    };
    ServeReport {
        addr: first.addr.clone(),
        model: first.model.clone(),
        tokens: first.tokens,
        seconds: first.seconds,
        points,
        engine_batch1: engine(|r| &r.engine_batch1),
        engine_at_saturation: engine(|r| &r.engine_at_saturation),
        serving_efficiency: ratio(|r| r.serving_efficiency),
        batching_gain: ratio(|r| r.batching_gain),
        p95_ratio_16_to_1: ratio(|r| r.p95_ratio_16_to_1),
        p95_ratio_1_client_to_engine_batch1: ratio(|r| r.p95_ratio_1_client_to_engine_batch1),
    }
}
