//! The metadata state machine behind openraft's `RaftStateMachine`.
//!
//! Applied state lives in memory (it is small: metadata, not data); durability comes from the
//! log plus the snapshot kept in sled. On restart the state is restored from the snapshot and
//! openraft re-applies the committed entries after it.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, RwLock};

use super::durable::Durable;
use super::history::History;
use super::{blocking, OpenGuard, SNAPSHOT_TREE};
use crate::metadata::{MetadataState, Outcome};
use crate::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// The current snapshot's meta and file name, as JSON. The data (megabytes: the whole state)
/// lives in its own file beside sled: written through sled it would make every log flush wait
/// for it.
const SNAPSHOT_META_KEY: &[u8] = b"current_snapshot";

#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    meta: SnapshotMeta,
    /// File name under the snapshot directory.
    file: String,
}

/// A file name for a snapshot id: letters, digits, '-' and '_' only.
fn snapshot_file(snapshot_id: &str) -> String {
    let safe: String = snapshot_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.snapshot")
}

/// Writes `data` to `dir/name` so that it is complete on disk or absent: a temporary file,
/// fsync, rename, fsync of the directory.
fn write_file_durably(dir: &std::path::Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Everything the state machine has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub metadata: MetadataState,
}

struct StoredSnapshot {
    meta: SnapshotMeta,
    /// `Applied` as JSON, exactly the bytes sent to followers.
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct StateMachineStore {
    applied: Arc<RwLock<Applied>>,
    db: sled::Db,
    snapshots: sled::Tree,
    /// Where snapshot data files live.
    snapshot_dir: Arc<std::path::PathBuf>,
    /// Serialises snapshot writes: a snapshot being built and one being installed may finish
    /// at the same time.
    snapshot_write: Arc<std::sync::Mutex<()>>,
    snapshot_seq: Arc<AtomicU64>,
    /// The last applied revision, for readers that wait for "at least revision R".
    revision_tx: Arc<watch::Sender<u64>>,
    /// The last log id the stored snapshot covers, once its record is written: the log may be
    /// purged up to here and no further (see `LogStore::purge`).
    snapshot_covers: Arc<watch::Sender<Option<LogId>>>,
    /// The last applied log index, for linearizable reads (read-index is a log index).
    index_tx: Arc<watch::Sender<u64>>,
    /// The metadata revision the current snapshot holds.
    snapshot_revision: Arc<AtomicU64>,
    history: History,
    guard: OpenGuard,
    /// When set, an entry is applied only once the local log's flush covers it (see
    /// `super::durable`).
    durable: Option<Durable>,
}

fn sm_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

impl StateMachineStore {
    pub(super) fn new(
        db: &sled::Db,
        snapshot_dir: std::path::PathBuf,
        history_capacity: usize,
        guard: OpenGuard,
    ) -> Result<Self, StorageError> {
        let snapshots = db.open_tree(SNAPSHOT_TREE).map_err(sm_read)?;
        let mut applied = Applied::default();
        let mut covered = None;
        if let Some(stored) = Self::read_stored(&snapshots, &snapshot_dir)? {
            covered = stored.meta.last_log_id;
            applied = serde_json::from_slice(&stored.data)
                .map_err(|e| StorageIOError::read_snapshot(Some(stored.meta.signature()), &e))?;
            // The meta is authoritative for what the snapshot covers, as at install time: a
            // snapshot received from a leader may carry a membership older than the one the
            // data recorded (openraft #1808).
            applied.last_applied = stored.meta.last_log_id;
            applied.last_membership = stored.meta.last_membership.clone();
        }
        let (revision_tx, _) = watch::channel(applied.metadata.revision);
        let (snapshot_covers, _) = watch::channel(covered);
        let (index_tx, _) = watch::channel(applied.last_applied.map_or(0, |l| l.index));
        let snapshot_revision = Arc::new(AtomicU64::new(applied.metadata.revision));
        let history = History::new(history_capacity, &applied.metadata);
        Ok(Self {
            guard,
            history,
            applied: Arc::new(RwLock::new(applied)),
            db: db.clone(),
            snapshots,
            snapshot_dir: Arc::new(snapshot_dir),
            snapshot_write: Arc::default(),
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            revision_tx: Arc::new(revision_tx),
            snapshot_covers: Arc::new(snapshot_covers),
            index_tx: Arc::new(index_tx),
            snapshot_revision,
            durable: None,
        })
    }

    /// Applies entries only once the local log's flush covers them: what a leader that
    /// replicates while it persists needs, so that nothing becomes visible before a quorum
    /// holds it on disk (see `super::durable`).
    pub fn apply_when_durable(&mut self, durable: Durable) {
        self.durable = Some(durable);
    }

