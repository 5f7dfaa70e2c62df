//! [`Metadata`]: the only way other crates touch Raft. Propose a write from any node (a
//! follower forwards it once to the leader), read at the consistency you need, change
//! membership, and see the node's Raft status. No openraft type crosses this boundary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use serde::Serialize;
use tokio::sync::{watch, RwLock};
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
use crate::runtime::RaftRuntime;
use crate::store::{self, Applied};
use crate::types::{NodeAddr, NodeId, TypeConfig};
use crate::watch::{ResyncingWatch, Watch, WatchError};

/// Why [`Metadata::state_at`] cannot rebuild a revision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "revision {requested} is compacted: the oldest revision this node can rebuild is {oldest}"
    )]
    Compacted { requested: u64, oldest: u64 },
    #[error("revision {requested} is ahead of this node's applied revision {applied}")]
    Ahead { requested: u64, applied: u64 },
}

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

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Reflects every write acknowledged before the read began (read-index via the leader).
    Linearizable,
    /// This node's applied state, whatever it is.
    Stale,
    /// Waits until this node has applied at least this revision.
    AtLeast(u64),
}

/// The Raft role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

/// One node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RaftStatus {
    pub node_id: NodeId,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    /// The last applied log index.
    pub applied_index: u64,
    /// The revision of the last applied write.
    pub applied_revision: u64,
    /// The log index the current snapshot covers.
    pub snapshot_index: u64,
    /// The revision the current snapshot holds.
    pub snapshot_revision: u64,
    /// Log entries up to this index are deleted; a follower behind it needs a snapshot.
    pub purged_index: u64,
    /// The highest index a quorum of voters has (the commit index), where this node knows it:
    /// on the leader, from what each voter has acknowledged.
    pub committed_index: Option<u64>,
    /// Times this node has seen the leader change (a new leader, or none) since it started.
    pub leader_changes: u64,
    /// The longest time this node went without an AppendEntries from its leader within one
    /// term, since it started, ms. Near the election timeout, heartbeats are being delayed.
    pub longest_leader_silence_ms: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub nodes: BTreeMap<NodeId, NodeAddr>,
    /// Why this node considers itself removed from the cluster, if it does: it then neither
    /// campaigns nor serves.
    pub removed: Option<String>,
    /// Set when this node's Raft core has stopped (it panicked, or its storage failed): the
    /// node then takes no part in the cluster until it is restarted.
    pub stopped: Option<String>,
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
    history: store::History,
    /// Alive while any sled handle is; shutdown waits for it so the database is closed.
    open_handles: std::sync::Weak<()>,
    leader_changes: Arc<std::sync::atomic::AtomicU64>,
    transport: Arc<PeerTransport>,
    removal: Arc<Removal>,
    silence: Arc<LeaderSilence>,
    write_ids: WriteIds,
}

/// How one attempt of a request on this node went (see [`Metadata::with_leader`]).
enum Attempt<T> {
    Done(T),
    /// This node does not lead; the node it names does.
    Forward(NodeId),
    /// Not now: worth another attempt once the leader changes.
    Retry(MetadataError),
    Fail(MetadataError),
}

/// Why [`Metadata::with_leader`] gave up, and whether any attempt may have reached a leader.
struct Failed {
    error: MetadataError,
    reached_leader: bool,
}

/// Request ids that troupe assigns start with this; a client's may not.
pub const ASSIGNED_ID_PREFIX: &str = "~";

