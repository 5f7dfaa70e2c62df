//! Generation through `Inference/Generate` with the real SmolLM2-135M-Instruct: a 3-node
//! cluster reproduces the reference's greedy continuations one at a time and eight at once;
//! on one node with a tiny KV cache, seeded sampling repeats, a full cache queues, a higher
//! priority preempts, and a dropped stream frees its blocks (seen in /metrics).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use troupe_proto::v1::{ChatMessage, GenerateChunk, GenerateRequest};

const MODEL: &str = "smollm2-135m";

/// SmolLM2's end-of-sequence token, `<|im_end|>`.
const EOS: u32 = 2;

#[derive(serde::Deserialize, Clone)]
struct Golden {
    prompt: String,
    chat: bool,
    prompt_ids: Vec<u32>,
    token_ids: Vec<u32>,
}

fn golden() -> Vec<Golden> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/data/smollm2/generate.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn request(prompt: &str, chat: bool, max_tokens: u32) -> GenerateRequest {
    let (prompt, messages) = if chat {
        (
            String::new(),
            vec![ChatMessage {
                role: "user".into(),
                content: prompt.to_owned(),
            }],
        )
    } else {
        (prompt.to_owned(), Vec::new())
    };
    GenerateRequest {
        model: MODEL.into(),
        prompt,
        messages,
        max_tokens,
        ..GenerateRequest::default()
    }
}

/// A finished stream: the chunks, with when each arrived.
struct Streamed {
    chunks: Vec<(Instant, GenerateChunk)>,
}

impl Streamed {
    fn token_ids(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .flat_map(|(_, c)| c.token_ids.iter().copied())
            .collect()
    }

    fn prompt_ids(&self) -> &[u32] {
        &self.chunks[0].1.prompt_ids
    }

    fn last(&self) -> &GenerateChunk {
        &self.chunks.last().unwrap().1
    }

    fn text(&self) -> String {
        self.chunks.iter().map(|(_, c)| c.text.as_str()).collect()
    }

    fn first_at(&self) -> Instant {
        self.chunks[0].0
    }

    fn done_at(&self) -> Instant {
        self.chunks.last().unwrap().0
    }
}

async fn generate(client: &mut InferenceClient, request: GenerateRequest) -> Streamed {
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks.push((Instant::now(), chunk));
    }
    let streamed = Streamed { chunks };
    assert!(
        !streamed.last().finish_reason.is_empty(),
        "the stream ended without a finish reason"
    );
    streamed
}

/// Checks a greedy stream against the reference's continuation.
fn assert_matches(case: &Golden, streamed: &Streamed, max_tokens: usize) {
    assert_eq!(streamed.prompt_ids(), case.prompt_ids, "{:?}", case.prompt);
    // The reference's continuation ends with the end-of-sequence token (2) when the model
    // chose it; the stream reports that as finish "eos", not as a token.
    let budget = &case.token_ids[..case.token_ids.len().min(max_tokens)];
    let (want, finish) = match budget.split_last() {
        Some((&EOS, rest)) => (rest, "eos"),
        _ => (budget, "length"),
    };
    assert_eq!(streamed.token_ids(), want, "{:?}", case.prompt);
    assert_eq!(streamed.last().finish_reason, finish, "{:?}", case.prompt);
    let usage = streamed.last().usage.unwrap();
    assert_eq!(usage.prompt_tokens as usize, case.prompt_ids.len());
    assert_eq!(usage.completion_tokens as usize, want.len());
}

