//! What the actor tree needs from the node: its configuration, the Raft metadata, and the
//! node's implementations of loading a model, fetching a version from a peer and probing a
//! peer, so this crate depends on neither a compute backend nor the peer protocol.

use std::path::Path;
use std::sync::Arc;

use troupe_consensus::Metadata;
use troupe_models::artifact::ArtifactStore;
use troupe_models::{LoadedModel, ModelError, Precision};

use crate::config::{GossipConfig, ServingConfig};
use crate::health::PeerProbe;
use crate::peers::PeerTable;

/// Loads a model directory onto the node's compute backend. The node provides it, so this
/// crate does not depend on a backend.
pub trait ModelLoader: Send + Sync + 'static {
    /// `precision` is the version's own (`None`: the loader's default, `serving.precision`).
    fn load(&self, dir: &Path, precision: Option<Precision>) -> Result<LoadedModel, ModelError>;
}

/// Gets a version's files from a peer into the node's artifact store (the node provides it;
/// it speaks the peer protocol). `holders` are the nodes that reported the version ready, to
/// be asked first. Returns the stored directory, or why no peer could.
pub trait ArtifactFetcher: Send + Sync + 'static {
    fn fetch(
        &self,
        digest: String,
        holders: Vec<u64>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<std::path::PathBuf, String>> + Send>,
    >;
}

/// Everything the tree needs from the node.
#[derive(Clone)]
pub struct TreeArgs {
    pub node_id: u64,
    pub config: ServingConfig,
    pub metadata: Arc<Metadata>,
    pub loader: Arc<dyn ModelLoader>,
    pub fetcher: Arc<dyn ArtifactFetcher>,
    pub store: ArtifactStore,
    /// How Health heartbeats peers, and how often.
    pub probe: Arc<dyn PeerProbe>,
    pub gossip: GossipConfig,
    /// The peer table Health's heartbeats fill (the node shares it with its puller).
    pub peers: Arc<PeerTable>,
}
