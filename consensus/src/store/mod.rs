//! Raft storage on sled, behind openraft's v2 storage traits: [`LogStore`] holds the log, the
//! vote and the committed index; [`StateMachineStore`] applies entries to the metadata and
//! keeps the current snapshot. Nothing is acknowledged before sled has flushed it.
//!
//! Another engine can replace sled by implementing the same two traits; nothing outside this
//! module knows sled is there.

mod log_store;
mod state_machine;

use std::path::Path;

pub use log_store::LogStore;
pub use state_machine::{Applied, StateMachineStore};

use crate::types::StorageError;

/// Trees inside the one sled database of a node.
const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const SNAPSHOT_TREE: &str = "raft_snapshot";

/// Opens (or creates) the node's Raft storage under `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StorageError> {
    let db = sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| openraft::StorageIOError::read(&e))?;
    let log_store = LogStore::new(&db)?;
    let state_machine = StateMachineStore::new(&db)?;
    Ok((log_store, state_machine))
}

/// Runs blocking sled work off the async executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) => {
            Err(openraft::StorageIOError::write(&std::io::Error::other(join.to_string())).into())
        }
    }
}
