//! [`Metadata`]: the only way other crates touch Raft. Propose a write from any node (a
//! follower forwards it once to the leader), read at the consistency you need, change
//! membership, and see the node's Raft status. No openraft type crosses this boundary.
//!
//! This file holds the configuration and the node's lifecycle (start, initialise, stop); each
//! concern has a file of its own: [`leader`] (finding the leader, forwarding, waiting out an
//! election), [`writes`], [`reads`] (with watches and past states), [`membership`] and
//! [`status`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use serde::Serialize;
use tokio::sync::{watch, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use troupe_proto::v1::raft_peer_client::RaftPeerClient;
use troupe_proto::v1::raft_peer_server::RaftPeerServer;
use troupe_transport::{Lane, Membership, PeerTransport};

use crate::error::MetadataError;
use crate::metadata::{MetadataState, Outcome, Proposal};
use crate::network::client::PeerNetworkFactory;
use crate::network::server::{ForwardedReadIndex, ForwardedWrite, LeaderSilence, RaftPeerService};
use crate::network::wire;
use crate::proposer::{Proposer, WriteFailure};
use crate::removal::Removal;
use crate::runtime::{spawn_until_stopped, RaftRuntime};
use crate::store::{self, Applied};
use crate::types::{NodeAddr, NodeId, TypeConfig};
use crate::watch::{ResyncingWatch, Watch, WatchError};

mod leader;
mod membership;
mod reads;
mod status;
mod writes;

use leader::Attempt;
use writes::WriteIds;

pub use reads::{HistoryError, ReadConsistency};
pub use status::{RaftStatus, Role};
pub use writes::ASSIGNED_ID_PREFIX;

/// Timings and sizes of one node's Raft. Defaults: heartbeat 100 ms, election timeout
/// 150-300 ms. openraft 0.9 gives each AppendEntries RPC one heartbeat interval to answer, so a
/// 50 ms heartbeat timed out replication under load on a busy 2-core machine and set off
/// elections; 100 ms did not. A follower that knows a leader waits for the leader's lease
/// (`election_timeout_max`) plus its own election timeout before it stands, so the time to a
/// new leader after a crash is about 300 ms + 150-300 ms at these defaults.
#[derive(Debug, Clone)]
pub struct MetadataConfig {
    pub node_id: NodeId,
    pub api_addr: String,
    pub peer_addr: String,
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot (and allow purging the log) after this many entries.
    pub snapshot_every_entries: u64,
    /// Entries kept behind the snapshot so slightly lagging followers need no snapshot.
    pub keep_entries_after_snapshot: u64,
    /// Connect and per-RPC limit for forwarded writes and reads.
    pub forward_timeout: Duration,
    /// Changes kept for watches to replay; older ones need a resync.
    pub watch_history: usize,
}

impl MetadataConfig {
    pub fn election_timings(&self) -> crate::election::Timings {
        crate::election::Timings {
            election_timeout_min: self.election_timeout_min,
            election_timeout_max: self.election_timeout_max,
        }
    }

    pub fn new(node_id: NodeId, api_addr: String, peer_addr: String, data_dir: PathBuf) -> Self {
        Self {
            node_id,
            api_addr,
            peer_addr,
            data_dir,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            snapshot_every_entries: 10_000,
            keep_entries_after_snapshot: 1_000,
            forward_timeout: Duration::from_secs(5),
            watch_history: store::DEFAULT_WATCH_HISTORY,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config, MetadataError> {
        let config = openraft::Config {
            cluster_name: "troupe".into(),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            // An entry carries a batch of proposals (up to 512 KiB), so fewer per message.
            max_payload_entries: 64,
            max_in_snapshot_log_to_keep: self.keep_entries_after_snapshot,
            // Elections are started by crate::election, after a pre-vote.
            enable_elect: false,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| MetadataError::Config(e.to_string()))
    }
}

pub struct Metadata {
    config: MetadataConfig,
    raft: Raft<TypeConfig>,
    /// Where Raft's tasks run; the peer port's server runs here too.
    runtime: Arc<RaftRuntime>,
    applied: Arc<RwLock<Applied>>,
    revisions: watch::Receiver<u64>,
    applied_indexes: watch::Receiver<u64>,
    snapshot_revision: Arc<std::sync::atomic::AtomicU64>,
    proposer: Proposer,
    /// The facade's own tasks on Raft's runtime (the proposer and its writes, the elector,
    /// the leader-change counter, the removal watcher, the held-commit releaser): each holds
    /// the tracker's guard and ends on `stop`; shutdown waits for the last.
    tasks: TaskTracker,
    stop: CancellationToken,
    history: store::History,
    /// Alive while any sled handle is; shutdown waits for it so the database is closed.
    open_handles: std::sync::Weak<()>,
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
    transport: Arc<PeerTransport>,
    removal: Arc<Removal>,
    silence: Arc<LeaderSilence>,
    write_ids: WriteIds,
}

/// How long shutdown waits for storage handles held by Raft's tasks to be released.
const STORAGE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Metadata {
    /// Opens the node's storage (rejoining with any Raft state already in `data_dir`) and
    /// starts its Raft. Serve [`Metadata::peer_service`] on the peer address, behind the
    /// transport's peer gate with [`Metadata::membership`]. Raft and forwarded writes reach
    /// peers through `transport`.
    pub async fn start(
        config: MetadataConfig,
        transport: Arc<PeerTransport>,
    ) -> Result<Self, MetadataError> {
        let raft_config = Arc::new(config.raft_config()?);
        let raft_dir = config.data_dir.join("raft");
        let (mut log_store, mut state_machine) =
            store::open_with_history(&raft_dir, config.watch_history).map_err(|e| {
                MetadataError::StorageOpen {
                    path: raft_dir.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
        let durable =
            store::persist_in_parallel(&mut log_store, &mut state_machine, config.node_id);
        let applied = state_machine.applied();
        let revisions = state_machine.revisions();
        let applied_indexes = state_machine.applied_indexes();
        let snapshot_revision = state_machine.snapshot_revision();
        let history = state_machine.history();
        let open_handles = state_machine.open_handles();
        let removal = Arc::new(Removal::new(config.node_id));
        let network = PeerNetworkFactory {
            transport: transport.clone(),
            removal: removal.clone(),
            durable: Some(durable.clone()),
        };
        // Raft's tasks (the core, replication, the proposer) are spawned on its own runtime:
        // see [`crate::runtime`].
        let runtime = Arc::new(RaftRuntime::start(config.node_id)?);
        let leader_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let silence = Arc::new(LeaderSilence::default());
        let (node_id, changes, removed) = (
            config.node_id,
            Arc::downgrade(&leader_changes),
            removal.clone(),
        );
        let (elector_transport, elector_silence, timings) = (
            transport.clone(),
            silence.clone(),
            config.election_timings(),
        );
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        let (tracker, stopping) = (tasks.clone(), stop.clone());
        let (raft, proposer) = runtime
            .handle()
            .spawn(async move {
                let raft = Raft::new(node_id, raft_config, network, log_store, state_machine)
                    .await
                    .map_err(|e| MetadataError::Raft(e.to_string()))?;
                let proposer = Proposer::start(raft.clone(), &tracker, stopping.clone());
                spawn_until_stopped(
                    &tracker,
                    &stopping,
                    count_leader_changes(raft.metrics(), changes),
                );
                let elector = crate::election::Elector {
                    node_id,
                    raft: raft.clone(),
                    transport: elector_transport,
                    silence: elector_silence,
                    removal: removed.clone(),
                    timings,
                };
                spawn_until_stopped(&tracker, &stopping, crate::election::run(elector));
                spawn_until_stopped(&tracker, &stopping, removed.run(raft.clone()));
                spawn_until_stopped(
                    &tracker,
                    &stopping,
                    release_held_commits(raft.clone(), durable),
                );
                Ok::<_, MetadataError>((raft, proposer))
            })
            .await
            .map_err(|e| MetadataError::Raft(format!("starting Raft failed: {e}")))??;
        let write_ids = WriteIds::new(config.node_id);
        Ok(Self {
            config,
            raft,
            runtime,
            applied,
            revisions,
            applied_indexes,
            snapshot_revision,
            proposer,
            tasks,
            stop,
            history,
            open_handles,
            leader_changes,
            write_ids,
            transport,
            removal,
            silence,
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// The runtime Raft runs on. Serve the peer port here (enter it before making the port's
    /// listener and connections), so that heartbeats are not queued behind client work.
    pub fn raft_runtime(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }

    /// The `troupe.v1.RaftPeer` service for the peer port.
    pub fn peer_service(&self) -> RaftPeerServer<RaftPeerService> {
        RaftPeerServer::new(RaftPeerService::new(
            self.raft.clone(),
            self.proposer.clone(),
            self.transport.refusals().clone(),
            self.removal.clone(),
            self.silence.clone(),
            self.config.election_timings(),
        ))
        .max_decoding_message_size(crate::network::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::network::MAX_MESSAGE_BYTES)
    }

    /// Whether a node may use the peer port: a voter or a learner of this node's newest
    /// membership (committed or not, so a node being added is one as soon as the leader
    /// appends it). A node with no membership yet (about to be initialised or added) lets in
    /// any node of its CA.
    pub fn membership(&self) -> Membership {
        let metrics = self.raft.metrics();
        Arc::new(move |node: NodeId| {
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let mut nodes = membership.nodes().peekable();
            nodes.peek().is_none() || membership.get_node(&node).is_some()
        })
    }

    /// The transport this node's Raft uses.
    pub fn transport(&self) -> &Arc<PeerTransport> {
        &self.transport
    }

    fn this_node(&self) -> NodeAddr {
        NodeAddr {
            api_addr: self.config.api_addr.clone(),
            peer_addr: self.config.peer_addr.clone(),
        }
    }

    /// Forms the cluster with these voters. On a cluster that already has a membership it
    /// does nothing, so it is safe to repeat.
    pub async fn initialize(
        &self,
        members: BTreeMap<NodeId, NodeAddr>,
    ) -> Result<(), MetadataError> {
        let mut members = members;
        members
            .entry(self.config.node_id)
            .or_insert_with(|| self.this_node());
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(error) => Err(MetadataError::Raft(error.to_string())),
        }
    }

    /// Resolves when the Raft core stops without being asked to (a storage failure, a panic),
    /// with the reason. It never resolves while the core runs.
    pub async fn stopped(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(fatal) = &metrics.borrow_and_update().running_state {
                return format!("the Raft core has stopped: {fatal}");
            }
            if metrics.changed().await.is_err() {
                return "the Raft core has stopped (a panic or a storage failure, see the log)"
                    .to_owned();
            }
        }
    }

    /// Stops Raft, then waits until every storage handle is released, so the database is
    /// flushed and closed (and its directory can be reopened) when this returns. Every
    /// acknowledged write was flushed when it was acknowledged.
    pub async fn shutdown(&self) -> Result<(), MetadataError> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| MetadataError::Raft(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + STORAGE_CLOSE_TIMEOUT;
        // The facade's tasks end on the signal; the last one's guard tells the tracker.
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            return Err(MetadataError::Timeout {
                what: "raft's helper tasks to end".into(),
                millis: STORAGE_CLOSE_TIMEOUT.as_millis() as u64,
            });
        }
        // sled releases its directory lock when its last handle and its flusher thread are
        // gone, and says so to no one: this looks every 5 ms.
        let mut poll = tokio::time::interval(Duration::from_millis(5));
        let raft_dir = self.config.data_dir.join("raft");
        while self.open_handles.strong_count() > 0 || !store::lock_is_free(&raft_dir) {
            if tokio::time::Instant::now() >= deadline {
                return Err(MetadataError::Timeout {
                    what: "raft storage to close".into(),
                    millis: STORAGE_CLOSE_TIMEOUT.as_millis() as u64,
                });
            }
            poll.tick().await;
        }
        Ok(())
    }
}

/// Sends a heartbeat when a flush reaches a commit point that was held back from followers
/// (see [`store::Durable`]), so they learn it now rather than at the next heartbeat. Ends
/// with the log store or the Raft core.
async fn release_held_commits(raft: Raft<TypeConfig>, durable: store::Durable) {
    let mut state = durable.subscribe();
    while durable.released(&mut state).await.is_ok() {
        if raft.trigger().heartbeat().await.is_err() {
            return;
        }
    }
}

/// Counts changes of the known leader until the counter is dropped or Raft stops.
async fn count_leader_changes(
    mut metrics: watch::Receiver<openraft::RaftMetrics<NodeId, NodeAddr>>,
    counter: std::sync::Weak<std::sync::atomic::AtomicU64>,
) {
    let mut leader = metrics.borrow().current_leader;
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow().current_leader;
        if now != leader {
            leader = now;
            let Some(counter) = counter.upgrade() else {
                return;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