    /// A shared handle to the applied state, for local reads.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    /// Follows the last applied revision.
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    /// Follows the last log id the stored snapshot covers.
    pub fn snapshot_covers(&self) -> watch::Receiver<Option<LogId>> {
        self.snapshot_covers.subscribe()
    }

    /// Follows the last applied log index.
    pub fn applied_indexes(&self) -> watch::Receiver<u64> {
        self.index_tx.subscribe()
    }

    /// The metadata revision the current snapshot holds.
    pub fn snapshot_revision(&self) -> Arc<AtomicU64> {
        self.snapshot_revision.clone()
    }

    /// Observes whether any handle to the storage is still open.
    pub fn open_handles(&self) -> std::sync::Weak<()> {
        std::sync::Arc::downgrade(&self.guard)
    }

    /// The change history watches replay from.
    pub fn history(&self) -> History {
        self.history.clone()
    }

    fn read_stored(
        snapshots: &sled::Tree,
        dir: &std::path::Path,
    ) -> Result<Option<StoredSnapshot>, StorageError> {
        let Some(record) = snapshots.get(SNAPSHOT_META_KEY).map_err(sm_read)? else {
            return Ok(None);
        };
        let record: SnapshotRecord = serde_json::from_slice(&record).map_err(sm_read)?;
        let path = dir.join(&record.file);
        let data = std::fs::read(&path).map_err(|e| {
            let damaged = std::io::Error::other(format!(
                "snapshot {} cannot be read from {}: {e}; the data dir is damaged: remove it and let the node rejoin from the leader",
                record.meta.snapshot_id,
                path.display()
            ));
            StorageError::from(StorageIOError::read_snapshot(Some(record.meta.signature()), &damaged))
        })?;
        Ok(Some(StoredSnapshot {
            meta: record.meta,
            data,
        }))
    }

