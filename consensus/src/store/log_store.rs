//! The Raft log, vote and committed index in sled.
//!
//! Entries live in one tree keyed by the big-endian log index, so sled's ordering is the
//! log's. Every write is flushed before openraft hears it is done.
//!
//! `append` puts the entries into sled (memory) and hands the completion callback to a flusher
//! thread, which flushes and then fires it; one flush covers every append queued behind it,
//! completed in order. openraft counts an entry as stored (and the leader counts its own vote
//! for it) only when that callback fires, so nothing is acknowledged before it is on disk.
//! openraft 0.9 itself waits for each append's callback inside its core loop before it takes
//! the next write, so at most one append is queued in practice; concurrent writes are batched
//! one level up, by the proposer (`crate::proposer`). The thread keeps the blocking flush off
//! the async workers: 3 211 writes/s against 2 752 with `spawn_blocking` per append (one
//! node, 16 writers, measured before the proposer existed).
//!
//! With [`LogStore::persist_in_parallel`] (what a node runs), a leader's own appends are
//! reported stored at once, so openraft sends them to followers while the flush runs; the
//! flusher publishes how far the log is on disk ([`Durable`]), and what a commit makes
//! visible waits for it (see `super::durable`).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};

use super::durable::Durable;
use super::{blocking, OpenGuard, LOG_TREE, META_TREE};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const LAST_PURGED_KEY: &[u8] = b"last_purged";

/// Ranges up to this many entries are read inline; longer ones (a lagging follower) go to the
/// blocking pool.
const INLINE_READ_ENTRIES: u64 = 512;

#[derive(Debug, Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    guard: OpenGuard,
    flusher: Arc<Flusher>,
    /// The most recently appended entries, so replication reads them without going through
    /// sled and JSON again.
    recent: Arc<std::sync::Mutex<RecentEntries>>,
    /// What the stored snapshot covers: a purge is written to disk only up to it (see
    /// [`RaftLogStorage::purge`]).
    snapshot_covers: tokio::sync::watch::Receiver<Option<LogId>>,
    /// A purge point not yet written because no stored snapshot covers it yet.
    pending_purge: Arc<std::sync::Mutex<Option<LogId>>>,
    /// How far the log is on disk, as the flusher last published it.
    durable: Durable,
    /// This node's id when its appends as leader are reported stored before their flush ends
    /// ([`LogStore::persist_in_parallel`]).
    early_ack: Option<NodeId>,
    /// The vote as last saved: whose appends these are.
    vote: Arc<std::sync::Mutex<Option<Vote>>>,
}

/// Entries kept in memory behind the tail of the log.
const RECENT_ENTRIES: usize = 1024;

/// A contiguous run of the newest entries of the log.
#[derive(Debug, Default)]
struct RecentEntries {
    entries: std::collections::VecDeque<Entry>,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn push(&mut self, entry: Entry) {
        // Only a contiguous run is kept; anything else starts it afresh.
        let contiguous = self
            .entries
            .back()
            .is_some_and(|last| last.log_id.index.checked_add(1) == Some(entry.log_id.index));
        if !contiguous {
            self.entries.clear();
        }
        self.entries.push_back(entry);
        while self.entries.len() > RECENT_ENTRIES {
            self.entries.pop_front();
        }
    }

    /// Forgets entries at `from` and after (a truncation).
    fn truncate(&mut self, from: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= from) {
            self.entries.pop_back();
        }
    }

    /// Forgets entries up to `upto` (a purge).
    fn purge(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|e| e.log_id.index <= upto) {
            self.entries.pop_front();
        }
    }

    /// `[start, end)`, if every entry of it is here.
    fn range(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.log_id.index;
        if start < first || end > last.checked_add(1)? || end <= start {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let count = usize::try_from(end - start).ok()?;
        Some(self.entries.range(from..from + count).cloned().collect())
    }
}

