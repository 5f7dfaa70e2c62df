//! The node's background tasks (health publishing, the metrics endpoint, the cluster-settings
//! follower, certificate and JWKS reloaders, the SIGHUP listener), stopped the way mini-redis
//! stops its connections: one shutdown signal that every task listens to, and a completion
//! guard that every task holds, so that stopping the node waits until the last of them has
//! ended and none is left behind. tokio-util's `CancellationToken` (the signal) and
//! `TaskTracker` (the guards) are that pattern.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Background {
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Default for Background {
    fn default() -> Self {
        Self::new()
    }
}

impl Background {
    pub fn new() -> Self {
        Self {
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// The shutdown signal, for a task that ends on it by itself (a server's graceful stop).
    pub fn signal(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs `task` until it ends or the node stops, whichever comes first.
    pub fn spawn(&self, what: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => tracing::debug!(task = what, "background task ended"),
                () = shutdown.cancelled() => {}
            }
        });
    }

    /// Signals every task to stop, then waits until all have ended, at most `timeout`. Returns
    /// false when some had not ended by then.
    pub async fn stop(&self, timeout: Duration) -> bool {
        self.shutdown.cancel();
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tasks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_every_task_and_waits_for_them() {
        let background = Background::new();
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..3 {
            let ended_tx = ended_tx.clone();
            background.spawn("forever", async move {
                // Dropped when the task ends: the receiver sees every sender go.
                let _guard = ended_tx;
                std::future::pending::<()>().await;
            });
        }
        drop(ended_tx);
        // One that ends on the signal by itself, and one that is already done.
        let signal = background.signal();
        background.spawn("graceful", async move { signal.cancelled().await });
        background.spawn("short", async {});
        assert!(background.stop(Duration::from_secs(10)).await);
        assert_eq!(background.running(), 0);
        assert!(ended.recv().await.is_none(), "a task outlived stop");
    }
}
