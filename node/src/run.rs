//! Starting and stopping a node: `troupe_node::run(config, shutdown)` is what `troupe node` calls
//! and what tests call, so both start nodes the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::InterceptorLayer;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use troupe_actors::{ActorTree, NodeHealth, Router, TreeArgs, TreeView};
use troupe_consensus::Metadata;
use troupe_models::artifact::ArtifactStore;
use troupe_proto::v1::admin_server::AdminServer;
use troupe_proto::v1::artifacts_server::ArtifactsServer;
use troupe_proto::v1::inference_server::InferenceServer;
use troupe_proto::v1::peer_server::PeerServer;
use troupe_transport::token::Jwks;
use troupe_transport::{Identity, PeerTransport, TlsState, Verifier};

use crate::background::Background;
use crate::config::{ConfigError, NodeConfig};
use crate::forward::Forwarder;
use crate::metrics::NodeMetrics;
use crate::server::admin::AdminService;
use crate::server::artifacts::ArtifactService;
use crate::server::heartbeat::HeartbeatResponder;
use crate::server::inference::{InferenceCore, InferenceService, RoutingParts};
use crate::server::peer::PeerService;

/// What the API port serves (and its reflection lists).
const API_SERVICES: &[&str] = &[
    "troupe.v1.Admin",
    "troupe.v1.Inference",
    "grpc.health.v1.Health",
];

/// Largest header block an API call may send.
const API_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// The service name grpc.health.v1 reports inference readiness under ("" is the node).
pub const INFERENCE_SERVICE: &str = "troupe.v1.Inference";

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
    #[error("cannot start the actor tree: {0}")]
    Actors(String),
    #[error(
        "{0} (fix the files, or make new ones with `troupe certs init` / `troupe certs add-node`)"
    )]
    Tls(#[from] troupe_transport::TlsError),
    #[error(
        "API token keys: {0} (fix the file `troupe certs init` wrote, or point [auth] jwks at one)"
    )]
    Auth(String),
    #[error("{0}; the node has stopped: fix the disk (free space, replace the device) and start it again; its peers keep the acknowledged writes")]
    RaftStopped(String),
    #[error("certificate {path} names {named}, but this is node {id}: use node-{id}.crt and node-{id}.key")]
    WrongIdentity {
        path: String,
        named: String,
        id: u64,
    },
}

