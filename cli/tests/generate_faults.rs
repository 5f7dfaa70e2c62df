//! A decoder's step loop under an injected panic (feature `failpoints` of troupe-actors): the
//! streams it held fail with UNAVAILABLE, the loop is restarted from the node's restart
//! budget, and the next request is served. Its own test binary, since failpoints are
//! process-wide.

mod common;

use common::*;
use tonic::Code;
use troupe_actors::failpoints;
use troupe_proto::v1::GenerateRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_loop_fails_its_streams_and_is_restarted() {
    let Some(dir) = smollm2() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let node = serving_node(&tmp, &dir, "smollm2-135m", |_| {}).await;
    let client = inference_client(&node).await;
    let request = || GenerateRequest {
        model: "smollm2-135m".into(),
        prompt: "The capital of France is".into(),
        max_tokens: 8,
        ..GenerateRequest::default()
    };
    let greedy = |stream: Vec<troupe_proto::v1::GenerateChunk>| -> Vec<u32> {
        stream.into_iter().flat_map(|c| c.token_ids).collect()
    };
    let collect = |mut client: InferenceClient| async move {
        let mut stream = client.generate(request()).await?.into_inner();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.message().await? {
            chunks.push(chunk);
        }
        Ok::<_, tonic::Status>(chunks)
    };
    let before = greedy(collect(client.clone()).await.unwrap());
    assert_eq!(before.len(), 8);
    for round in 0..3 {
        failpoints::panic_next_batches(1);
        let status = collect(client.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "round {round}: {status:?}"
        );
        assert!(
            status.message().contains("restarted"),
            "{}",
            status.message()
        );
        // The restarted loop serves the next request, with the same greedy tokens.
        let after = greedy(collect(client.clone()).await.unwrap());
        assert_eq!(after, before, "round {round}");
    }
    let scheduler = &node.tree.batchers()[0];
    assert_eq!(scheduler.shared().counters().worker_restarts, 3);
    node.shutdown().await.unwrap();
}
