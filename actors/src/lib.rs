//! troupe-actors: the per-node actor tree (ractor).
//!
//! - [`supervisor`]: NodeSupervisor, the root; [`ActorTree`] is how the node starts and stops it.
//! - [`batcher`]: one Batcher per loaded model version: priority lanes, flush rule, workers.
//! - [`worker`]: the batcher's worker threads, where forward passes run.
//! - [`sync`]: MetadataSync, Raft watch to loaded models and task lanes.
//! - [`health`]: Health, SERVING or NOT_SERVING and why, and the heartbeats to peers.
//! - [`rollout`]: RolloutController, cluster-atomic activation on the Raft leader.
//! - [`dispatch`]: one request's way through the cluster: candidates, attempts, deadline.
//! - [`router`]: the order in which nodes are tried for a request (routing strategies).
//! - [`table`]: the serving table request handlers route with.
//! - [`peers`]: the peer table Health's heartbeats keep (state, RTT, load, versions, Raft).
//! - [`lanes`]: the bounded priority queues a batcher flushes from.
//! - [`restart`]: restart intensity. [`stats`]: the tree as the shell shows it.
//! - [`failpoints`]: fault injection for tests (feature `failpoints`).

pub mod batcher;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod failpoints;
pub mod health;
pub mod lanes;
pub mod peers;
pub mod restart;
pub mod rollout;
pub mod router;
pub mod scheduler;
pub mod stats;
pub mod supervisor;
pub mod sync;
pub mod table;
pub mod worker;

pub use batcher::{BatcherCounters, BatcherHandle, EmbedJob, GenEvent, GenJob, JobResult};
pub use config::{GossipConfig, ServingConfig};
pub use dispatch::{Ask, Dispatcher, Failure, Hops};
pub use error::ServeError;
pub use health::{HeartbeatReply, NodeHealth, PeerProbe};
pub use peers::{InFlight, OwnedInFlightGuard, PeerState, PeerTable, PeerView, ServedVersion};
pub use router::{Candidate, ForwardGuard, Router, Strategy};
pub use stats::ActorInfo;
pub use supervisor::{ActorTree, ArtifactFetcher, ModelLoader, RestartError, TreeArgs, TreeView};
pub use table::{ModelKey, Route, ServingTable};