/// The flusher thread and its queue of appends written to sled and waiting for a flush.
/// Dropping the last handle closes the queue and joins the thread, so the database is
/// released when the last store handle is gone.
#[derive(Debug)]
struct Flusher {
    queue: Option<mpsc::Sender<FlushJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A change to the log waiting for a flush: the log then ends at `upto` on disk.
struct FlushJob {
    upto: Option<LogId>,
    done: FlushDone,
}

/// Who hears that a job's flush ended.
enum FlushDone {
    /// openraft, waiting for an append.
    Raft(LogFlushed<TypeConfig>),
    /// A truncation, waiting in the store.
    Store(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Nobody: a leader's append openraft was told about at once.
    Published,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Flushes sled for every batch of queued jobs, publishes how far the log is on disk, then
/// completes the jobs in order. It ends when the last `LogStore` handle is dropped; it holds
/// `guard` until then.
fn run_flusher(db: sled::Db, queue: mpsc::Receiver<FlushJob>, guard: OpenGuard, durable: Durable) {
    while let Ok(first) = queue.recv() {
        let mut waiting = vec![first];
        waiting.extend(queue.try_iter());
        // `raft.log.flush` is the slow or failing disk; `raft.log.flushed` a crash after the
        // entries are durable but before anyone heard so.
        let result = troupe_failpoints::hit("raft.log.flush")
            .map_err(sled::Error::Io)
            .and_then(|()| db.flush())
            .map(|_| ())
            .map_err(|error| format!("flushing the raft log: {}", storage_error_text(&error)));
        if result.is_ok() {
            let _ = troupe_failpoints::hit("raft.log.flushed");
        }
        // Jobs are queued in the order the log changed, so the last one says where it ends.
        match &result {
            Ok(()) => durable.flushed(waiting.last().and_then(|job| job.upto)),
            Err(error) => durable.failed(error.clone()),
        }
        for job in waiting {
            match job.done {
                FlushDone::Raft(callback) => {
                    callback.log_io_completed(result.clone().map_err(std::io::Error::other))
                }
                FlushDone::Store(reply) => {
                    let _ = reply.send(result.clone());
                }
                FlushDone::Published => {}
            }
        }
    }
    // The database before the guard, so the guard never reports the store closed while this
    // thread still holds a handle (a `let _guard` local would be dropped before the `db`
    // parameter).
    drop(db);
    drop(guard);
}

/// A sled error in words: sled shows an I/O error's Rust debug form, which a full disk makes
/// the most common one an operator sees.
pub(crate) fn storage_error_text(error: &sled::Error) -> String {
    match error {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            "no space left on the device holding the data dir".to_owned()
        }
        sled::Error::Io(io) => match io.raw_os_error() {
            Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
            None => io.to_string(),
        },
        other => other.to_string(),
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_io(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_io(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    pub(super) fn new(
        db: &sled::Db,
        guard: OpenGuard,
        snapshot_covers: tokio::sync::watch::Receiver<Option<LogId>>,
    ) -> Result<Self, StorageError> {
        let log = db.open_tree(LOG_TREE).map_err(read_io)?;
        let meta = db.open_tree(META_TREE).map_err(read_io)?;
        // Whatever is in the log at open is on disk.
        let upto = match log.last().map_err(read_io)? {
            Some((_, bytes)) => Some(
                serde_json::from_slice::<Entry>(&bytes)
                    .map_err(read_io)?
                    .log_id,
            ),
            None => Self::read_meta(&meta, LAST_PURGED_KEY)?,
        };
        let durable = Durable::new(upto);
        let vote = Self::read_meta(&meta, VOTE_KEY)?;
        let (sender, queue) = mpsc::channel();
        let (flush_db, flush_guard, flush_durable) = (db.clone(), guard.clone(), durable.clone());
        let thread = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || run_flusher(flush_db, queue, flush_guard, flush_durable))
            .map_err(write_io)?;
        let flusher = Arc::new(Flusher {
            queue: Some(sender),
            thread: Some(thread),
        });
        Ok(Self {
            guard,
            flusher,
            snapshot_covers,
            pending_purge: Arc::default(),
            recent: Arc::default(),
            durable,
            early_ack: None,
            vote: Arc::new(std::sync::Mutex::new(vote)),
            db: db.clone(),
            log,
            meta,
        })
    }

    /// Reports this node's appends as leader stored at once, so openraft replicates them while
    /// they are flushed; returns the handle through which what a commit makes visible waits
    /// for the flush (see `super::durable`). Without it (openraft's storage suite, tools) every
    /// append is reported only once it is on disk.
    pub fn persist_in_parallel(&mut self, node_id: NodeId) -> Durable {
        self.early_ack = Some(node_id);
        self.durable.clone()
    }

    /// Whether `entries` are this node's own, made as the leader of the vote it saved last:
    /// only those may be reported stored before their flush. A follower's append (also of
    /// entries this node made in an earlier term) waits for the flush before it is answered.
    fn appended_as_leader(&self, entries: &[Entry]) -> bool {
        let Some(me) = self.early_ack else {
            return false;
        };
        let vote = *self
            .vote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(vote) = vote else {
            return false;
        };
        vote.committed
            && vote.leader_id.node_id == me
            && entries.iter().all(|entry| {
                entry.log_id.leader_id.term == vote.leader_id.term
                    && entry.log_id.leader_id.node_id == me
            })
    }

    fn queue_flush(&self, job: FlushJob) -> Result<(), FlushJob> {
        match &self.flusher.queue {
            Some(queue) => queue.send(job).map_err(|mpsc::SendError(job)| job),
            None => Err(job),
        }
    }

    /// The id of the entry at `index`, or the purge point when it is purged.
    fn log_id_at(
        log: &sled::Tree,
        meta: &sled::Tree,
        index: u64,
    ) -> Result<Option<LogId>, StorageError> {
        match Self::read_range(log, index, index.checked_add(1))?.pop() {
            Some(entry) => Ok(Some(entry.log_id)),
            None => Self::read_meta(meta, LAST_PURGED_KEY),
        }
    }

    /// The vote as it was saved, for tools that inspect a stopped node's disk.
    pub async fn saved_vote(&self) -> Result<Option<Vote>, StorageError> {
        let meta = self.meta.clone();
        blocking(&self.guard, move || Self::read_meta(&meta, VOTE_KEY)).await
    }

    /// Writes purge point `log_id` (never moving it back) and deletes the entries up to it in
    /// the background, off openraft's core loop (a purge after a snapshot removes thousands of
    /// entries). Both reach disk with the next flush. A crash before that leaves extra entries
    /// below the recorded purge point, which openraft tolerates, never a gap it cannot
    /// explain.
    fn record_purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let recorded: Option<LogId> = Self::read_meta(&self.meta, LAST_PURGED_KEY)?;
        if recorded >= Some(log_id) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&log_id).map_err(write_io)?;
        self.meta.insert(LAST_PURGED_KEY, bytes).map_err(write_io)?;
        let (log, guard) = (self.log.clone(), self.guard.clone());
        tokio::task::spawn_blocking(move || {
            // A slow deletion, for tests of what is reported before it ends.
            let _ = troupe_failpoints::hit("raft.log.purge.delete");
            if let Err(error) = Self::remove_range(&log, 0, Some(log_id.index.saturating_add(1))) {
                tracing::warn!(%error, upto = log_id.index, "deleting purged raft log entries failed; they stay on disk until the next purge");
            }
            // The tree before the guard (see `run_flusher`).
            drop(log);
            drop(guard);
        });
        Ok(())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        // The cache holds no invariant a panic could break halfway, so a poisoned lock is
        // still usable.
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_range(
        log: &sled::Tree,
        start: u64,
        end: Option<u64>,
    ) -> Result<Vec<Entry>, StorageError> {
        let iter = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => log.range(index_key(start)..index_key(end)),
            None => log.range(index_key(start)..),
        };
        iter.values()
            .map(|value| {
                let bytes = value.map_err(read_io)?;
                serde_json::from_slice::<Entry>(&bytes).map_err(read_io)
            })
            .collect()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        meta: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match meta.get(key).map_err(read_io)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_io),
        }
    }