/// A gauge or counter of the node's decoder, from /metrics.
async fn metric(node: &troupe_node::RunningNode, name: &str) -> f64 {
    let (status, body) = http_get(node.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find(|line| line.starts_with(&format!("{name}{{")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_generate_the_reference_greedily_alone_and_eight_at_once() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster(&dir, 3).await;
    serve_everywhere(&nodes, &model, MODEL, "1").await;
    let cases = golden();
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(inference_client(node).await);
    }
    for case in &cases {
        let streamed = generate(&mut clients[0], request(&case.prompt, case.chat, 32)).await;
        assert_matches(case, &streamed, 32);
    }
    // Eight streams at once through all three nodes: batching must not change a result.
    let mut running = Vec::new();
    for (i, case) in cases.iter().cloned().enumerate() {
        let mut client = clients[i % clients.len()].clone();
        running.push(tokio::spawn(async move {
            let streamed = generate(&mut client, request(&case.prompt, case.chat, 32)).await;
            (case, streamed)
        }));
    }
    let mut served_by = std::collections::BTreeSet::new();
    for task in running {
        let (case, streamed) = task.await.unwrap();
        assert_matches(&case, &streamed, 32);
        served_by.insert(streamed.chunks[0].1.served_by);
    }
    eprintln!("eight concurrent streams served by nodes {served_by:?}");
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_samples_by_seed_queues_preempts_and_frees_blocks() {
    let Some(model) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Two KV blocks of 16 tokens: 32 tokens of context for the whole node.
    let node = serving_node(&dir, &model, MODEL, |config| {
        config.serving.kv_cache_mb = 2;
    })
    .await;
    assert_eq!(metric(&node, "troupe_kv_blocks_free").await, 2.0);
    let mut client = inference_client(&node).await;
    let cases = golden();

    // A seed repeats its sample; another seed gives another.
    let sampled = |seed| GenerateRequest {
        temperature: 0.9,
        top_p: 0.95,
        seed,
        ..request("Once upon a time", false, 12)
    };
    let first = generate(&mut client, sampled(7)).await;
    let again = generate(&mut client, sampled(7)).await;
    let other = generate(&mut client, sampled(8)).await;
    assert_eq!(first.token_ids(), again.token_ids());
    assert_eq!(first.text(), again.text());
    assert_ne!(
        first.token_ids(),
        other.token_ids(),
        "seeds 7 and 8 sampled the same"
    );

    // A takes both blocks (18 prompt tokens + 14): B, sent while A runs, waits for them.
    let long = &cases[3];
    assert_eq!(long.prompt_ids.len(), 18);
    let short = &cases[0];
    let mut a_stream = client
        .generate(request(&long.prompt, false, 14))
        .await
        .unwrap()
        .into_inner();
    let a_first = a_stream.message().await.unwrap().unwrap();
    let mut b_client = client.clone();
    let b_request = request(&short.prompt, false, 10);
    let b = tokio::spawn(async move { generate(&mut b_client, b_request).await });
    let mut a_chunks = vec![(Instant::now(), a_first)];
    while let Some(chunk) = a_stream.message().await.unwrap() {
        a_chunks.push((Instant::now(), chunk));
    }
    let a = Streamed { chunks: a_chunks };
    let b = b.await.unwrap();
    assert_matches(long, &a, 14);
    assert_matches(short, &b, 10);
    assert!(
        b.first_at() > a.done_at(),
        "B started before A gave its blocks back"
    );
    assert_eq!(metric(&node, "troupe_preemptions_total").await, 0.0);

    // A higher priority preempts: A (default task, lower lane) holds both blocks when the
    // urgent request comes; the urgent one finishes first, and A, prefilled again, still
    // produces the reference's tokens.
    let set = troupe(args(&[
        "priorities",
        "set",
        "urgent",
        "10",
        "--addr",
        &node.api_addr.to_string(),
    ]))
    .await;
    assert!(set.status.success(), "{:?}", text(&set));
    wait_for(
        "the node to know task urgent",
        Duration::from_secs(10),
        || async { node.tree.table.knows_task("urgent").then_some(()) },
    )
    .await;
    let mut a_stream = client
        .generate(request(&long.prompt, false, 14))
        .await
        .unwrap()
        .into_inner();
    let a_first = a_stream.message().await.unwrap().unwrap();
    let urgent = GenerateRequest {
        task: "urgent".into(),
        ..request(&short.prompt, false, 10)
    };
    let urgent = generate(&mut client.clone(), urgent).await;
    let mut a_chunks = vec![(Instant::now(), a_first)];
    while let Some(chunk) = a_stream.message().await.unwrap() {
        a_chunks.push((Instant::now(), chunk));
    }
    let a = Streamed { chunks: a_chunks };
    assert_matches(short, &urgent, 10);
    assert_matches(long, &a, 14);
    assert!(urgent.done_at() < a.done_at());
    assert!(metric(&node, "troupe_preemptions_total").await >= 1.0);

    // A dropped stream frees its blocks at once.
    let mut stream = client
        .generate(request(&short.prompt, false, 26))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    assert!(metric(&node, "troupe_kv_blocks_used").await >= 1.0);
    drop(stream);
    wait_for(
        "the cancelled stream's blocks to be freed",
        Duration::from_secs(10),
        || async {
            (metric(&node, "troupe_kv_blocks_used").await == 0.0
                && metric(&node, "troupe_running_sequences").await == 0.0)
                .then_some(())
        },
    )
    .await;

    // What cannot fit the whole cache is refused at once, naming the setting.
    let Err(error) = client.generate(request(&long.prompt, false, 100)).await else {
        panic!("a request larger than the cache was accepted");
    };
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(
        error.message().contains("kv_cache_mb"),
        "{}",
        error.message()
    );
    // And an embedding request to a decoder says what to use instead.
    let error = client
        .embed(embed_request(MODEL, &["x"], ""))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    node.shutdown().await.unwrap();
}
