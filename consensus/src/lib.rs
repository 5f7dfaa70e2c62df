//! troupe-consensus: the cluster's metadata, ordered by Raft.
//!
//! - [`tasks`]: task priorities and the scheduling order every node derives from them.
//!
//! The Raft log store, state machine, network and the `Metadata` facade join this crate
//! with the consensus issue; other crates reach it only through that facade.

pub mod tasks;
