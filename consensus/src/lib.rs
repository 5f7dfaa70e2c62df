//! troupe-consensus: the cluster's metadata, ordered by Raft.
//!
//! - [`tasks`]: task priorities and the scheduling order every node derives from them.
//! - [`metadata`]: the state machine's rules: commands, CAS, idempotency, revisions.
//! - [`types`]: openraft's type configuration.
//! - [`store`]: the sled-backed log store and state machine behind openraft's traits.
//!
//! The Raft log store, state machine, network and the `Metadata` facade join this crate
//! with the consensus issue; other crates reach it only through that facade.

pub mod metadata;
pub mod store;
pub mod tasks;
pub mod types;
