//! NodeSupervisor: the root of a node's actor tree.
//!
//! ```text
//! NodeSupervisor (one for one; restart intensity N in T, then escalate)
//! ├── MetadataSync
//! ├── Health
//! ├── RolloutController
//! └── Batcher per loaded model version ── InferenceWorker × workers_per_model
//! ```
//!
//! It restarts a failed child alone (one for one). Batchers supervise their own workers the
//! same way. All restarts draw on one [`RestartBudget`]: past the intensity the supervisor
//! stops restarting, Health reports NOT_SERVING with the reason, and the node stays up for
//! an operator to look at instead of crash-looping.

pub mod messages;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;
use troupe_consensus::Metadata;
use troupe_models::artifact::ArtifactStore;
use troupe_models::{LoadedModel, ModelError, Precision};

pub use messages::SupervisorMsg;

use crate::batcher::{Batcher, BatcherArgs, BatcherHandle, BatcherShared};
use crate::config::{GossipConfig, ServingConfig};
use crate::health::{self, Health, HealthArgs, HealthMsg, NodeHealth, PeerProbe};
use crate::peers::{InFlight, PeerTable};
use crate::restart::RestartBudget;
use crate::rollout::{RolloutArgs, RolloutController, RolloutMsg};
use crate::scheduler::Scheduler;
use crate::stats::{call, spawn_child, ActorDirectory, ActorInfo, ActorStats, OPERATOR_RESTART};
use crate::sync::{MetadataSync, SyncArgs, SyncMsg};
use crate::table::{LocalState, ModelKey, ServingTable};

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

const ROOT: &str = "node";
const SYNC_PATH: &str = "node/metadata_sync";
const HEALTH_PATH: &str = "node/health";
const ROLLOUT_PATH: &str = "node/rollout";

fn batcher_path(key: &ModelKey) -> String {
    format!("{ROOT}/batcher:{key}")
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

/// How the node talks to its supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    stats: Arc<ActorStats>,
}

/// Generous bound for supervisor calls that only touch in-memory state.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl SupervisorHandle {
    pub async fn start_model(
        &self,
        key: ModelKey,
        model: LoadedModel,
    ) -> Result<BatcherHandle, String> {
        match call(
            &self.actor,
            &self.stats,
            |reply| SupervisorMsg::StartModel { key, model, reply },
            Some(CALL_TIMEOUT),
        )
        .await
        {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            Ok(_) => Err("the supervisor did not answer".into()),
            Err(error) => Err(format!("the supervisor is gone: {error}")),
        }
    }

    pub async fn stop_model(&self, key: ModelKey) {
        let _ = call(
            &self.actor,
            &self.stats,
            |reply| SupervisorMsg::StopModel { key, reply },
            Some(CALL_TIMEOUT),
        )
        .await;
    }
}

enum Child {
    Sync,
    Health,
    Rollout,
    Batcher(ModelKey),
}

struct Served {
    handle: BatcherHandle,
    model: LoadedModel,
}

pub struct SupervisorState {
    args: TreeArgs,
    table: Arc<ServingTable>,
    peers: Arc<PeerTable>,
    budget: Arc<RestartBudget>,
    directory: ActorDirectory,
    published: watch::Sender<NodeHealth>,
    stats: Arc<ActorStats>,
    sync: Option<ActorRef<SyncMsg>>,
    health: Option<ActorRef<HealthMsg>>,
    rollout: Option<ActorRef<RolloutMsg>>,
    batchers: HashMap<ModelKey, Served>,
}

pub struct NodeSupervisor;

pub struct SupervisorStart {
    args: TreeArgs,
    table: Arc<ServingTable>,
    peers: Arc<PeerTable>,
    budget: Arc<RestartBudget>,
    directory: ActorDirectory,
    published: watch::Sender<NodeHealth>,
    stats: Arc<ActorStats>,
}

impl SupervisorState {
    fn handle(&self, myself: &ActorRef<SupervisorMsg>) -> SupervisorHandle {
        SupervisorHandle {
            actor: myself.clone(),
            stats: self.stats.clone(),
        }
    }

