//! The node's gRPC services (Admin, Inference) and the error-to-status table.

pub mod admin;
pub mod artifacts;
pub mod inference;
pub mod push;
pub mod status;
