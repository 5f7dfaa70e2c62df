//! Watching metadata changes in revision order.
//!
//! [`Watch`] replays the history from a revision and then follows new changes. When the
//! revision is older than the compaction point, or the watcher falls too far behind, it
//! fails with [`WatchError`]; [`ResyncingWatch`] turns that into a fresh snapshot of the state
//! and carries on, so no caller handles compaction by hand.

use std::collections::VecDeque;

use tokio::sync::broadcast;

use crate::facade::Metadata;
use crate::metadata::{Change, MetadataState};
use crate::store::{Live, Replay};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("revision {requested} is compacted; the history starts after revision {snapshot_revision}: resync from a snapshot")]
    Compacted {
        requested: u64,
        snapshot_revision: u64,
    },
    #[error("the watcher fell behind and changes were dropped: resync from a snapshot")]
    Lagged,
    #[error("the node is shutting down")]
    Closed,
}

pub struct Watch {
    /// The next revision the watcher wants: above every change it was given.
    from: u64,
    backlog: VecDeque<Change>,
    live: broadcast::Receiver<Live>,
}

impl Watch {
    pub(crate) fn new(replay: Replay) -> Self {
        Self {
            from: replay.from,
            backlog: replay.backlog.into(),
            live: replay.live,
        }
    }

    /// The next change, in revision order. A snapshot installed over changes the watcher has
    /// not seen ends it with [`WatchError::Compacted`]: they will never be sent.
    pub async fn next(&mut self) -> Result<Change, WatchError> {
        let change = match self.backlog.pop_front() {
            Some(change) => change,
            None => loop {
                match self.live.recv().await {
                    Ok(Live::Changes(changes)) => {
                        // Applied here only now, but older than what the watcher asked for:
                        // skipped.
                        let from = self.from;
                        self.backlog
                            .extend(changes.into_iter().filter(|c| c.revision >= from));
                        if let Some(change) = self.backlog.pop_front() {
                            break change;
                        }
                    }
                    Ok(Live::Reset { revision }) if revision >= self.from => {
                        return Err(WatchError::Compacted {
                            requested: self.from,
                            snapshot_revision: revision,
                        })
                    }
                    Ok(Live::Reset { .. }) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return Err(WatchError::Lagged),
                    Err(broadcast::error::RecvError::Closed) => return Err(WatchError::Closed),
                }
            },
        };
        self.from = self.from.max(change.revision + 1);
        Ok(change)
    }

    /// Every change of the next revision (one command's: activating a version also retires
    /// the one before, two changes at one revision), so that a watcher never acts on half a
    /// command.
    pub async fn next_revision(&mut self) -> Result<Vec<Change>, WatchError> {
        let first = self.next().await?;
        let revision = first.revision;
        let mut changes = vec![first];
        // A command's changes come in one live message, and the replayed history holds whole
        // commands: the rest of the revision is in the backlog now.
        while self.backlog.front().is_some_and(|c| c.revision == revision) {
            changes.extend(self.backlog.pop_front());
        }
        Ok(changes)
    }
}

/// What [`ResyncingWatch::next_revision`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchBatch {
    /// The whole state as of `revision`: replace what you hold; changes after it follow.
    Resync {
        state: Box<MetadataState>,
        revision: u64,
    },
    /// Every change of one revision.
    Changes(Vec<Change>),
}

/// What a resyncing watch yields.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// The whole state as of `revision`: replace what you hold; changes after it follow.
    Resync {
        state: Box<MetadataState>,
        revision: u64,
    },
    Change(Change),
}

/// A watch that resyncs from a snapshot of the state whenever the history cannot serve it.
pub struct ResyncingWatch<'a> {
    metadata: &'a Metadata,
    watch: Option<Watch>,
    from: u64,
}

impl<'a> ResyncingWatch<'a> {
    pub(crate) fn new(metadata: &'a Metadata, from: u64) -> Self {
        Self {
            metadata,
            watch: None,
            from,
        }
    }

    /// The watch, opened at `from` if it is not open; `None` when `from` is compacted (the
    /// caller resyncs).
    fn open(&mut self) -> Result<Option<&mut Watch>, WatchError> {
        if self.watch.is_none() {
            match self.metadata.watch(self.from) {
                Ok(watch) => self.watch = Some(watch),
                Err(WatchError::Compacted { .. }) => return Ok(None),
                Err(error) => return Err(error),
            }
        }
        Ok(self.watch.as_mut())
    }

    pub async fn next(&mut self) -> Result<WatchEvent, WatchError> {
        let Some(watch) = self.open()? else {
            return Ok(self.resync().await);
        };
        match watch.next().await {
            Ok(change) => {
                self.from = change.revision;
                Ok(WatchEvent::Change(change))
            }
            Err(WatchError::Lagged | WatchError::Compacted { .. }) => Ok(self.resync().await),
            Err(WatchError::Closed) => Err(WatchError::Closed),
        }
    }

