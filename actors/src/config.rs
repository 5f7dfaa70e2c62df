//! The actor tree's settings. The node fills them from its config file; the defaults are the
//! ones `troupe node` starts with.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct ServingConfig {
    /// Most texts one forward pass takes.
    pub max_batch_size: usize,
    /// Longest a queued request waits for its batch to fill while a worker is free.
    pub max_queue_delay: Duration,
    /// Requests each priority lane holds before it refuses with `RESOURCE_EXHAUSTED`.
    pub queue_capacity: usize,
    /// Priority lanes per batcher; task priorities are ranked onto them.
    pub lanes: usize,
    /// Inference workers (forward-pass threads) per loaded model version.
    pub workers_per_model: usize,
    /// Restart intensity: more than `max_restarts` restarts within `restart_window`
    /// escalates (the node reports NOT_SERVING) instead of restarting again.
    pub max_restarts: usize,
    pub restart_window: Duration,
    /// How often Health re-evaluates the node when nothing else prompts it.
    pub health_interval: Duration,
    /// Longest a batcher takes to drain its queue at shutdown or unload.
    pub drain_timeout: Duration,
    /// A rollout (`models activate`) that has not completed after this long fails, and the
    /// active version stays.
    pub rollout_timeout: Duration,
    /// Scheduling priority of compute threads (Linux nice, 0..=19): above 0 they yield the
    /// CPU to Raft, heartbeats and routing when the machine is saturated.
    pub compute_nice: i32,
    /// Memory for decoders' KV caches, per loaded decoder version, in MiB.
    pub kv_cache_mb: usize,
    /// Most prompt tokens a decoder step takes (chunked prefill): a long prompt is fed in
    /// pieces beside the running streams' decode tokens, so it does not stall them.
    pub prefill_chunk: usize,
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_queue_delay: Duration::from_millis(2),
            queue_capacity: 256,
            lanes: 4,
            workers_per_model: 1,
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            health_interval: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(30),
            rollout_timeout: Duration::from_secs(300),
            compute_nice: 10,
            kv_cache_mb: 512,
            prefill_chunk: 64,
        }
    }
}

/// Health gossip: how often each peer is heartbeaten and when a silent one counts as suspect
/// or down.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipConfig {
    /// Time between two heartbeats to the same peer.
    pub heartbeat_interval: Duration,
    /// Longest a heartbeat (connecting included) may take before it counts as missed.
    pub heartbeat_timeout: Duration,
    /// Missed heartbeats in a row after which a peer is suspect.
    pub suspect_after: u32,
    /// Missed heartbeats in a row after which a peer is down (more than `suspect_after`).
    pub down_after: u32,
    /// This node tells its peers it is a backup: routers send it traffic only when no
    /// primary can take it.
    pub backup: bool,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_millis(200),
            suspect_after: 3,
            down_after: 10,
            backup: false,
        }
    }
}
