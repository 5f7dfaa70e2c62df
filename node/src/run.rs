//! Starting and stopping a node: `troupe::run(config, shutdown)` is what `troupe node` calls
//! and what tests call, so both start nodes the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use troupe_consensus::Metadata;
use troupe_proto::v1::admin_server::AdminServer;

use crate::config::{ConfigError, NodeConfig};
use crate::server::admin::AdminService;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {what} address {addr}: {source} (is another node using the port?)")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metadata(#[from] troupe_consensus::MetadataError),
    #[error("{what} server failed: {reason}")]
    Server { what: &'static str, reason: String },
}

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub api_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub metadata: Arc<Metadata>,
    api_stop: oneshot::Sender<()>,
    stopping: tokio::sync::watch::Sender<bool>,
    api_task: JoinHandle<Result<(), tonic::transport::Error>>,
    peer_stop: oneshot::Sender<()>,
    peer_task: JoinHandle<Result<(), tonic::transport::Error>>,
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

fn local_addr(what: &'static str, listener: &TcpListener) -> Result<SocketAddr, NodeError> {
    listener.local_addr().map_err(|source| NodeError::Bind {
        what,
        addr: "?".into(),
        source,
    })
}

/// Starts a node: binds its ports (port 0 picks a free one), opens or rejoins its Raft
/// state, and serves Admin on the API port and Raft on the peer port.
pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    config.validate()?;
    let api_listener = bind("api", &config.api).await?;
    let peer_listener = bind("peer", &config.peer).await?;
    let api_addr = local_addr("api", &api_listener)?;
    let peer_addr = local_addr("peer", &peer_listener)?;
    let mut config = config;
    config.api = api_addr.to_string();
    config.peer = peer_addr.to_string();

    let metadata = Arc::new(Metadata::start(config.metadata_config()).await?);
    tracing::info!(node_id = config.id, %api_addr, %peer_addr, data_dir = %config.data_dir.display(), "node started");

    let (peer_stop, peer_stopped) = oneshot::channel::<()>();
    let peer_service = metadata.peer_service();
    let peer_task = tokio::spawn(async move {
        Server::builder()
            .add_service(peer_service)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(peer_listener).with_nodelay(Some(true)),
                async {
                    let _ = peer_stopped.await;
                },
            )
            .await
    });
    let (api_stop, api_stopped) = oneshot::channel::<()>();
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let admin = AdminServer::new(AdminService::new(metadata.clone(), stopping));
    let api_task = tokio::spawn(async move {
        Server::builder()
            .add_service(admin)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(api_listener).with_nodelay(Some(true)),
                async {
                    let _ = api_stopped.await;
                },
            )
            .await
    });
    Ok(RunningNode {
        api_addr,
        peer_addr,
        metadata,
        api_stop,
        stopping: stopping_tx,
        api_task,
        peer_stop,
        peer_task,
    })
}

async fn join(
    what: &'static str,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
) -> Result<(), NodeError> {
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(NodeError::Server {
            what,
            reason: error.to_string(),
        }),
        Err(join) => Err(NodeError::Server {
            what,
            reason: join.to_string(),
        }),
    }
}

impl RunningNode {
    /// Stops in a fixed order: stop accepting client RPCs, shut Raft down (every
    /// acknowledged write is already flushed), then close the peer port.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.stopping.send_replace(true);
        let _ = self.api_stop.send(());
        join("api", self.api_task).await?;
        self.metadata.shutdown().await?;
        let _ = self.peer_stop.send(());
        join("peer", self.peer_task).await?;
        tracing::info!(node_id = self.metadata.node_id(), "node stopped");
        Ok(())
    }
}

/// Runs a node until `shutdown` completes, then stops it cleanly.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let node = start(config).await?;
    shutdown.await;
    node.shutdown().await
}