    async fn start_sync(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let stats = self.directory.fresh_stats(SYNC_PATH, "metadata_sync");
        // Loads started by a previous incarnation report to it, not to us: start them over.
        self.table.clear_loading();
        let args = SyncArgs {
            node_id: self.args.node_id,
            metadata: self.args.metadata.clone(),
            table: self.table.clone(),
            supervisor: self.handle(myself),
            loader: self.args.loader.clone(),
            fetcher: self.args.fetcher.clone(),
            store: self.args.store.clone(),
            lanes: self.args.config.lanes,
            max_batch_size: self.args.config.max_batch_size,
            stats,
        };
        let actor = spawn_child(
            &self.directory,
            SYNC_PATH,
            MetadataSync,
            args,
            myself.get_cell(),
        )
        .await?;
        self.sync = Some(actor);
        Ok(())
    }

    async fn start_health(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let stats = self.directory.fresh_stats(HEALTH_PATH, "health");
        let args = HealthArgs {
            metadata: self.args.metadata.clone(),
            table: self.table.clone(),
            budget: self.budget.clone(),
            published: self.published.clone(),
            interval: self.args.config.health_interval,
            stats,
            node_id: self.args.node_id,
            peers: self.peers.clone(),
            probe: self.args.probe.clone(),
            gossip: self.args.gossip.clone(),
        };
        let actor = spawn_child(
            &self.directory,
            HEALTH_PATH,
            Health,
            args,
            myself.get_cell(),
        )
        .await?;
        self.health = Some(actor);
        Ok(())
    }

    async fn start_rollout(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let stats = self
            .directory
            .fresh_stats(ROLLOUT_PATH, "rollout_controller");
        let args = RolloutArgs {
            node_id: self.args.node_id,
            metadata: self.args.metadata.clone(),
            table: self.table.clone(),
            peers: self.peers.clone(),
            timeout: self.args.config.rollout_timeout,
            interval: self.args.config.health_interval,
            stats,
        };
        let actor = spawn_child(
            &self.directory,
            ROLLOUT_PATH,
            RolloutController,
            args,
            myself.get_cell(),
        )
        .await?;
        self.rollout = Some(actor);
        Ok(())
    }

    async fn start_batcher(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        key: ModelKey,
        model: LoadedModel,
    ) -> Result<BatcherHandle, String> {
        let path = batcher_path(&key);
        let stats = self.directory.fresh_stats(&path, "batcher");
        let args = BatcherArgs {
            node_id: self.args.node_id,
            key: key.clone(),
            path,
            model: model.clone(),
            config: self.args.config.clone(),
            budget: self.budget.clone(),
            directory: self.directory.clone(),
            shared: Arc::new(BatcherShared::default()),
            stats,
        };
        // Encoders batch and return; decoders step sequences (continuous batching). Both
        // speak the batcher protocol, so the table, restarts and draining treat them alike.
        let handle = match &model {
            LoadedModel::Encoder(_) => Batcher::start(args, myself.get_cell()).await,
            LoadedModel::Decoder(_) => Scheduler::start(args, myself.get_cell()).await,
        }
        .map_err(|e| format!("cannot start the batcher: {e}"))?;
        self.batchers.insert(
            key,
            Served {
                handle: handle.clone(),
                model,
            },
        );
        Ok(handle)
    }

    fn child_of(&self, cell: &ActorCell) -> Option<Child> {
        let id = cell.get_id();
        if self.sync.as_ref().is_some_and(|a| a.get_id() == id) {
            return Some(Child::Sync);
        }
        if self.health.as_ref().is_some_and(|a| a.get_id() == id) {
            return Some(Child::Health);
        }
        if self.rollout.as_ref().is_some_and(|a| a.get_id() == id) {
            return Some(Child::Rollout);
        }
        self.batchers
            .iter()
            .find(|(_, loaded)| loaded.handle.actor().get_id() == id)
            .map(|(key, _)| Child::Batcher(key.clone()))
    }

    fn recheck_health(&self) {
        if let Some(health) = &self.health {
            health::check(health, &self.directory.stats(HEALTH_PATH, "health"));
        }
    }

