//! What the RolloutController is sent.

#[derive(Debug)]
pub enum RolloutMsg {
    /// Look at every rollout in progress now (metadata, readiness or peer state changed, or
    /// the timer fired).
    Check,
    /// A decision proposed earlier went through Raft (or failed): it may be retried.
    Proposed { key: crate::table::ModelKey },
}
