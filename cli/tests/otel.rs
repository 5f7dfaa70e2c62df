//! OTLP span export (the `otel` feature) against a real OTLP/gRPC collector: the test runs a
//! `TraceService` server on 127.0.0.1, and two `troupe node` processes export to it through
//! the standard `OTEL_*` environment. Node 1 forwards every Embed to node 2. The collector
//! receives one trace per request holding both nodes' spans, node 2's span a child of node 1's,
//! and node 1's a child of the client's span when the client sent a `traceparent`. The batch
//! delay is longer than the test, so the spans arrive only through the flush at SIGTERM.
//!
//! Run with `cargo test -p troupe --features otel --test otel` (scripts/test.sh does).

#![cfg(feature = "otel")]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// One exported span, as the collector saw it.
#[derive(Clone, Debug)]
struct Seen {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// An OTLP/gRPC trace collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Seen>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                seen.push(Seen {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the collector on a free 127.0.0.1 port: its endpoint URL.
async fn start_collector(collector: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_one_trace_across_both_nodes_at_the_collector() {
    let collector = Collector::default();
    let endpoint = start_collector(collector.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    // Node 1 gives every request to node 2.
    let config = dir.path().join("troupe.toml");
    std::fs::write(
        &config,
        "[routing]\nstrategy = \"weighted\"\nweights = { 1 = 0, 2 = 1 }\n",
    )
    .unwrap();
    let mut nodes: Vec<NodeProcess> = (1..=2)
        .map(|id| {
            NodeProcess::spawn(id, dir.path(), |command| {
                command
                    .arg("--config")
                    .arg(&config)
                    .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
                    .env("OTEL_SERVICE_NAME", format!("troupe-node{id}"))
                    // Nothing is sent before exit: the spans arrive by the flush at SIGTERM.
                    .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
                    .env("RUST_LOG", "warn");
            })
        })
        .collect();
    init_process_cluster(&nodes).await;
    let first = nodes[0].api.clone();
    push_and_activate(&first, &model, "tiny", "1").await;
    wait_peer_serves(&first, 2, "tiny").await;

    // With the client's trace context, and without one.
    let (client_trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut client =
        troupe_proto::v1::inference_client::InferenceClient::connect(format!("http://{first}"))
            .await
            .unwrap();
    let mut traced = tonic::Request::new(embed_request("tiny", &["traced"], ""));
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{client_trace}-{client_span}-01")
            .parse()
            .unwrap(),
    );
    assert_eq!(
        client.embed(traced).await.unwrap().into_inner().served_by,
        2
    );
    let untraced = embed_request("tiny", &["untraced"], "");
    assert_eq!(
        client.embed(untraced).await.unwrap().into_inner().served_by,
        2
    );
    assert!(
        collector.0.lock().unwrap().is_empty(),
        "spans were sent before the batch delay"
    );

    for node in &mut nodes {
        let status = node.terminate();
        assert!(status.success(), "node {} exited with {status}", node.id);
    }
    // The flush finished before each process exited.
    let seen = collector.0.lock().unwrap().clone();
    let spans = |service: &str, name: &str| -> Vec<Seen> {
        seen.iter()
            .filter(|s| s.service == service && s.name == name)
            .cloned()
            .collect()
    };
    let embeds = spans("troupe-node1", "embed");
    let forwards = spans("troupe-node2", "forward");
    assert_eq!(embeds.len(), 2, "{seen:#?}");
    assert_eq!(forwards.len(), 2, "{seen:#?}");
    for span in embeds.iter().chain(&forwards) {
        assert_eq!(span.kind, SpanKind::Server as i32, "{span:?}");
        assert_eq!(span.trace_id.len(), 32, "{span:?}");
        assert_ne!(span.trace_id, "0".repeat(32), "{span:?}");
    }
    // The client's trace: client span -> node 1's span -> node 2's span.
    let on_node1 = embeds
        .iter()
        .find(|s| s.trace_id == client_trace)
        .unwrap_or_else(|| panic!("node 1 has no span in the client's trace: {seen:#?}"));
    assert_eq!(on_node1.parent_span_id, client_span);
    let on_node2 = forwards
        .iter()
        .find(|s| s.trace_id == client_trace)
        .unwrap_or_else(|| panic!("node 2 has no span in the client's trace: {seen:#?}"));
    assert_eq!(on_node2.parent_span_id, on_node1.span_id);
    // The trace node 1 started: its span is the root, node 2's its child.
    let root = embeds.iter().find(|s| s.trace_id != client_trace).unwrap();
    assert_eq!(root.parent_span_id, "", "{root:?}");
    let child = forwards
        .iter()
        .find(|s| s.trace_id == root.trace_id)
        .unwrap_or_else(|| panic!("node 2 has no span in node 1's trace: {seen:#?}"));
    assert_eq!(child.parent_span_id, root.span_id);
    assert_ne!(child.span_id, root.span_id);
}
