//! The runtime a node's Raft runs on: threads of its own, apart from the runtime that serves
//! clients.
//!
//! openraft's core, its replication tasks, the proposer and the peer port's server all run
//! here. When clients saturate a node, the serving runtime's workers have hundreds of ready
//! tasks (decoding, routing, encoding embeddings); a heartbeat that waits its turn behind them
//! for longer than the election timeout (150 ms by default) makes a follower stand for
//! election, and the leader changes although no node failed. On threads of their own, Raft's
//! few tasks are scheduled by the operating system as soon as they wake, and compute threads
//! run at a lower priority (`serving.compute_nice`).

use tokio::runtime::{Handle, Runtime};

use crate::error::MetadataError;
use crate::types::NodeId;

/// Worker threads of the Raft runtime: the core, replication to each peer, storage and the
/// peer port's connections are mostly waiting; two keep one slow disk write from holding up
/// heartbeats.
const WORKER_THREADS: usize = 2;

thread_local! {
    /// Set on the threads of every Raft runtime.
    static ON_RAFT_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A Raft runtime; shut down (without waiting for its tasks) when dropped.
pub struct RaftRuntime {
    runtime: Option<Runtime>,
}

impl RaftRuntime {
    pub fn start(node_id: NodeId) -> Result<Self, MetadataError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name(format!("raft-{node_id}"))
            .on_thread_start(|| ON_RAFT_THREAD.set(true))
            .enable_all()
            .build()
            .map_err(|e| MetadataError::Raft(format!("cannot start the Raft runtime: {e}")))?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    pub fn handle(&self) -> &Handle {
        self.runtime
            .as_ref()
            .expect("the runtime is only taken when dropped")
            .handle()
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        // A runtime cannot shut down from one of its own threads; hand it to another.
        if ON_RAFT_THREAD.get() {
            let _ = std::thread::Builder::new()
                .name("raft-runtime-drop".into())
                .spawn(move || runtime.shutdown_background());
        } else {
            runtime.shutdown_background();
        }
    }
}

/// Spawns `task` on `tasks` (the current runtime) to run until it ends or `stop` is cancelled:
/// how the facade's helper tasks are started, so that its shutdown can end and await them.
pub(crate) fn spawn_until_stopped(
    tasks: &tokio_util::task::TaskTracker,
    stop: &tokio_util::sync::CancellationToken,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let stop = stop.clone();
    tasks.spawn(async move { stop.run_until_cancelled(task).await });
}