/// Request ids for writes whose client gave none: a random prefix per process and a counter,
/// so no two proposals anywhere share one.
struct WriteIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl WriteIds {
    fn new(node_id: NodeId) -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the operating system's randomness.
        let mut nonce = std::collections::hash_map::RandomState::new().build_hasher();
        nonce.write_u64(node_id);
        Self {
            prefix: format!("{ASSIGNED_ID_PREFIX}{node_id}.{:016x}.", nonce.finish()),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
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
        let (raft, proposer) = runtime
            .handle()
            .spawn(async move {
                let raft = Raft::new(node_id, raft_config, network, log_store, state_machine)
                    .await
                    .map_err(|e| MetadataError::Raft(e.to_string()))?;
                let proposer = Proposer::start(raft.clone());
                tokio::spawn(count_leader_changes(raft.metrics(), changes));
                tokio::spawn(crate::election::run(crate::election::Elector {
                    node_id,
                    raft: raft.clone(),
                    transport: elector_transport,
                    silence: elector_silence,
                    removal: removed.clone(),
                    timings,
                }));
                tokio::spawn(removed.run(raft.clone()));
                tokio::spawn(release_held_commits(raft.clone(), durable));
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

    /// Waits until some node is known as leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, MetadataError> {
        let metrics = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|_| MetadataError::Timeout {
                what: "a leader".into(),
                millis: timeout.as_millis() as u64,
            })?;
        metrics.current_leader.ok_or(MetadataError::NoLeader)
    }

    fn leader_addr(&self, leader: NodeId) -> Option<NodeAddr> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
    }

    async fn peer_client(
        &self,
        leader: NodeId,
    ) -> Result<(RaftPeerClient<tonic::transport::Channel>, String), MetadataError> {
        let addr = self.leader_addr(leader).ok_or(MetadataError::NoLeader)?;
        let channel = self
            .transport
            .channel(Lane::Writes, leader, &addr.peer_addr)
            .map_err(|e| MetadataError::LeaderUnreachable {
                leader,
                addr: addr.peer_addr.clone(),
                reason: e.to_string(),
            })?;
        Ok((crate::network::peer_client(channel), addr.peer_addr))
    }

    /// Proposes a write and waits for the state machine's outcome (applied, unchanged, CAS
    /// conflict or rejection). On a follower the write is forwarded to the leader. When that
    /// leader stops answering (it crashed, is paused or is cut off), the write goes to the next
    /// leader as soon as this node knows one, within `forward_timeout` in all. Every proposal
    /// carries a request id (one is assigned when the client gave none), so a write that the
    /// old leader had already replicated applies once however often it is sent.
    pub async fn propose(&self, mut proposal: Proposal) -> Result<Outcome, MetadataError> {
        // An invalid command is refused here, before it costs a log entry on every node.
        if let Err(reason) = crate::metadata::state::check_command(&proposal.command) {
            return Ok(Outcome::Rejected { reason });
        }
        if let Some(id) = &proposal.request_id {
            if id.starts_with(ASSIGNED_ID_PREFIX) {
                return Ok(Outcome::Rejected {
                    reason: crate::metadata::Rejection::Invalid {
                        field: "request_id".into(),
                        reason: format!(
                            "ids starting with '{ASSIGNED_ID_PREFIX}' are reserved for the ids troupe assigns: choose another"
                        ),
                    },
                });
            }
        }
        proposal
            .request_id
            .get_or_insert_with(|| self.write_ids.next());
        let proposal = &proposal;
        let local = || async move {
            match self.proposer.write(proposal.clone()).await {
                Ok(outcome) => Attempt::Done(outcome),
                Err(WriteFailure::ForwardToLeader(Some(leader))) => Attempt::Forward(leader),
                Err(WriteFailure::ForwardToLeader(None)) => Attempt::Retry(MetadataError::NoLeader),
                Err(WriteFailure::Membership(e)) => Attempt::Fail(MetadataError::Membership(e)),
                Err(WriteFailure::Fatal(e)) => Attempt::Fail(MetadataError::Raft(e)),
            }
        };
        let forward = |leader, deadline| self.forward_write(leader, proposal, deadline);
        self.with_leader(local, forward).await.map_err(|failed| {
            // Once an attempt may have reached a leader's log, a failure does not mean that
            // the write did not apply.
            if failed.reached_leader {
                MetadataError::OutcomeUnknown(Box::new(failed.error))
            } else {
                failed.error
            }
        })
    }

