//! The change history a watch replays from, and the live feed it follows.
//!
//! History is bounded: the oldest changes fall off the front, and the revision they fell off
//! at becomes the compaction point. A watch from at or below it cannot be replayed and must
//! resync from a snapshot of the state. After a restart or a snapshot install the history
//! starts at the snapshot's revision.
//!
//! The history also keeps the keys' state at the compaction point (the changes that fell off
//! are folded into it), so the state as of any revision from there on can be rebuilt:
//! [`History::state_at`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use crate::metadata::{Change, MetadataState};

/// Live changes buffered per watcher before it counts as lagging (and must resync).
const LIVE_BUFFER: usize = 4096;

#[derive(Debug)]
struct Inner {
    changes: VecDeque<Change>,
    /// Every change at or below this revision is gone.
    compacted: u64,
    /// The keys as of `compacted`.
    base: MetadataState,
    capacity: usize,
}

#[derive(Debug, Clone)]
pub struct History {
    inner: Arc<Mutex<Inner>>,
    live: broadcast::Sender<Live>,
}

/// What the live feed carries.
#[derive(Debug, Clone)]
pub enum Live {
    /// The changes of one command, all at one revision, sent together so that a watcher can
    /// take them as one ([`crate::watch::Watch::next_revision`]).
    Changes(Vec<Change>),
    /// A snapshot was installed over the state: the changes up to `revision` that were not
    /// sent will never be. A watcher that had not seen them must resync.
    Reset { revision: u64 },
}

/// The replayable part of the history from a revision on, plus the live feed after it.
pub struct Replay {
    /// The first revision wanted. The live feed carries every change recorded after the
    /// subscription, so a watch from a revision this node has not applied yet (a client that
    /// moved from a node further ahead) must skip the ones below it.
    pub from: u64,
    pub backlog: Vec<Change>,
    pub live: broadcast::Receiver<Live>,
}

impl History {
    /// A history that starts at `state` (the state at its revision).
    pub fn new(capacity: usize, state: &MetadataState) -> Self {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                changes: VecDeque::new(),
                compacted: state.revision,
                base: state.keys_only(),
                capacity: capacity.max(1),
            })),
            live,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one command's changes (all at its revision) and sends them to the watchers.
    pub fn record(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for change in &changes {
            inner.changes.push_back(change.clone());
            while inner.changes.len() > inner.capacity {
                if let Some(dropped) = inner.changes.pop_front() {
                    inner.compacted = inner.compacted.max(dropped.revision);
                    inner.base.put_change(&dropped);
                }
            }
        }
        // Sent under the lock, as one message: a watcher's replay and its live feed meet
        // between two commands, never inside one. No receiver is fine: nobody is watching.
        let _ = self.live.send(Live::Changes(changes));
    }

    /// Forgets everything up to `state`'s revision (a snapshot was installed over the state).
    pub fn reset(&self, state: &MetadataState) {
        let mut inner = self.lock();
        inner.changes.clear();
        inner.compacted = state.revision;
        inner.base = state.keys_only();
        // Sent under the lock, as changes are, so a watcher sees it in order.
        let _ = self.live.send(Live::Reset {
            revision: state.revision,
        });
    }

    /// The keys as of `revision`, rebuilt from the compaction point; the compaction point
    /// when `revision` is below it. Revisions past the last change give the latest state.
    pub fn state_at(&self, revision: u64) -> Result<MetadataState, u64> {
        let inner = self.lock();
        if revision < inner.compacted {
            return Err(inner.compacted);
        }
        let mut state = inner.base.clone();
        for change in inner.changes.iter().take_while(|c| c.revision <= revision) {
            state.put_change(change);
        }
        state.revision = revision;
        Ok(state)
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
        Ok(Replay {
            from,
            backlog,
            live,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{ChangeValue, KeyRevisions, SettingRecord};

    fn set(revision: u64, key: &str, value: &str) -> Change {
        Change {
            revision,
            key: format!("settings/{key}"),
            value: ChangeValue::Setting {
                key: key.to_owned(),
                record: SettingRecord {
                    value: value.to_owned(),
                    revisions: KeyRevisions {
                        create_revision: revision,
                        mod_revision: revision,
                    },
                },
            },
        }
    }

    fn value_at(history: &History, revision: u64, key: &str) -> Option<String> {
        let state = history.state_at(revision).expect("within the history");
        assert_eq!(state.revision, revision);
        state.settings.get(key).map(|s| s.value.clone())
    }

    #[test]
    fn rebuilds_any_revision_from_the_compaction_point_on() {
        let history = History::new(3, &MetadataState::default());
        // a=1 @1, b=1 @2, a=2 @3, a=3 @5, b=2 @6: capacity 3 folds @1 and @2 into the base.
        history.record(vec![
            set(1, "a", "1"),
            set(2, "b", "1"),
            set(3, "a", "2"),
            set(5, "a", "3"),
            set(6, "b", "2"),
        ]);
        assert_eq!(history.compacted(), 2);
        assert_eq!(history.state_at(1), Err(2));
        assert_eq!(value_at(&history, 2, "a").as_deref(), Some("1"));
        assert_eq!(value_at(&history, 2, "b").as_deref(), Some("1"));
        assert_eq!(value_at(&history, 4, "a").as_deref(), Some("2"));
        assert_eq!(value_at(&history, 5, "a").as_deref(), Some("3"));
        assert_eq!(value_at(&history, 5, "b").as_deref(), Some("1"));
        assert_eq!(value_at(&history, 9, "b").as_deref(), Some("2"));
    }

    #[test]
    fn a_reset_starts_over_from_the_installed_state() {
        let history = History::new(10, &MetadataState::default());
        history.record(vec![set(1, "a", "1")]);
        let mut installed = MetadataState::default();
        installed.put_change(&set(7, "c", "x"));
        history.reset(&installed);
        assert_eq!(history.state_at(6), Err(7));
        assert_eq!(value_at(&history, 7, "c").as_deref(), Some("x"));
        assert_eq!(value_at(&history, 7, "a"), None);
    }
}