    /// Makes `stored` the current snapshot unless the current one already covers more of the
    /// log; returns whether it did.
    async fn store_snapshot(&self, stored: StoredSnapshot) -> Result<bool, StorageError> {
        let signature = stored.meta.signature();
        let covers = stored.meta.last_log_id;
        let write_error = move |e: &dyn std::fmt::Display| -> StorageError {
            let error = std::io::Error::other(e.to_string());
            StorageIOError::write_snapshot(Some(signature.clone()), &error).into()
        };
        let file = snapshot_file(&stored.meta.snapshot_id);
        let record = serde_json::to_vec(&SnapshotRecord {
            meta: stored.meta,
            file: file.clone(),
        })
        .map_err(|e| write_error(&e))?;
        let (db, snapshots, dir, lock, published) = (
            self.db.clone(),
            self.snapshots.clone(),
            self.snapshot_dir.clone(),
            self.snapshot_write.clone(),
            self.snapshot_covers.clone(),
        );
        blocking(&self.guard, move || {
            let _writing = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(current) = snapshots
                .get(SNAPSHOT_META_KEY)
                .map_err(|e| write_error(&e))?
            {
                let current: SnapshotRecord =
                    serde_json::from_slice(&current).map_err(|e| write_error(&e))?;
                if current.meta.last_log_id > covers {
                    return Ok(false);
                }
            }
            // The data first, then the record naming it: a crash in between leaves the previous
            // snapshot current and an unreferenced file, never a record without its data.
            troupe_failpoints::hit("raft.snapshot.write").map_err(|e| write_error(&e))?;
            write_file_durably(&dir, &file, &stored.data).map_err(|e| write_error(&e))?;
            troupe_failpoints::hit("raft.snapshot.written").map_err(|e| write_error(&e))?;
            snapshots
                .insert(SNAPSHOT_META_KEY, record)
                .map_err(|e| write_error(&e))?;
            db.flush().map_err(|e| write_error(&e))?;
            published.send_if_modified(|at| {
                let newer = *at < covers;
                if newer {
                    *at = covers;
                }
                newer
            });
            // Older snapshot files are no longer referenced.
            if let Ok(listing) = std::fs::read_dir(&*dir) {
                for old in listing.flatten() {
                    if old.file_name().to_str() != Some(file.as_str()) {
                        let _ = std::fs::remove_file(old.path());
                    }
                }
            }
            Ok(true)
        })
        .await
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Copy under the lock, serialise outside it: applying goes on meanwhile.
        let copy = self.applied.read().await.clone();
        let (last_applied, last_membership, revision) = (
            copy.last_applied,
            copy.last_membership.clone(),
            copy.metadata.revision,
        );
        let data = blocking(&self.guard, move || {
            serde_json::to_vec(&copy).map_err(sm_read)
        })
        .await?;
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(log_id) => format!("{}-{}-{seq}", log_id.leader_id, log_id.index),
            None => format!("empty-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        let stored = self
            .store_snapshot(StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            })
            .await?;
        if stored {
            self.snapshot_revision.store(revision, Ordering::Release);
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Applies one log entry's proposals in order, adding the changes each made to `changes`.
/// A proposal changed the state exactly when it moved the revision: a rejection, a lost
/// compare-and-set, a no-op and an idempotent replay (which answers with its first outcome,
/// `Applied` at the revision it took then) leave it, and add no change, so a watcher never
/// gets a change twice.
fn apply_batch(
    metadata: &mut crate::metadata::MetadataState,
    proposals: &[crate::metadata::Proposal],
    changes: &mut Vec<crate::metadata::Change>,
) -> Vec<Outcome> {
    proposals
        .iter()
        .map(|proposal| {
            let before = metadata.revision;
            let (revision, outcome) = metadata.apply_next(proposal);
            if revision != before {
                changes.extend(metadata.changes_at(revision, &proposal.command));
            }
            outcome
        })
        .collect()
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.applied.read().await;
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Outcome>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let (Some(durable), Some(last)) = (&self.durable, entries.last()) {
            durable.covers(last.log_id).await.map_err(|error| {
                StorageIOError::apply(last.log_id, &std::io::Error::other(error))
            })?;
        }
        let mut applied = self.applied.write().await;
        let mut outcomes = Vec::new();
        let mut changes = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(batch) => {
                    apply_batch(&mut applied.metadata, &batch.0, &mut changes)
                }
                EntryPayload::Membership(membership) => {
                    applied.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
            };
            outcomes.push(outcome);
        }
        let revision = applied.metadata.revision;
        let index = applied.last_applied.map_or(0, |l| l.index);
        // Recorded before the state is unlocked, so a reader that sees revision R in the
        // state finds R's changes in the history.
        self.history.record(changes);
        drop(applied);
        self.revision_tx.send_replace(revision);
        self.index_tx.send_replace(index);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut restored: Applied = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // The snapshot's own meta is authoritative for what it covers.
        restored.last_applied = meta.last_log_id;
        restored.last_membership = meta.last_membership.clone();
        let revision = restored.metadata.revision;
        // openraft installs only snapshots ahead of what is applied, so this one is stored.
        self.store_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        troupe_failpoints::hit("raft.snapshot.installed")
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let index = restored.last_applied.map_or(0, |l| l.index);
        let restored_keys = restored.metadata.keys_only();
        *self.applied.write().await = restored;
        self.snapshot_revision.store(revision, Ordering::Release);
        self.history.reset(&restored_keys);
        self.revision_tx.send_replace(revision);
        self.index_tx.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snapshots = self.snapshots.clone();
        let dir = self.snapshot_dir.clone();
        let stored = blocking(&self.guard, move || Self::read_stored(&snapshots, &dir)).await?;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Command, MetadataState, Proposal};

    fn set(key: &str, value: &str, request_id: &str) -> Proposal {
        Proposal {
            command: Command::SetSetting {
                key: key.into(),
                value: value.into(),
            },
            expected_revision: None,
            request_id: Some(request_id.into()),
        }
    }

    /// A client's retry of a write that was applied (its first answer was lost) lands right
    /// behind it, in the same entry or the next: it answers with the first outcome, and the
    /// watch must not get the change a second time at that revision.
    #[test]
    fn an_idempotent_replay_right_after_its_write_adds_no_change() {
        let mut state = MetadataState::default();
        let mut changes = Vec::new();
        let write = set("a", "1", "req-1");
        let outcomes = apply_batch(&mut state, &[write.clone(), write.clone()], &mut changes);
        assert_eq!(
            outcomes,
            [
                Outcome::Applied { revision: 1 },
                Outcome::Applied { revision: 1 }
            ]
        );
        assert_eq!(changes.len(), 1);
        // In the next entry too.
        let outcomes = apply_batch(&mut state, &[write], &mut changes);
        assert_eq!(outcomes, [Outcome::Applied { revision: 1 }]);
        assert_eq!(changes.len(), 1);
        // A no-op and a new write: only the write is a change.
        let outcomes = apply_batch(
            &mut state,
            &[set("a", "1", "req-2"), set("b", "2", "req-3")],
            &mut changes,
        );
        assert!(
            matches!(outcomes[0], Outcome::Unchanged { .. }),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1], Outcome::Applied { revision: 2 });
        let revisions: Vec<u64> = changes.iter().map(|c| c.revision).collect();
        assert_eq!(revisions, [1, 2]);
    }
}