    /// Runs a request on the leader: `local` tries it on this node; when this node is not the
    /// leader, `forward` sends it to the one it knows. When that leader stops answering (it
    /// crashed, is paused or is cut off), the request goes to the next leader as soon as this
    /// node knows one. A failed attempt waits at most one heartbeat for news before the next.
    /// All of it within `forward_timeout`.
    async fn with_leader<T, L, LF, F, FF>(&self, mut local: L, forward: F) -> Result<T, Failed>
    where
        L: FnMut() -> LF,
        LF: std::future::Future<Output = Attempt<T>>,
        F: Fn(NodeId, tokio::time::Instant) -> FF,
        FF: std::future::Future<Output = Result<T, MetadataError>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.forward_timeout;
        let me = self.config.node_id;
        let mut reached_leader = false;
        loop {
            let seen = self.leader_view();
            reached_leader |= seen.0 == Some(me);
            let failure = match local().await {
                Attempt::Done(value) => return Ok(value),
                Attempt::Forward(leader) if leader != me => {
                    reached_leader = true;
                    let outcome = self
                        .until_leader_moves(leader, deadline, forward(leader, deadline))
                        .await;
                    // Unanswered: the connection may be dead without a reset (the leader's
                    // address moved, a cut link); the next forward to it connects anew.
                    if matches!(
                        outcome,
                        None | Some(Err(
                            MetadataError::LeaderUnreachable { .. } | MetadataError::Timeout { .. }
                        ))
                    ) {
                        self.transport.forget(Lane::Writes, leader);
                    }
                    match outcome {
                        Some(Ok(value)) => return Ok(value),
                        Some(Err(error)) if !error.is_retryable() => {
                            return Err(Failed {
                                error,
                                reached_leader,
                            })
                        }
                        Some(Err(error)) => error,
                        // A newer leader is known: go there.
                        None => continue,
                    }
                }
                Attempt::Forward(_) => MetadataError::NoLeader,
                Attempt::Retry(error) => error,
                Attempt::Fail(error) => {
                    return Err(Failed {
                        error,
                        reached_leader,
                    })
                }
            };
            if !self.await_leader_change(seen, deadline).await {
                return Err(Failed {
                    error: failure,
                    reached_leader,
                });
            }
        }
    }

    /// The leader and term this node knows now.
    fn leader_view(&self) -> (Option<NodeId>, u64) {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        (metrics.current_leader, metrics.current_term)
    }

    /// Runs `call` (a request to `leader`) until it answers, or returns `None` as soon as this
    /// node knows that `leader` no longer leads (a new term or another leader): the answer of
    /// a leader that has stopped responding is not worth waiting for.
    async fn until_leader_moves<T>(
        &self,
        leader: NodeId,
        deadline: tokio::time::Instant,
        call: impl std::future::Future<Output = Result<T, MetadataError>>,
    ) -> Option<Result<T, MetadataError>> {
        let mut metrics = self.raft.metrics();
        let term = metrics.borrow().current_term;
        let moved = async move {
            let stopped = metrics
                .wait_for(|m| m.current_term != term || m.current_leader != Some(leader))
                .await
                .is_err();
            if stopped {
                // Raft has stopped: let the call finish or time out on its own.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            answer = call => Some(answer),
            () = moved => None,
            () = tokio::time::sleep_until(deadline) => Some(Err(MetadataError::Timeout {
                what: format!("leader {leader} to answer"),
                millis: self.config.forward_timeout.as_millis() as u64,
            })),
        }
    }

    /// After a failed attempt made while this node knew `seen` as (leader, term): waits until
    /// it knows another leader or a newer term, or one heartbeat interval (a restarted leader,
    /// or a connection that failed once, may answer the next attempt). False when `deadline`
    /// has passed.
    async fn await_leader_change(
        &self,
        seen: (Option<NodeId>, u64),
        deadline: tokio::time::Instant,
    ) -> bool {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        let mut metrics = self.raft.metrics();
        let changed = metrics
            .wait_for(|m| m.current_leader.is_some() && (m.current_leader, m.current_term) != seen);
        let pause = (tokio::time::Instant::now() + self.config.heartbeat_interval).min(deadline);
        let _ = tokio::time::timeout_at(pause, changed).await;
        tokio::time::Instant::now() < deadline
    }

    async fn forward_write(
        &self,
        leader: NodeId,
        proposal: &Proposal,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, MetadataError> {
        let (mut client, addr) = self.peer_client(leader).await?;
        let unreachable = |reason: String| MetadataError::LeaderUnreachable {
            leader,
            addr: addr.clone(),
            reason,
        };
        let mut request = tonic::Request::new(wire::proposal_to(proposal));
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let reply = client
            .propose(request)
            .await
            .map_err(|s| unreachable(s.to_string()))?;
        let result: ForwardedWrite =
            wire::write_result_from(reply.into_inner()).map_err(|e| unreachable(e.to_string()))?;
        match result {
            Ok(outcome) => Ok(outcome),
            // The leader changed under us: the write did not apply there; it is sent again.
            Err(WriteFailure::ForwardToLeader(_)) => Err(MetadataError::NoLeader),
            Err(WriteFailure::Membership(e)) => Err(MetadataError::Membership(e)),
            Err(WriteFailure::Fatal(e)) => Err(unreachable(e)),
        }
    }

    /// Runs `read` on this node's state once it is fresh enough for `consistency`.
    pub async fn read<T>(
        &self,
        consistency: ReadConsistency,
        read: impl FnOnce(&MetadataState) -> T,
    ) -> Result<T, MetadataError> {
        match consistency {
            ReadConsistency::Stale => {}
            ReadConsistency::AtLeast(revision) => {
                self.wait_applied(revision, self.config.forward_timeout)
                    .await?;
            }
            ReadConsistency::Linearizable => {
                let index = self.read_index().await?;
                self.wait_applied_index(index, self.config.forward_timeout)
                    .await?;
            }
        }
        let applied = self.applied.read().await;
        Ok(read(&applied.metadata))
    }

    /// The log index a linearizable read must see applied: the leader's commit point,
    /// confirmed by a quorum. A leader that stops answering is given up for the next one, as
    /// for writes.
    async fn read_index(&self) -> Result<u64, MetadataError> {
        let local = || async {
            match self.raft.ensure_linearizable().await {
                Ok(log_id) => Attempt::Done(log_id.map_or(0, |l| l.index)),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                    forward,
                ))) => match forward.leader_id {
                    Some(leader) => Attempt::Forward(leader),
                    None => Attempt::Retry(MetadataError::NoLeader),
                },
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(
                    _,
                ))) => Attempt::Retry(MetadataError::NoLeader),
                Err(RaftError::Fatal(fatal)) => {
                    Attempt::Fail(MetadataError::Raft(fatal.to_string()))
                }
            }
        };
        let forward = |leader, deadline| self.forward_read_index(leader, deadline);
        self.with_leader(local, forward)
            .await
            .map_err(|failed| failed.error)
    }

    async fn forward_read_index(
        &self,
        leader: NodeId,
        deadline: tokio::time::Instant,
    ) -> Result<u64, MetadataError> {
        let (mut client, addr) = self.peer_client(leader).await?;
        let unreachable = |reason: String| MetadataError::LeaderUnreachable {
            leader,
            addr: addr.clone(),
            reason,
        };
        let mut request = tonic::Request::new(troupe_proto::v1::ReadIndexRequest {});
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let reply = client
            .read_index(request)
            .await
            .map_err(|s| unreachable(s.to_string()))?;
        let result: ForwardedReadIndex =
            wire::read_index_from(reply.into_inner()).map_err(|e| unreachable(e.to_string()))?;
        result.map_err(|_| MetadataError::NoLeader)
    }

    /// Waits until this node has applied `revision`.
    pub async fn wait_applied(
        &self,
        revision: u64,
        timeout: Duration,
    ) -> Result<u64, MetadataError> {
        wait_at_least(self.revisions.clone(), revision, timeout, "revision").await
    }

    /// Waits until this node has applied the log up to `index`.
    pub async fn wait_applied_index(
        &self,
        index: u64,
        timeout: Duration,
    ) -> Result<u64, MetadataError> {
        wait_at_least(self.applied_indexes.clone(), index, timeout, "log index").await
    }

    /// Every change from `from_revision` on, in order, then new ones as they apply.
    pub fn watch(&self, from_revision: u64) -> Result<Watch, WatchError> {
        self.history
            .replay(from_revision)
            .map(Watch::new)
            .map_err(|snapshot_revision| WatchError::Compacted {
                requested: from_revision,
                snapshot_revision,
            })
    }

    /// As [`Metadata::watch`], but a compacted revision or a lagging watcher yields the whole
    /// state as of some revision and continues from there.
    pub fn watch_resyncing(&self, from_revision: u64) -> ResyncingWatch<'_> {
        ResyncingWatch::new(self, from_revision)
    }

    /// The keys (models, tasks, settings) as they were at `revision`: any revision from the
    /// history's compaction point up to what this node has applied.
    pub async fn state_at(&self, revision: u64) -> Result<MetadataState, HistoryError> {
        let applied = self.applied.read().await;
        let latest = applied.metadata.revision;
        if revision > latest {
            return Err(HistoryError::Ahead {
                requested: revision,
                applied: latest,
            });
        }
        self.history
            .state_at(revision)
            .map_err(|oldest| HistoryError::Compacted {
                requested: revision,
                oldest,
            })
    }

    /// The oldest revision [`Metadata::state_at`] can rebuild now.
    pub fn oldest_revision(&self) -> u64 {
        self.history.compacted()
    }

    /// This node's applied state and its revision, taken together.
    pub async fn snapshot_state(&self) -> (MetadataState, u64) {
        let applied = self.applied.read().await;
        (applied.metadata.clone(), applied.metadata.revision)
    }

    /// sha256 of this node's serialised metadata (keys and idempotency records) and the log
    /// index it has applied up to. Two nodes that have applied the same index must have the
    /// same digest. (Not the same revision: proposals that change nothing take no revision,
    /// yet their request ids are remembered.)
    pub async fn state_digest(&self) -> (String, u64) {
        use sha2::{Digest, Sha256};
        let applied = self.applied.read().await;
        // BTreeMaps serialise in key order, so equal states give equal bytes.
        let bytes = serde_json::to_vec(&applied.metadata).unwrap_or_default();
        (
            hex::encode(Sha256::digest(bytes)),
            applied.last_applied.map_or(0, |log_id| log_id.index),
        )
    }

    /// Follows this node's applied revision.
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revisions.clone()
    }

    fn leader_only<T>(
        &self,
        error: RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>,
    ) -> Result<T, MetadataError> {
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                Err(MetadataError::NotLeader {
                    node_id: self.config.node_id,
                    leader: forward.leader_id,
                })
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                Err(MetadataError::Membership(e.to_string()))
            }
            RaftError::Fatal(fatal) => Err(MetadataError::Raft(fatal.to_string())),
        }
    }

    /// Runs a membership change on this node, which must be the leader. A change that meets
    /// another one still in flight is retried until `forward_timeout`.
    async fn change_membership<F, Fut>(&self, change: F) -> Result<(), MetadataError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<
            Output = Result<(), RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>>,
        >,
    {
        let deadline = tokio::time::Instant::now() + self.config.forward_timeout;
        loop {
            match change().await {
                Ok(()) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    openraft::error::ChangeMembershipError::InProgress(_),
                ))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.config.heartbeat_interval).await;
                }
                Err(error) => return self.leader_only(error),
            }
        }
    }

    /// Adds a non-voting member that replicates the log (run on the leader).
    pub async fn add_learner(&self, node_id: NodeId, addr: NodeAddr) -> Result<(), MetadataError> {
        self.change_membership(|| async {
            self.raft
                .add_learner(node_id, addr.clone(), true)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Makes a learner a voter (run on the leader).
    pub async fn promote(&self, node_id: NodeId) -> Result<(), MetadataError> {
        self.change_membership(|| async {
            let change = ChangeMembers::AddVoterIds(BTreeSet::from([node_id]));
            self.raft.change_membership(change, true).await.map(|_| ())
        })
        .await
    }

    /// Removes a node from the voters and the learners (run on the leader).
    pub async fn remove(&self, node_id: NodeId) -> Result<(), MetadataError> {
        let ids = BTreeSet::from([node_id]);
        if self.status().voters.contains(&node_id) {
            self.change_membership(|| async {
                let change = ChangeMembers::RemoveVoters(ids.clone());
                self.raft.change_membership(change, false).await.map(|_| ())
            })
            .await?;
        }
        self.change_membership(|| async {
            let change = ChangeMembers::RemoveNodes(ids.clone());
            self.raft.change_membership(change, false).await.map(|_| ())
        })
        .await
    }

    /// This node's Raft status.
    pub fn status(&self) -> RaftStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let nodes = membership
            .nodes()
            .map(|(id, node)| (*id, node.clone()))
            .collect();
        RaftStatus {
            node_id: self.config.node_id,
            role: match metrics.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            applied_revision: *self.revisions.borrow(),
            snapshot_index: metrics.snapshot.map_or(0, |l| l.index),
            snapshot_revision: self
                .snapshot_revision
                .load(std::sync::atomic::Ordering::Acquire),
            purged_index: metrics.purged.map_or(0, |l| l.index),
            committed_index: metrics.replication.as_ref().map(|replication| {
                quorum_index(&voters, self.config.node_id, &metrics, replication)
            }),
            leader_changes: self
                .leader_changes
                .load(std::sync::atomic::Ordering::Relaxed),
            longest_leader_silence_ms: self.silence.longest().as_millis() as u64,
            voters,
            learners,
            nodes,
            removed: self.removal.reason(),
            stopped: match &metrics.running_state {
                // A storage failure (a full disk, an I/O error) or a panic ends the core; its
                // error says which.
                Err(fatal) => Some(format!(
                    "the Raft core has stopped: {fatal} (free disk space or fix the storage, then restart the node)"
                )),
                Ok(()) if self.raft.metrics().has_changed().is_err() => Some(
                    "the Raft core has stopped (a panic or a storage failure, see the log): restart the node".to_owned(),
                ),
                Ok(()) => None,
            },
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

/// The index a majority of `voters` holds, from the leader's replication progress (its own
/// log counts for itself).
fn quorum_index(
    voters: &[NodeId],
    me: NodeId,
    metrics: &openraft::RaftMetrics<NodeId, NodeAddr>,
    replication: &BTreeMap<NodeId, Option<openraft::LogId<NodeId>>>,
) -> u64 {
    let mut matched: Vec<u64> = voters
        .iter()
        .map(|id| {
            if *id == me {
                metrics.last_log_index.unwrap_or(0)
            } else {
                replication
                    .get(id)
                    .copied()
                    .flatten()
                    .map_or(0, |log| log.index)
            }
        })
        .collect();
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched.get(voters.len() / 2).copied().unwrap_or(0)
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

/// Waits until `watched` reaches `at_least`; returns the value it reached.
async fn wait_at_least(
    mut watched: watch::Receiver<u64>,
    at_least: u64,
    timeout: Duration,
    what: &str,
) -> Result<u64, MetadataError> {
    let waited = tokio::time::timeout(timeout, watched.wait_for(|value| *value >= at_least)).await;
    match waited {
        Ok(Ok(value)) => Ok(*value),
        Ok(Err(_)) => Err(MetadataError::ShutDown),
        Err(_) => Err(MetadataError::Timeout {
            what: format!("{what} {at_least} to be applied"),
            millis: timeout.as_millis() as u64,
        }),
    }
}
