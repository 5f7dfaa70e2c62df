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
        }
    }
}