    fn write_meta<T: serde::Serialize>(
        db: &sled::Db,
        meta: &sled::Tree,
        key: &[u8],
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(write_io)?;
        troupe_failpoints::hit("raft.meta.write").map_err(write_io)?;
        meta.insert(key, bytes).map_err(write_io)?;
        db.flush().map_err(write_io)?;
        troupe_failpoints::hit("raft.meta.written").map_err(write_io)?;
        Ok(())
    }

    /// Removes entries with index in `[from, to)`.
    fn remove_range(log: &sled::Tree, from: u64, to: Option<u64>) -> Result<(), StorageError> {
        let start = index_key(from);
        let keys: Result<Vec<_>, _> = match to {
            Some(to) => log.range(start..index_key(to)).keys().collect(),
            None => log.range(start..).keys().collect(),
        };
        let mut batch = sled::Batch::default();
        for key in keys.map_err(write_io)? {
            batch.remove(key);
        }
        log.apply_batch(batch).map_err(write_io)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        // Entries up to a purge point still waiting for its snapshot are purged as far as
        // readers can tell, though still on disk.
        let pending = *self
            .pending_purge
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = match pending {
            Some(purged) => start.max(purged.index.saturating_add(1)),
            None => start,
        };
        if let Some(end) = end {
            if end <= start {
                return Ok(Vec::new());
            }
            if let Some(entries) = self.recent().range(start, end) {
                return Ok(entries);
            }
        }
        let log = self.log.clone();
        match end {
            Some(end) if end.saturating_sub(start) <= INLINE_READ_ENTRIES => {
                Self::read_range(&log, start, Some(end))
            }
            _ => blocking(&self.guard, move || Self::read_range(&log, start, end)).await,
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let (log, meta) = (self.log.clone(), self.meta.clone());
        let pending = *self
            .pending_purge
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        blocking(&self.guard, move || {
            let recorded: Option<LogId> = Self::read_meta(&meta, LAST_PURGED_KEY)?;
            let last_purged_log_id = recorded.max(pending);
            let last = match log.last().map_err(read_io)? {
                Some((_, bytes)) => Some(
                    serde_json::from_slice::<Entry>(&bytes)
                        .map_err(read_io)?
                        .log_id,
                ),
                None => None,
            };
            // The purged entries are deleted in the background, so a purge past the end of the
            // log (after a snapshot install) can leave an older last entry for a moment; the
            // purge point is then the last log id, as openraft's contract says.
            Ok(LogState {
                last_purged_log_id,
                last_log_id: last.max(last_purged_log_id),
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (db, meta, saved) = (self.db.clone(), self.meta.clone(), *vote);
        blocking(&self.guard, move || {
            Self::write_meta(&db, &meta, VOTE_KEY, &saved)
        })
        .await?;
        *self
            .vote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(*vote);
        Ok(())
    }

    /// The saved vote, uncommitted: a node that led when it stopped restarts as a follower
    /// that has voted in that term, not as its leader.
    ///
    /// openraft 0.9 makes a node whose saved vote is its own committed one leader again at
    /// startup. That assumes its log holds everything it sent as leader, but a leader sends
    /// entries to followers before its own flush of them ends (they are read from sled's
    /// memory), and a quorum of followers can commit them meanwhile. Killed before that flush,
    /// a restored leader would append different entries at the same indexes in the same term,
    /// and the followers, which compare log ids only, would keep theirs: two state machines
    /// that differ. The crash tier found it (watch streams that differ, a stale read). As a
    /// follower the node gets what it lacks from the next leader, as in etcd, where a
    /// restarted node is always a follower. The vote keeps its term and candidate, so the node
    /// still votes for no one else in that term.
    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        let vote = self.saved_vote().await?;
        Ok(vote.map(|vote| Vote::new(vote.leader_id.term, vote.leader_id.node_id)))
    }

    /// Records the commit point without a flush of its own: it only saves re-applying entries
    /// after a restart, and a stale value is safe (openraft re-derives the commit point), so it
    /// rides along with the next flush instead of costing one per commit.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // An error at this failpoint leaves the commit point unrecorded, as a crash before the
        // flush that would carry it does.
        if troupe_failpoints::hit("raft.committed.save").is_err() {
            return Ok(());
        }
        // A small in-memory insert: done inline, it costs less than a hand-off to a thread.
        let bytes = serde_json::to_vec(&committed).map_err(write_io)?;
        self.meta.insert(COMMITTED_KEY, bytes).map_err(write_io)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let meta = self.meta.clone();
        blocking(&self.guard, move || {
            Ok(Self::read_meta::<Option<LogId>>(&meta, COMMITTED_KEY)?.flatten())
        })
        .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        troupe_failpoints::hit("raft.log.append").map_err(write_io)?;
        let mut batch = sled::Batch::default();
        let entries: Vec<Entry> = entries.into_iter().collect();
        for entry in &entries {
            let bytes = serde_json::to_vec(entry).map_err(write_io)?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        let upto = entries.last().map(|entry| entry.log_id);
        let early = self.appended_as_leader(&entries);
        // Into sled's memory now (so reads see it), onto disk by the flusher.
        self.log.apply_batch(batch).map_err(write_io)?;
        {
            let mut recent = self.recent();
            for entry in entries {
                recent.push(entry);
            }
        }
        let stopped = || std::io::Error::other("the raft log flusher has stopped");
        let (done, early_callback) = if early {
            (FlushDone::Published, Some(callback))
        } else {
            (FlushDone::Raft(callback), None)
        };
        if let Err(job) = self.queue_flush(FlushJob { upto, done }) {
            if let FlushDone::Raft(callback) = job.done {
                callback.log_io_completed(Err(stopped()));
            }
            if let Some(callback) = early_callback {
                callback.log_io_completed(Err(stopped()));
            }
            return Err(write_io(stopped()));
        }
        // A leader's own entries: replicated now, counted toward a commit only once the flush
        // publishes them (`super::durable`).
        if let Some(callback) = early_callback {
            callback.log_io_completed(Ok(()));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent().truncate(log_id.index);
        let (log, meta) = (self.log.clone(), self.meta.clone());
        let upto = blocking(&self.guard, move || {
            troupe_failpoints::hit("raft.log.truncate").map_err(write_io)?;
            Self::remove_range(&log, log_id.index, None)?;
            match log_id.index.checked_sub(1) {
                Some(previous) => Self::log_id_at(&log, &meta, previous),
                None => Ok(None),
            }
        })
        .await?;
        // Through the flusher, so the position it publishes follows the log's changes in order.
        let (reply, flushed) = tokio::sync::oneshot::channel();
        let done = FlushDone::Store(reply);
        if self.queue_flush(FlushJob { upto, done }).is_err() {
            return Err(write_io(std::io::Error::other(
                "the raft log flusher has stopped",
            )));
        }
        match flushed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(write_io(std::io::Error::other(error))),
            Err(_) => Err(write_io(std::io::Error::other(
                "the raft log flusher has stopped",
            ))),
        }
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.recent().purge(log_id.index);
        troupe_failpoints::hit("raft.log.purge").map_err(write_io)?;
        // openraft 0.9 issues the purge after a snapshot install at the same time as the
        // install (following_handler::install_full_snapshot: its PurgeLog waits for nothing).
        // Had the purge point reached disk first and the node died before the snapshot was
        // stored, it would restart with its log purged past its snapshot, which openraft
        // refuses with a panic at startup (the crash tier hit it once in 30 cycles). So a
        // purge point is written, and its entries deleted, only once a stored snapshot covers
        // it; until then it is kept in memory, where `get_log_state` reports it.
        if *self.snapshot_covers.borrow() >= Some(log_id) {
            return self.record_purge(log_id);
        }
        {
            let mut pending = self
                .pending_purge
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *pending = (*pending).max(Some(log_id));
        }
        let mut store = self.clone();
        let mut covers = self.snapshot_covers.clone();
        tokio::spawn(async move {
            // Ends without writing when the state machine store closes first; what was pending
            // is then not on disk, and a restart finds the older purge point.
            if covers.wait_for(|at| *at >= Some(log_id)).await.is_ok() {
                if let Err(error) = store.record_purge(log_id) {
                    tracing::warn!(%error, upto = log_id.index, "recording a purge failed; the entries stay until the next purge");
                }
            }
        });
        Ok(())
    }
}
