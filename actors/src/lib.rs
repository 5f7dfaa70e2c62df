//! troupe-actors: the per-node actor tree (ractor).
//!
//! - [`supervisor`]: NodeSupervisor, the root; [`ActorTree`] is how the node starts and stops it.
//! - [`batcher`]: one Batcher per loaded model version: priority lanes, flush rule, workers.
//! - [`worker`]: InferenceWorker, forward passes on a dedicated thread.
//! - [`sync`]: MetadataSync, Raft watch to loaded models and task lanes.
//! - [`health`]: Health, SERVING or NOT_SERVING and why.
//! - [`table`]: the serving table request handlers route with.
//! - [`lanes`]: the bounded priority queues a batcher flushes from.
//! - [`restart`]: restart intensity. [`stats`]: the tree as the shell shows it.
//! - [`failpoints`]: fault injection for tests (feature `failpoints`).

pub mod batcher;
pub mod config;
pub mod error;
pub mod failpoints;
pub mod health;
pub mod lanes;
pub mod restart;
pub mod stats;
pub mod supervisor;
pub mod sync;
pub mod table;
pub mod worker;

pub use batcher::{BatcherCounters, BatcherHandle, EmbedJob, JobResult};
pub use config::ServingConfig;
pub use error::ServeError;
pub use health::NodeHealth;
pub use stats::ActorInfo;
pub use supervisor::{ActorTree, ArtifactFetcher, ModelLoader, TreeArgs, TreeView};
pub use table::{ModelKey, Route, ServingTable};
