//! troupe-consensus: the cluster's metadata, ordered by Raft.
//!
//! - [`tasks`]: task priorities and the scheduling order every node derives from them.
//! - [`metadata`]: the state machine's rules: commands, CAS, idempotency, revisions.
//! - [`types`]: openraft's type configuration.
//! - [`store`]: the sled-backed log store and state machine behind openraft's traits.
//! - [`network`]: Raft RPCs over tonic on the peer port, client and server.
//! - [`election`]: elections after a pre-vote, so a node that was cut off cannot unseat the
//!   leader when it returns.
//! - [`proposer`]: group commit: concurrent writes share one log entry.
//! - [`runtime`]: the threads a node's Raft runs on, apart from the serving runtime.
//! - [`facade`]: [`Metadata`], the only entry point other crates use.
//! - [`watch`]: ordered change streams with automatic resync after compaction.

// openraft's StorageError (224 bytes) is fixed by its storage traits; boxing it here would only
// add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod election;
pub mod error;
pub mod facade;
pub mod metadata;
pub mod network;
pub mod proposer;
pub mod removal;
pub mod runtime;
pub mod store;
pub mod tasks;
pub mod types;
pub mod watch;

pub use error::MetadataError;
pub use facade::{HistoryError, Metadata, MetadataConfig, RaftStatus, ReadConsistency, Role};
pub use watch::{ResyncingWatch, Watch, WatchBatch, WatchError, WatchEvent};
