//! The metrics port: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (200 while the node is SERVING, 503 with the reasons otherwise), for Prometheus
//! and for orchestrators' probes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use troupe_actors::TreeView;
use troupe_consensus::Metadata;

use crate::metrics::NodeMetrics;

#[derive(Clone)]
pub struct MetricsState {
    pub node_id: u64,
    pub metrics: Arc<NodeMetrics>,
    pub tree: TreeView,
    pub metadata: Arc<Metadata>,
    pub transport: Arc<troupe_transport::PeerTransport>,
    pub verifier: Option<Arc<troupe_transport::Verifier>>,
}

pub fn router(state: MetricsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<MetricsState>) -> impl IntoResponse {
    let text = state.metrics.render(
        state.node_id,
        &state.tree,
        &state.metadata,
        &state.transport,
        state.verifier.as_deref(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<MetricsState>) -> impl IntoResponse {
    let health = state.tree.health.borrow().clone();
    if health.serving {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        let mut body = String::from("not ready:\n");
        for reason in &health.reasons {
            body.push_str("- ");
            body.push_str(reason);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}
