//! How far this node's Raft log is on disk, for replicating while persisting.
//!
//! openraft 0.9 waits for the leader's own flush of an entry before it sends the entry to
//! followers, so a write pays the leader's flush and then a follower's, one after the other.
//! etcd starts both at once. A leader that tells openraft its own appends are stored at once
//! sends them while they are still being flushed, but then openraft counts a copy that may not
//! be on disk toward the commit quorum, and a leader that crashes before its flush ends could
//! lose an entry that one follower holds and others applied.
//!
//! So the leader's copy counts only once it is on disk, enforced where a commit becomes
//! visible:
//! - **apply**: the state machine applies an entry only once the local log's flush covers it
//!   ([`Durable::covers`]). Reads, watches and the client's answer all come from applied
//!   state, so nothing is acknowledged or seen before a quorum holds it on disk: the follower
//!   that acknowledged it and this leader.
//! - **commit point sent to followers**: a leader never tells followers a commit point its own
//!   flush has not reached ([`Durable::clamp_commit`]), so a follower never applies an entry a
//!   crashed leader might lose. When it held one back, the next flush releases it with a
//!   heartbeat ([`Durable::released`]).
//!
//! Followers still answer an AppendEntries only after their own flush. Log ids are compared
//! whole (term, then index), so a position published before a truncation never covers a newer
//! entry at the same index.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::types::LogId;

/// What the log's flusher last made durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurableState {
    /// The last entry on disk, in the log as it is now.
    pub upto: Option<LogId>,
    /// Why a flush failed; the node's Raft stops on it.
    pub failed: Option<String>,
}

/// Shared by the log store (which publishes), the state machine (which waits) and the network
/// (which holds commit points back).
#[derive(Debug, Clone)]
pub struct Durable {
    state: Arc<watch::Sender<DurableState>>,
    /// A commit point was held back from a follower since the last flush.
    held_back: Arc<AtomicBool>,
}

impl Durable {
    pub(crate) fn new(upto: Option<LogId>) -> Self {
        let (state, _) = watch::channel(DurableState { upto, failed: None });
        Self {
            state: Arc::new(state),
            held_back: Arc::default(),
        }
    }

    /// The last entry on disk.
    pub fn upto(&self) -> Option<LogId> {
        self.state.borrow().upto
    }

    /// A flush (or a truncation) left the log on disk ending at `upto`.
    pub(crate) fn flushed(&self, upto: Option<LogId>) {
        self.state.send_modify(|state| state.upto = upto);
    }

    /// A flush failed: every wait ends with the error.
    pub(crate) fn failed(&self, error: String) {
        self.state.send_modify(|state| state.failed = Some(error));
    }

    /// Waits until the log on disk holds `log_id`.
    pub async fn covers(&self, log_id: LogId) -> Result<(), String> {
        let mut state = self.state.subscribe();
        let state = state
            .wait_for(|s| s.failed.is_some() || s.upto >= Some(log_id))
            .await
            .map_err(|_| "the raft log store has closed".to_owned())?;
        match &state.failed {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// The commit point a leader may send its followers: `commit`, or the last entry on disk
    /// when that is older.
    pub fn clamp_commit(&self, commit: Option<LogId>) -> Option<LogId> {
        let upto = self.upto();
        if commit > upto {
            self.held_back.store(true, Ordering::Relaxed);
            upto
        } else {
            commit
        }
    }

    /// Follows what the flusher publishes, for [`Durable::released`].
    pub fn subscribe(&self) -> watch::Receiver<DurableState> {
        self.state.subscribe()
    }

    /// Waits for a flush after a commit point was held back from a follower. `state` is kept
    /// from call to call, so a flush between two calls is not missed.
    pub async fn released(
        &self,
        state: &mut watch::Receiver<DurableState>,
    ) -> Result<(), watch::error::RecvError> {
        loop {
            state.changed().await?;
            if self.held_back.swap(false, Ordering::Relaxed) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[tokio::test]
    async fn a_wait_ends_when_a_flush_covers_the_entry_or_fails() {
        let durable = Durable::new(Some(id(1, 3)));
        durable.covers(id(1, 3)).await.unwrap();
        let waiting = tokio::spawn({
            let durable = durable.clone();
            async move { durable.covers(id(2, 5)).await }
        });
        // The same index in an older term is not the entry.
        durable.flushed(Some(id(1, 5)));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        durable.flushed(Some(id(2, 5)));
        waiting.await.unwrap().unwrap();

        let failing = tokio::spawn({
            let durable = durable.clone();
            async move { durable.covers(id(2, 9)).await }
        });
        durable.failed("disk full".into());
        assert_eq!(failing.await.unwrap(), Err("disk full".to_owned()));
    }

    #[tokio::test]
    async fn a_commit_point_past_the_flush_is_held_back_until_the_next_flush() {
        let durable = Durable::new(Some(id(2, 4)));
        assert_eq!(durable.clamp_commit(Some(id(2, 3))), Some(id(2, 3)));
        assert_eq!(durable.clamp_commit(None), None);
        let mut state = durable.subscribe();
        let released = tokio::spawn({
            let durable = durable.clone();
            async move { durable.released(&mut state).await }
        });
        assert_eq!(durable.clamp_commit(Some(id(2, 6))), Some(id(2, 4)));
        durable.flushed(Some(id(2, 6)));
        released.await.unwrap().unwrap();
        assert_eq!(durable.clamp_commit(Some(id(2, 6))), Some(id(2, 6)));
    }
}
