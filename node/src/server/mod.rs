//! The node's gRPC services and the error-to-status table.

pub mod admin;
pub mod status;