/// A started node. Dropping it does not stop it; call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub api_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: SocketAddr,
    /// The OpenAI-compatible HTTP API, when the config names an `http` address.
    pub http_addr: Option<SocketAddr>,
    pub metadata: Arc<Metadata>,
    /// The actor tree as request handlers see it (serving table, actors, health).
    pub tree: TreeView,
    /// Peer connections, TLS material and refusal counts.
    pub transport: Arc<PeerTransport>,
    /// Health publishing, the metrics endpoint, the settings follower, the certificate and
    /// JWKS reloaders and the SIGHUP listener: ended and awaited as the node stops.
    background: Background,
    actors: ActorTree,
    drain_timeout: Duration,
    api_stop: oneshot::Sender<()>,
    stopping: tokio::sync::watch::Sender<bool>,
    api_task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The OpenAI HTTP server: its stop signal and task.
    http: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
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
    let metrics_listener = bind("metrics", &config.metrics).await?;
    let http_listener = match &config.http {
        Some(addr) => Some(bind("http", addr).await?),
        None => None,
    };
    let api_addr = local_addr("api", &api_listener)?;
    let peer_addr = local_addr("peer", &peer_listener)?;
    let metrics_addr = local_addr("metrics", &metrics_listener)?;
    let http_addr = http_listener
        .as_ref()
        .map(|listener| local_addr("http", listener))
        .transpose()?;
    let mut config = config;
    config.api = api_addr.to_string();
    config.peer = peer_addr.to_string();
    config.metrics = metrics_addr.to_string();
    config.http = http_addr.map(|addr| addr.to_string());
    raise_fd_limit(2 * config.limits.max_connections as u64 + 1024);
    let node_metrics = Arc::new(NodeMetrics::default());
    // Each file reloader (certificates, JWKS) gets a notify that SIGHUP pulls.
    let mut reload_now = Vec::new();
    let background = Background::new();
    let transport = transport(&config, &background, &mut reload_now)?;
    let verifier = token_verifier(&config, &background, &mut reload_now)?;
    on_sighup(&background, reload_now);

    let metadata = Arc::new(Metadata::start(config.metadata_config(), transport.clone()).await?);
    tracing::info!(node_id = config.id, %api_addr, %peer_addr, %metrics_addr, http_addr = ?http_addr, data_dir = %config.data_dir.display(), "node started");

    // The pool is process-wide: the first node of a process sizes it. Its threads run at a
    // lower priority than the async runtime's, so Raft and heartbeats never wait behind a
    // forward pass.
    let nice = config.serving.compute_nice;
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(config.serving.compute_threads)
        .start_handler(move |_| {
            if let Err(error) = troupe_models::priority::lower_current_thread_priority(nice) {
                tracing::warn!(%error, nice, "cannot lower a compute thread's priority");
            }
        })
        .build_global();
    let store = ArtifactStore::new(config.model_store_dir());
    // Pushes cut off by a crash left staging directories; no push is running yet.
    let leftovers = store.remove_leftover_staging();
    if leftovers > 0 {
        tracing::info!(
            count = leftovers,
            "removed staging directories of pushes that never finished"
        );
    }
    let peers = Arc::new(troupe_actors::PeerTable::default());
    let actors = ActorTree::start(TreeArgs {
        node_id: config.id,
        config: config.serving_config(),
        metadata: metadata.clone(),
        loader: crate::loader::for_device(
            &config.serving.device,
            troupe_models::Precision::from_name(&config.serving.precision).unwrap_or_default(),
        ),
        fetcher: Arc::new(crate::pull::PeerPuller {
            node_id: config.id,
            metadata: metadata.clone(),
            store: store.clone(),
            bandwidth: (config.serving.blob_bandwidth_mbps > 0.0).then(|| {
                Arc::new(tokio::sync::Mutex::new(crate::pull::TokenBucket::new(
                    config.serving.blob_bandwidth_mbps * 1e6,
                )))
            }),
            peers: peers.clone(),
            received: node_metrics.blob_bytes_received.clone(),
            transport: transport.clone(),
        }),
        store: store.clone(),
        peers,
        probe: Arc::new(crate::gossip::GrpcPeerProbe::new(
            config.id,
            transport.clone(),
        )),
        gossip: config.gossip_config(),
    })
    .await
    .map_err(|e| NodeError::Actors(e.to_string()))?;
    let tree = actors.view();
    let (limits, follow_settings) =
        crate::live::follow(metadata.clone(), crate::live::Sections::of(&config)).await;
    background.spawn("cluster settings", follow_settings);
    let inference_core = Arc::new(InferenceCore::new(
        config.id,
        tree.clone(),
        limits,
        RoutingParts {
            router: Router::new(config.routing_strategy()),
            forwarder: Forwarder::new(
                config.id,
                transport.clone(),
                config.limits.max_message_bytes,
                node_metrics.clone(),
            ),
            backup: config.cluster.backup,
            metrics: node_metrics.clone(),
        },
    ));
    let (peer_stop, peer_stopped) = oneshot::channel::<()>();
    let peer_service = metadata.peer_service();
    let artifact_service = ArtifactsServer::new(ArtifactService::new(
        ArtifactStore::new(config.model_store_dir()),
        node_metrics.blob_bytes_sent.clone(),
    ));
    let peer_grpc = PeerServer::new(PeerService {
        inference: inference_core.clone(),
        serving: tokio::runtime::Handle::current(),
        heartbeats: HeartbeatResponder::new(
            config.id,
            metadata.clone(),
            tree.clone(),
            config.cluster.backup,
        ),
    })
    .max_decoding_message_size(config.limits.max_message_bytes);
    // Every peer RPC passes the gate: only member nodes, proven by certificate.
    let peer_gate = InterceptorLayer::new(transport.peer_gate(metadata.membership()));
    // The peer port is served on Raft's runtime (see troupe_consensus::runtime): its accept
    // loop, handshakes and connections are made there, the listener moved to its reactor.
    let raft_runtime = metadata.raft_runtime().clone();
    let entered = raft_runtime.enter();
    let peer_listener = peer_listener
        .into_std()
        .and_then(TcpListener::from_std)
        .map_err(|source| NodeError::Bind {
            what: "peer",
            addr: peer_addr.to_string(),
            source,
        })?;
    let peer_incoming = transport.incoming(
        peer_listener,
        "peer",
        config.conn_limits(),
        node_metrics.peer_conns.clone(),
    );
    drop(entered);
    let (keepalive, keepalive_timeout) = (
        Duration::from_secs(config.limits.keepalive_interval_s),
        Duration::from_secs(config.limits.keepalive_timeout_s),
    );
    let peer_task = raft_runtime.spawn(async move {
        Server::builder()
            // Pings find a dead peer whose connection would otherwise look idle but open.
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive_timeout))
            .layer(troupe_transport::ActivityLayer)
            .layer(peer_gate)
            .add_service(peer_service)
            .add_service(artifact_service)
            .add_service(peer_grpc)
            .serve_with_incoming_shutdown(peer_incoming, async {
                let _ = peer_stopped.await;
            })
            .await
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    background.spawn(
        "health",
        publish_health(tree.health.clone(), health_reporter),
    );
    // Both reflection versions: grpcurl and other tools still ask for v1alpha.
    let reflection_error = |e: tonic_reflection::server::Error| NodeError::Server {
        what: "reflection",
        reason: e.to_string(),
    };
    // Each port lists only the services it serves.
    let reflection_builder = |services: &[&str]| {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(troupe_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    let reflection = reflection_builder(API_SERVICES)
        .build_v1()
        .map_err(reflection_error)?;
    let reflection_alpha = reflection_builder(API_SERVICES)
        .build_v1alpha()
        .map_err(reflection_error)?;

    let limits = config.limits.clone();
    let (api_stop, api_stopped) = oneshot::channel::<()>();
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let admin = AdminServer::new(AdminService::new(
        metadata.clone(),
        stopping,
        tree.clone(),
        store,
        limits.max_setting_value_bytes,
    ))
    .max_decoding_message_size(limits.max_message_bytes);
    let inference = InferenceServer::new(InferenceService(inference_core.clone()))
        .max_decoding_message_size(limits.max_message_bytes);
    // Every API call passes the gate: a credential with the role the RPC needs.
    let api_gate = transport.api_gate(
        verifier.clone(),
        crate::server::rbac::required_role,
        node_metrics.api_denials.clone(),
    );
    // The OpenAI routes pass the same gate: the same verifier, roles and denial counts.
    let http = match http_listener {
        Some(listener) => Some(serve_http(
            listener,
            &config,
            inference_core,
            &transport,
            verifier.clone(),
            node_metrics.api_denials.clone(),
        )?),
        None => None,
    };
    let api_incoming = transport.incoming(
        api_listener,
        "api",
        config.conn_limits(),
        node_metrics.api_conns.clone(),
    );
    let api_task = tokio::spawn(async move {
        Server::builder()
            .max_concurrent_streams(Some(limits.max_concurrent_streams))
            // Room for a token up to its limit (8 KiB) and the usual headers; a larger header
            // block is answered 431 by HTTP/2 before anything reads it.
            .http2_max_header_list_size(Some(API_MAX_HEADER_LIST_BYTES))
            .http2_keepalive_interval(Some(Duration::from_secs(limits.keepalive_interval_s)))
            .http2_keepalive_timeout(Some(Duration::from_secs(limits.keepalive_timeout_s)))
            .layer(troupe_transport::ActivityLayer)
            .layer(api_gate)
            .add_service(inference)
            .add_service(admin)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .serve_with_incoming_shutdown(api_incoming, async {
                let _ = api_stopped.await;
            })
            .await
    });
    let metrics_app =
        crate::server::metrics_http::router(crate::server::metrics_http::MetricsState {
            node_id: config.id,
            metrics: node_metrics,
            tree: tree.clone(),
            metadata: metadata.clone(),
            transport: transport.clone(),
            verifier,
        });
    let stop_metrics = background.signal();
    background.spawn("metrics endpoint", async move {
        let serve = axum::serve(metrics_listener, metrics_app)
            .with_graceful_shutdown(async move { stop_metrics.cancelled().await });
        if let Err(error) = serve.await {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
    Ok(RunningNode {
        api_addr,
        peer_addr,
        metrics_addr,
        http_addr,
        metadata,
        tree,
        transport,
        background,
        actors,
        drain_timeout: Duration::from_millis(config.serving.drain_timeout_ms),
        api_stop,
        stopping: stopping_tx,
        api_task,
        http,
        peer_stop,
        peer_task,
    })
}

/// Starts the OpenAI HTTP server on `listener`: the API port's TLS material and connection
/// limits, and its gate.
fn serve_http(
    listener: TcpListener,
    config: &NodeConfig,
    inference: Arc<InferenceCore>,
    transport: &Arc<PeerTransport>,
    verifier: Option<Arc<Verifier>>,
    denials: Arc<troupe_transport::Denials>,
) -> Result<(oneshot::Sender<()>, JoinHandle<()>), NodeError> {
    use crate::server::openai;
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let listener = openai::listener::HttpListener::new(
        listener,
        openai::listener::Accept {
            tls: transport.tls_state().cloned(),
            refusals: transport.refusals().clone(),
            tracker: troupe_transport::conns::Tracker::new(config.conn_limits(), Arc::default()),
        },
    )
    .map_err(|source| NodeError::Bind {
        what: "http",
        addr,
        source,
    })?;
    let state = openai::OpenAiState {
        inference,
        auth: Arc::new(troupe_transport::api_gate::ApiAuth {
            verifier,
            rbac: openai::required_role,
            denials,
            refusals: transport.refusals().clone(),
        }),
        refusals: transport.refusals().clone(),
        max_body_bytes: config.limits.max_message_bytes,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = openai::serve(listener, state, async {
        let _ = stopped.await;
    });
    Ok((stop, task))
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
    /// Stops in a fixed order: stop accepting client RPCs (those in flight finish), drain
    /// the batchers, stop the actor tree, shut Raft down (every acknowledged write is
    /// already flushed, and sled is closed), then close the peer port.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.stopping.send_replace(true);
        let _ = self.api_stop.send(());
        let http_task = self.http.map(|(stop, task)| {
            let _ = stop.send(());
            task
        });
        join("api", self.api_task).await?;
        if let Some(mut task) = http_task {
            // Streams in flight finish, up to the drain timeout.
            if tokio::time::timeout(self.drain_timeout, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(
                    "the OpenAI HTTP server did not finish its streams in time; closing them"
                );
                task.abort();
            }
        }
        self.actors.drain(self.drain_timeout).await;
        self.actors.stop(self.drain_timeout).await;
        if !self.background.stop(self.drain_timeout).await {
            tracing::warn!(
                running = self.background.running(),
                "background tasks did not end in time"
            );
        }
        self.metadata.shutdown().await?;
        let _ = self.peer_stop.send(());
        join("peer", self.peer_task).await?;
        tracing::info!(node_id = self.metadata.node_id(), "node stopped");
        Ok(())
    }
}

/// The node's peer transport: mTLS with its certificates (checked to name this node, then
/// reloaded when the files change or on SIGHUP), or plaintext when it runs insecure.
fn transport(
    config: &NodeConfig,
    background: &Background,
    reload_now: &mut Vec<Arc<tokio::sync::Notify>>,
) -> Result<Arc<PeerTransport>, NodeError> {
    let connect_timeout = Duration::from_millis(config.routing.forward_connect_timeout_ms);
    let Some(files) = config.tls_files() else {
        tracing::warn!(
            node_id = config.id,
            "running INSECURE (--insecure): both ports are plaintext and any peer is let in; use this only on a trusted network"
        );
        return Ok(Arc::new(PeerTransport::insecure(connect_timeout)));
    };
    let state = TlsState::load(files.clone())?;
    let named = state.current().identity.clone();
    if named != Identity::Node(config.id) {
        return Err(NodeError::WrongIdentity {
            path: files.cert.display().to_string(),
            named: named.to_string(),
            id: config.id,
        });
    }
    let now = Arc::new(tokio::sync::Notify::new());
    reload_now.push(now.clone());
    background.spawn(
        "certificate reloader",
        state.reloader(config.tls_reload_interval(), now),
    );
    tracing::info!(node_id = config.id, ca = %files.ca.display(), cert = %files.cert.display(), "peer and API ports use TLS; peers need a node certificate of this CA");
    Ok(Arc::new(PeerTransport::tls(state, connect_timeout)))
}

/// Raises the open-file limit to its hard maximum, so that both ports' connection limits can
/// be reached before the process runs out of descriptors; warns when even that is below
/// `wanted`.
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    if limit.rlim_cur < wanted {
        tracing::warn!(
            open_files = limit.rlim_cur,
            wanted,
            "the open-file limit is below what [limits] max_connections needs on both ports: raise it (ulimit -n) or lower max_connections"
        );
    }
}

/// The API's token verifier with the node's JWKS, reloaded when the file changes (and on
/// SIGHUP); `None` when the node runs insecure.
fn token_verifier(
    config: &NodeConfig,
    background: &Background,
    reload_now: &mut Vec<Arc<tokio::sync::Notify>>,
) -> Result<Option<Arc<Verifier>>, NodeError> {
    let Some(path) = config.jwks_path() else {
        tracing::warn!(
            node_id = config.id,
            "the API authenticates nobody (--insecure): every caller may do everything"
        );
        return Ok(None);
    };
    let keys = if path.exists() {
        Jwks::load(&path).map_err(|e| NodeError::Auth(e.to_string()))?
    } else {
        tracing::warn!(path = %path.display(), "no JWKS: API tokens are refused until the file appears; client certificates with a role still work");
        Jwks::default()
    };
    tracing::info!(path = %path.display(), kids = ?keys.kids(), "API tokens are verified with this JWKS");
    let verifier = Arc::new(Verifier::new(config.token_policy(), keys));
    let now = Arc::new(tokio::sync::Notify::new());
    reload_now.push(now.clone());
    background.spawn(
        "JWKS reloader",
        troupe_transport::token::jwks_reloader(
            verifier.clone(),
            path,
            config.tls_reload_interval(),
            now,
        ),
    );
    Ok(Some(verifier))
}

/// One SIGHUP listener for the node: each signal asks every file reloader (certificates,
/// JWKS) to look at its files at once. Nothing to listen for on an insecure node.
fn on_sighup(background: &Background, reload_now: Vec<Arc<tokio::sync::Notify>>) {
    if reload_now.is_empty() {
        return;
    }
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => background.spawn("SIGHUP listener", async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: checking the certificate and JWKS files");
                for now in &reload_now {
                    now.notify_one();
                }
            }
        }),
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; certificate and JWKS files are still checked every few seconds")
        }
    }
}

/// Runs a node until `shutdown` completes, then stops it cleanly.
///
/// A node whose Raft core stops on its own (an fsync that failed, a full disk) stops too and
/// returns the reason, as etcd does: after a failed fsync the page cache cannot be trusted,
/// so retrying the write in place could acknowledge data that is not on disk. Restarted, the
/// node recovers from what is durable and catches up from the leader.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let node = start(config).await?;
    let metadata = node.metadata.clone();
    tokio::select! {
        () = shutdown => node.shutdown().await,
        reason = metadata.stopped() => {
            tracing::error!(%reason, "the Raft core stopped: stopping the node");
            if let Err(error) = node.shutdown().await {
                tracing::warn!(%error, "stopping after the Raft core stopped");
            }
            Err(NodeError::RaftStopped(reason))
        }
    }
}

/// Mirrors Health's verdict onto grpc.health.v1, for the node ("") and for inference.
async fn publish_health(
    mut health: tokio::sync::watch::Receiver<NodeHealth>,
    reporter: tonic_health::server::HealthReporter,
) {
    loop {
        let status = if health.borrow_and_update().serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(INFERENCE_SERVICE, status).await;
        if health.changed().await.is_err() {
            return;
        }
    }
}
