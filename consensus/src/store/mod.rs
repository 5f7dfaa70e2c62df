//! Raft storage on sled, behind openraft's v2 storage traits: [`LogStore`] holds the log, the
//! vote and the committed index; [`StateMachineStore`] applies entries to the metadata and
//! keeps the current snapshot. Nothing is acknowledged before sled has flushed it.
//!
//! Another engine can replace sled by implementing the same two traits; nothing outside this
//! module knows sled is there.

mod durable;
mod history;
mod log_store;
mod state_machine;

use std::path::Path;

pub use durable::{Durable, DurableState};
pub use history::{History, Live, Replay};
pub use log_store::LogStore;
pub use state_machine::{Applied, StateMachineStore};

use crate::types::StorageError;

/// Trees inside the one sled database of a node.
const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const SNAPSHOT_TREE: &str = "raft_snapshot";

/// sled's segment size. sled writes any tree node larger than a quarter segment as a separate
/// blob file (create, write, fsync). Log entries carry batches of proposals, so the leaves of the
/// log tree are large; with sled's default 512 KiB segments most log writes became blobs.
const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

/// Changes kept for watches to replay, by default.
pub const DEFAULT_WATCH_HISTORY: usize = 10_000;

/// Opens (or creates) the node's Raft storage under `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StorageError> {
    open_with_history(dir, DEFAULT_WATCH_HISTORY)
}

/// Makes a node's leader replicate its appends while it flushes them, with the leader's own
/// copy counted toward a commit only once it is on disk (see [`Durable`]). What a node runs;
/// without it a leader flushes first and replicates after.
pub fn persist_in_parallel(
    log: &mut LogStore,
    state_machine: &mut StateMachineStore,
    node_id: crate::types::NodeId,
) -> Durable {
    let durable = log.persist_in_parallel(node_id);
    state_machine.apply_when_durable(durable.clone());
    durable
}

/// As [`open`], keeping `watch_history` changes for watches to replay.
pub fn open_with_history(
    dir: &Path,
    watch_history: usize,
) -> Result<(LogStore, StateMachineStore), StorageError> {
    // A store closed in this process a moment ago can still hold the lock (see
    // [`lock_is_free`]): wait for it a little before calling the directory taken.
    let waited = std::time::Instant::now();
    while !lock_is_free(dir) && waited.elapsed() < LOCK_WAIT {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let db = open_db(dir).map_err(|e| openraft::StorageIOError::read(&e))?;
    let guard = OpenGuard::default();
    let state_machine =
        StateMachineStore::new(&db, dir.join("snapshots"), watch_history, guard.clone())?;
    let log_store = LogStore::new(&db, guard, state_machine.snapshot_covers())?;
    Ok((log_store, state_machine))
}

/// The sled database in `dir` as the stores configure it, opened at once: it fails if
/// another open database holds the directory's lock.
pub fn open_db(dir: &Path) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .segment_size(SEGMENT_BYTES)
        .open()
}

/// How long [`open_with_history`] waits for a lock held by a store closing in this process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether no open sled database holds the lock on the database file in `dir` (or there is
/// no such file yet).
///
/// Dropping sled's last handle does not release the lock at once: writes still running on
/// sled's own thread pool hold the file until they end. So a node restarted in place, in one
/// process, waits for this rather than for its handles alone; otherwise the reopen fails now
/// and then with "could not acquire lock".
pub fn lock_is_free(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir.join("db")) else {
        return true;
    };
    match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            true
        }
        Err(_) => false,
    }
}

/// Counts every live holder of a sled handle: the stores, their clones, and sled work in
/// flight. When it drops to zero the database is closed and its file lock released.
pub type OpenGuard = std::sync::Arc<()>;

/// Runs blocking sled work off the async executor. The work holds `guard` until it ends, so
/// a store is not reported closed while a flush is still running.
async fn blocking<T: Send + 'static>(
    guard: &OpenGuard,
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    let guard = guard.clone();
    let work = move || {
        let _guard = guard;
        work()
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) => {
            Err(openraft::StorageIOError::write(&std::io::Error::other(join.to_string())).into())
        }
    }
}