    /// As [`ResyncingWatch::next`], a whole revision at a time ([`Watch::next_revision`]).
    pub async fn next_revision(&mut self) -> Result<WatchBatch, WatchError> {
        let Some(watch) = self.open()? else {
            return Ok(self.resync_batch().await);
        };
        match watch.next_revision().await {
            Ok(changes) => {
                self.from = changes.last().map_or(self.from, |c| c.revision + 1);
                Ok(WatchBatch::Changes(changes))
            }
            Err(WatchError::Lagged | WatchError::Compacted { .. }) => Ok(self.resync_batch().await),
            Err(WatchError::Closed) => Err(WatchError::Closed),
        }
    }

    async fn resync_batch(&mut self) -> WatchBatch {
        let (state, revision) = self.snapshot().await;
        WatchBatch::Resync { state, revision }
    }

    async fn resync(&mut self) -> WatchEvent {
        let (state, revision) = self.snapshot().await;
        WatchEvent::Resync { state, revision }
    }

    /// The state now, from which the watch starts again.
    async fn snapshot(&mut self) -> (Box<MetadataState>, u64) {
        let (state, revision) = self.metadata.snapshot_state().await;
        self.from = revision + 1;
        self.watch = None;
        (Box::new(state), revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{ChangeValue, KeyRevisions, SettingRecord};
    use crate::store::History;

    fn set(revision: u64, value: &str) -> Change {
        Change {
            revision,
            key: "settings/a".into(),
            value: ChangeValue::Setting {
                key: "a".into(),
                record: SettingRecord {
                    value: value.to_owned(),
                    revisions: KeyRevisions {
                        create_revision: 1,
                        mod_revision: revision,
                    },
                },
            },
        }
    }

    /// A client that saw revision 3 on one node and reconnects to a node still catching up
    /// (at revision 1) asks for 4 on: it must not get 2 and 3 again as they apply here.
    #[tokio::test]
    async fn a_watch_from_a_revision_not_applied_yet_skips_the_older_changes() {
        let history = History::new(100, &MetadataState::default());
        history.record(vec![set(1, "one")]);
        let replay = history.replay(4).map_err(|_| "compacted").unwrap();
        let mut watch = Watch::new(replay);
        history.record(vec![set(2, "two"), set(3, "three"), set(4, "four")]);
        let change = watch.next().await.unwrap();
        assert_eq!(change.revision, 4);
        history.record(vec![set(5, "five")]);
        assert_eq!(watch.next().await.unwrap().revision, 5);
    }

    /// A snapshot installed over changes a live watch has not been sent ends it: the watcher
    /// must resync, not go on as if nothing was missed. One already past the snapshot goes on.
    #[tokio::test]
    async fn a_snapshot_installed_under_a_live_watch_ends_it() {
        let history = History::new(100, &MetadataState::default());
        history.record(vec![set(1, "one")]);
        let mut behind = Watch::new(history.replay(2).map_err(|_| "compacted").unwrap());
        let mut ahead = Watch::new(history.replay(12).map_err(|_| "compacted").unwrap());
        history.record(vec![set(2, "two")]);
        assert_eq!(behind.next().await.unwrap().revision, 2);
        let mut installed = MetadataState::default();
        installed.revision = 10;
        history.reset(&installed);
        history.record(vec![set(12, "twelve")]);
        assert_eq!(
            behind.next().await,
            Err(WatchError::Compacted {
                requested: 3,
                snapshot_revision: 10
            })
        );
        assert_eq!(ahead.next().await.unwrap().revision, 12);
    }

    /// One command's changes (an activation retires the version before at the same revision)
    /// come as one, from the replayed history and from the live feed alike.
    #[tokio::test]
    async fn a_revisions_changes_come_together() {
        let history = History::new(100, &MetadataState::default());
        history.record(vec![set(1, "a"), set(1, "b")]);
        history.record(vec![set(2, "c")]);
        let mut watch = Watch::new(history.replay(1).map_err(|_| "compacted").unwrap());
        history.record(vec![set(3, "d"), set(3, "e"), set(3, "f")]);
        history.record(vec![set(4, "g")]);
        let revisions =
            |changes: Vec<Change>| changes.iter().map(|c| c.revision).collect::<Vec<_>>();
        assert_eq!(revisions(watch.next_revision().await.unwrap()), [1, 1]);
        assert_eq!(revisions(watch.next_revision().await.unwrap()), [2]);
        assert_eq!(revisions(watch.next_revision().await.unwrap()), [3, 3, 3]);
        // Single changes still come one at a time.
        assert_eq!(watch.next().await.unwrap().revision, 4);
    }
}
