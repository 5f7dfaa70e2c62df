//! The node's gRPC services (Admin, Inference on the API port; Peer, Artifacts on the peer
//! port) and the error-to-status table.

pub mod admin;
pub mod artifacts;
pub mod generate;
pub mod heartbeat;
pub mod inference;
pub mod metrics_http;
pub mod openai;
pub mod peer;
pub mod push;
pub mod rbac;
pub mod status;