    async fn restart(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        child: Child,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let path = match &child {
            Child::Sync => SYNC_PATH.to_owned(),
            Child::Health => HEALTH_PATH.to_owned(),
            Child::Rollout => ROLLOUT_PATH.to_owned(),
            Child::Batcher(key) => batcher_path(key),
        };
        tracing::warn!(actor = %path, %reason, "actor failed");
        if let Err(escalation) = self.budget.try_restart(&path, Instant::now()) {
            tracing::error!(actor = %path, %escalation, "escalating: not restarting");
            if let Child::Batcher(key) = &child {
                if let Some(loaded) = self.batchers.remove(key) {
                    drop(loaded);
                    self.table
                        .set_local(key.clone(), LocalState::Failed(escalation.clone()));
                }
            }
            self.recheck_health();
            return Ok(());
        }
        self.directory.stats(&path, "actor").restarted();
        match child {
            Child::Sync => self.start_sync(myself).await?,
            Child::Health => self.start_health(myself).await?,
            Child::Rollout => self.start_rollout(myself).await?,
            Child::Batcher(key) => {
                if let Some(loaded) = self.batchers.remove(&key) {
                    match self.start_batcher(myself, key.clone(), loaded.model).await {
                        Ok(handle) => self.table.set_local(key, LocalState::Ready(handle)),
                        Err(error) => self.table.set_local(key, LocalState::Failed(error)),
                    }
                }
            }
        }
        self.recheck_health();
        Ok(())
    }
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorStart;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        start: SupervisorStart,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = SupervisorState {
            args: start.args,
            table: start.table,
            peers: start.peers,
            budget: start.budget,
            directory: start.directory,
            published: start.published,
            stats: start.stats,
            sync: None,
            health: None,
            rollout: None,
            batchers: HashMap::new(),
        };
        state.start_health(&myself).await?;
        state.start_sync(&myself).await?;
        state.start_rollout(&myself).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stats.handled();
        match message {
            SupervisorMsg::StartModel { key, model, reply } => {
                if let Some(old) = state.batchers.remove(&key) {
                    old.handle.actor().stop(Some("replaced".into()));
                }
                let result = state.start_batcher(&myself, key, model).await;
                let _ = reply.send(result);
            }
            SupervisorMsg::StopModel { key, reply } => {
                let path = batcher_path(&key);
                if let Some(loaded) = state.batchers.remove(&key) {
                    let timeout = state.args.config.drain_timeout;
                    let directory = state.directory.clone();
                    // Draining can take a while; it must not hold up supervision.
                    tokio::spawn(async move {
                        loaded.handle.drain(timeout).await;
                        let _ = loaded
                            .handle
                            .actor()
                            .stop_and_wait(Some("unloaded".into()), Some(timeout))
                            .await;
                        directory.remove_tree(&path);
                        let _ = reply.send(());
                    });
                } else {
                    let _ = reply.send(());
                }
            }
            SupervisorMsg::DrainAll(reply) => {
                let handles: Vec<BatcherHandle> =
                    state.batchers.values().map(|l| l.handle.clone()).collect();
                let timeout = state.args.config.drain_timeout;
                tokio::spawn(async move {
                    for handle in handles {
                        handle.drain(timeout).await;
                    }
                    let _ = reply.send(());
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Children stop with us, batchers (and through them their workers) included.
        myself
            .stop_children_and_wait(
                Some("node shutdown".into()),
                Some(state.args.config.drain_timeout),
            )
            .await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                // A child that stops by itself while we run is a failure too; one we stopped
                // (unload, replace) is no longer in our books and is ignored below.
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if let Some(child) = state.child_of(&cell) {
            state.restart(&myself, child, reason).await?;
        }
        Ok(())
    }
}

/// Why [`TreeView::restart`] did not restart an actor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestartError {
    #[error("no actor at {0:?}: `actors` lists the paths")]
    NoSuchActor(String),
    #[error("the root supervisor cannot be restarted: restart the node process instead")]
    Root,
    #[error("{0} stopped and was retired instead of restarted (its model was unloaded)")]
    Gone(String),
    #[error("{path} did not come back within {timeout:?}: the restart intensity may be exhausted (see `actors`)")]
    NotRestarted { path: String, timeout: Duration },
}

/// What request handlers and Admin read of the tree; cheap to clone.
#[derive(Debug, Clone)]
pub struct TreeView {
    pub table: Arc<ServingTable>,
    /// What heartbeats learned about the other nodes.
    pub peers: Arc<PeerTable>,
    /// Requests this node is serving now.
    pub in_flight: Arc<InFlight>,
    pub directory: ActorDirectory,
    pub health: watch::Receiver<NodeHealth>,
}

impl TreeView {
    pub fn actors(&self) -> Vec<ActorInfo> {
        self.directory.snapshot()
    }

    /// Restarts the actor at `path` (and, for a batcher, its workers with it) the way a
    /// failure would: its supervisor starts a new one. Answers the new incarnation's restart
    /// count once it is running, or why it cannot.
    pub async fn restart(&self, path: &str, timeout: Duration) -> Result<u64, RestartError> {
        if path == ROOT {
            return Err(RestartError::Root);
        }
        let Some((Some(old), _)) = self.directory.lookup(path) else {
            return Err(RestartError::NoSuchActor(path.to_owned()));
        };
        old.stop(Some(OPERATOR_RESTART.to_owned()));
        let deadline = Instant::now() + timeout;
        loop {
            match self.directory.lookup(path) {
                None => return Err(RestartError::Gone(path.to_owned())),
                Some((Some(cell), restarts))
                    if cell.get_id() != old.get_id()
                        && cell.get_status() == ractor::ActorStatus::Running =>
                {
                    return Ok(restarts)
                }
                Some(_) if Instant::now() >= deadline => {
                    return Err(RestartError::NotRestarted {
                        path: path.to_owned(),
                        timeout,
                    })
                }
                Some(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Requests queued in this node's batchers.
    pub fn queue_depth(&self) -> u64 {
        self.batchers()
            .iter()
            .map(|b| b.shared().lane_depths().iter().sum::<usize>() as u64)
            .sum()
    }

    /// Every loaded version's batcher.
    pub fn batchers(&self) -> Vec<BatcherHandle> {
        self.table
            .local_keys()
            .into_iter()
            .filter_map(|key| match self.table.local(&key) {
                Some(LocalState::Ready(handle)) => Some(handle),
                _ => None,
            })
            .collect()
    }
}

/// A running actor tree, as the node holds it.
pub struct ActorTree {
    supervisor: ActorRef<SupervisorMsg>,
    join: tokio::task::JoinHandle<()>,
    pub table: Arc<ServingTable>,
    pub peers: Arc<PeerTable>,
    pub in_flight: Arc<InFlight>,
    pub directory: ActorDirectory,
    pub budget: Arc<RestartBudget>,
    pub health: watch::Receiver<NodeHealth>,
    stats: Arc<ActorStats>,
    node_id: u64,
}

impl ActorTree {
    pub async fn start(args: TreeArgs) -> Result<Self, ractor::SpawnErr> {
        let table = Arc::new(ServingTable::default());
        let peers = args.peers.clone();
        let in_flight = Arc::new(InFlight::default());
        let directory = ActorDirectory::default();
        let budget = Arc::new(RestartBudget::new(
            args.config.max_restarts,
            args.config.restart_window,
        ));
        let (published, health) = watch::channel(NodeHealth {
            serving: false,
            reasons: vec!["starting".into()],
        });
        let stats = directory.stats(ROOT, "node_supervisor");
        let node_id = args.node_id;
        let start = SupervisorStart {
            args,
            table: table.clone(),
            peers: peers.clone(),
            budget: budget.clone(),
            directory: directory.clone(),
            published,
            stats: stats.clone(),
        };
        let (supervisor, join) = Actor::spawn(None, NodeSupervisor, start).await?;
        directory.attach(ROOT, supervisor.get_cell());
        tracing::info!(node_id, "actor tree started");
        Ok(Self {
            supervisor,
            join,
            table,
            peers,
            in_flight,
            directory,
            budget,
            health,
            stats,
            node_id,
        })
    }

    pub fn view(&self) -> TreeView {
        TreeView {
            table: self.table.clone(),
            peers: self.peers.clone(),
            in_flight: self.in_flight.clone(),
            directory: self.directory.clone(),
            health: self.health.clone(),
        }
    }

    /// Lets every queued request finish (graceful shutdown, step 2).
    pub async fn drain(&self, timeout: Duration) {
        let _ = call(
            &self.supervisor,
            &self.stats,
            SupervisorMsg::DrainAll,
            Some(timeout),
        )
        .await;
    }

    /// Stops the whole tree and waits for it (graceful shutdown, step 3).
    pub async fn stop(self, timeout: Duration) {
        let _ = self
            .supervisor
            .stop_and_wait(Some("node shutdown".into()), Some(timeout))
            .await;
        let _ = self.join.await;
        tracing::info!(node_id = self.node_id, "actor tree stopped");
    }
}
