//! troupe-actors: the per-node actor tree.
//!
//! - [`lanes`]: the batcher's bounded priority lanes, the queueing core of every Batcher.
//!
//! The actors themselves (NodeSupervisor, Batcher, InferenceWorker, MetadataSync, Health,
//! Router) join this crate with the node issue.

pub mod lanes;
