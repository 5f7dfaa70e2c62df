//! The change history a watch replays from, and the live feed it follows.
//!
//! History is bounded: the oldest changes fall off the front, and the revision they fell off
//! at becomes the compaction point. A watch from at or below it cannot be replayed and must
//! resync from a snapshot of the state. After a restart or a snapshot install the history
//! starts at the snapshot's revision.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use crate::metadata::Change;

/// Live changes buffered per watcher before it counts as lagging (and must resync).
const LIVE_BUFFER: usize = 4096;

#[derive(Debug)]
struct Inner {
    changes: VecDeque<Change>,
    /// Every change at or below this revision is gone.
    compacted: u64,
    capacity: usize,
}

#[derive(Debug, Clone)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
    live: broadcast::Sender<Change>,
}

/// The replayable part of the history from a revision on, plus the live feed after it.
pub struct Replay {
    pub backlog: Vec<Change>,
    pub live: broadcast::Receiver<Change>,
}

impl History {
    pub fn new(capacity: usize, compacted: u64) -> Self {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                changes: VecDeque::new(),
                compacted,
                capacity: capacity.max(1),
            })),
            live,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn record(&self, changes: Vec<Change>) {
        let mut inner = self.lock();
        for change in changes {
            inner.changes.push_back(change.clone());
            while inner.changes.len() > inner.capacity {
                if let Some(dropped) = inner.changes.pop_front() {
                    inner.compacted = inner.compacted.max(dropped.revision);
                }
            }
            // No receiver is fine: nobody is watching.
            let _ = self.live.send(change);
        }
    }

    /// Forgets everything up to `revision` (a snapshot was installed over the state).
    pub fn reset(&self, revision: u64) {
        let mut inner = self.lock();
        inner.changes.clear();
        inner.compacted = revision;
    }

    /// The compaction point.
    pub fn compacted(&self) -> u64 {
        self.lock().compacted
    }

    /// Changes with revision >= `from`, and the live feed, or the compaction point when
    /// `from` is at or below it.
    pub fn replay(&self, from: u64) -> Result<Replay, u64> {
        let inner = self.lock();
        if from <= inner.compacted && inner.compacted > 0 {
            return Err(inner.compacted);
        }
        // Subscribing under the lock means no change is both missed and not in the backlog.
        let live = self.live.subscribe();
        let backlog = inner
            .changes
            .iter()
            .filter(|c| c.revision >= from)
            .cloned()
            .collect();
        Ok(Replay { backlog, live })
    }
}
