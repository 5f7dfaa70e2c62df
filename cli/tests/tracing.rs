//! Trace context across nodes: a request that node 1's router forwards to node 2 carries its
//! W3C `traceparent`, so the request's spans on both nodes share one trace id: the client's,
//! when it sent one, or the one node 1 started.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;

/// Log lines captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `(node_id, trace_id, message)` of every captured event inside an Embed or Forward span.
fn events(captured: &Captured) -> Vec<(u64, String, String)> {
    let bytes = captured.0.lock().unwrap().clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|event| {
            let span = &event["span"];
            let node = span["node_id"].as_u64()?;
            let trace = span["trace_id"].as_str()?.to_owned();
            let message = event["fields"]["message"].as_str()?.to_owned();
            Some((node, trace, message))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_requests_spans_on_both_nodes_share_its_trace_id() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("troupe=debug")
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let nodes = start_cluster_with(&dir, 2, |_, config| {
        config.cluster.heartbeat_interval_ms = 50;
        // Node 1 gives every request to node 2.
        config.routing.strategy = "weighted".into();
        config.routing.weights = [("1".to_owned(), 0), ("2".to_owned(), 1)].into();
    })
    .await;
    serve_everywhere(&nodes, &model, "tiny", "1").await;

    // With the client's trace context: both nodes use its trace id.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(embed_request("tiny", &["traced"], ""));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let reply = inference_client(&nodes[0])
        .await
        .embed(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.served_by, 2);
    // Without one: node 1 starts a trace, and node 2 continues it.
    let reply = inference_client(&nodes[0])
        .await
        .embed(embed_request("tiny", &["untraced"], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.served_by, 2);

    let seen = events(&captured);
    let on = |node: u64, message: &str| -> Vec<String> {
        seen.iter()
            .filter(|(n, _, m)| *n == node && m == message)
            .map(|(_, t, _)| t.clone())
            .collect()
    };
    let forwarded = on(1, "served by a peer");
    let served = on(2, "embedded");
    assert_eq!(forwarded.len(), 2, "{seen:?}");
    assert_eq!(forwarded, served, "{seen:?}");
    assert_eq!(forwarded[0], trace);
    assert_eq!(forwarded[1].len(), 32);
    assert_ne!(forwarded[1], trace);
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}
