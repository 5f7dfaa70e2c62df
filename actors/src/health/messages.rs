//! What Health is sent, and what it publishes.

/// The node's health as Health last computed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeHealth {
    /// SERVING on grpc.health.v1 when true.
    pub serving: bool,
    /// Why the node is not serving, empty when it is.
    pub reasons: Vec<String>,
}

#[derive(Debug)]
pub enum HealthMsg {
    /// Re-evaluate now.
    Check,
}
