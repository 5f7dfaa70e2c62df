//! What an inference worker is sent.

use std::time::Instant;

#[derive(Debug)]
pub enum WorkerMsg {
    /// The worker's thread died at `at`: the actor fails so its supervisor restarts it.
    ThreadDied { at: Instant, reason: String },
}

/// The error a worker fails with when its thread died; carries when, so the supervisor can
/// measure how long the restart took.
#[derive(Debug, Clone, thiserror::Error)]
#[error("inference thread died: {reason}")]
pub struct WorkerCrashed {
    pub at: Instant,
    pub reason: String,
}
