//! NodeSupervisor: the root of a node's actor tree.
//!
//! ```text
//! NodeSupervisor (one for one; restart intensity N in T, then escalate)
//! ├── MetadataSync
//! ├── Health
//! ├── RolloutController
//! └── Batcher per loaded model version ── worker thread × workers_per_model
//! ```
//!
//! It restarts a failed child alone (one for one). Batchers restart their own worker threads
//! the same way. All restarts draw on one [`RestartBudget`]: past the intensity the supervisor
//! stops restarting, Health reports NOT_SERVING with the reason, and the node stays up for
//! an operator to look at instead of crash-looping.

mod handle;
pub mod messages;
mod ports;
mod tree;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use troupe_models::LoadedModel;

pub use handle::SupervisorHandle;
pub use messages::SupervisorMsg;
pub use ports::{ArtifactFetcher, ModelLoader, TreeArgs};
pub use tree::{ActorTree, RestartError, TreeView};

use crate::batcher::{Batcher, BatcherArgs, BatcherHandle, BatcherShared};
use crate::health::{self, Health, HealthArgs, HealthMsg, NodeHealth};
use crate::peers::PeerTable;
use crate::restart::RestartBudget;
use crate::rollout::{RolloutArgs, RolloutController, RolloutMsg};
use crate::scheduler::Scheduler;
use crate::stats::{spawn_child, ActorDirectory, ActorStats};
use crate::sync::{MetadataSync, SyncArgs, SyncMsg};
use crate::table::{LocalState, ModelKey, ServingTable};

pub(crate) const ROOT: &str = "node";
const SYNC_PATH: &str = "node/metadata_sync";
const HEALTH_PATH: &str = "node/health";
const ROLLOUT_PATH: &str = "node/rollout";

fn batcher_path(key: &ModelKey) -> String {
    format!("{ROOT}/batcher:{key}")
}

enum Child {
    Sync,
    Health,
    Rollout,
    Batcher(ModelKey),
}

/// What the supervisor is started with and shares with its children.
pub struct SupervisorStart {
    args: TreeArgs,
    table: Arc<ServingTable>,
    peers: Arc<PeerTable>,
    budget: Arc<RestartBudget>,
    directory: ActorDirectory,
    published: watch::Sender<NodeHealth>,
    stats: Arc<ActorStats>,
}

pub struct SupervisorState {
    shared: SupervisorStart,
    sync: Option<ActorRef<SyncMsg>>,
    health: Option<ActorRef<HealthMsg>>,
    rollout: Option<ActorRef<RolloutMsg>>,
    /// The batchers this supervisor started, by version: its books for supervision (a child
    /// not in them was stopped on purpose). The serving table holds the same handles for
    /// routing.
    batchers: HashMap<ModelKey, BatcherHandle>,
    /// Unloads and drains in progress: they run beside supervision, and the supervisor waits
    /// for them when it stops.
    unloading: TaskTracker,
}

pub struct NodeSupervisor;

impl SupervisorState {
    fn handle(&self, myself: &ActorRef<SupervisorMsg>) -> SupervisorHandle {
        SupervisorHandle {
            actor: myself.clone(),
            stats: self.shared.stats.clone(),
        }
    }

    /// Starts a child at `path`, linked to this supervisor, with its stats fresh (the restart
    /// count carries over).
    async fn start_child<A: Actor>(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        (path, kind): (&str, &'static str),
        actor: A,
        args: impl FnOnce(Arc<ActorStats>) -> A::Arguments,
    ) -> Result<ActorRef<A::Msg>, ActorProcessingErr> {
        let stats = self.shared.directory.fresh_stats(path, kind);
        let args = args(stats);
        Ok(spawn_child(&self.shared.directory, path, actor, args, myself.get_cell()).await?)
    }

    async fn start_sync(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        // Loads started by a previous incarnation report to it, not to us: start them over.
        self.shared.table.clear_loading();
        let (shared, supervisor) = (&self.shared, self.handle(myself));
        let args = |stats| SyncArgs {
            node_id: shared.args.node_id,
            metadata: shared.args.metadata.clone(),
            table: shared.table.clone(),
            supervisor,
            loader: shared.args.loader.clone(),
            fetcher: shared.args.fetcher.clone(),
            store: shared.args.store.clone(),
            lanes: shared.args.config.lanes,
            max_batch_size: shared.args.config.max_batch_size,
            stats,
        };
        let actor = self
            .start_child(myself, (SYNC_PATH, "metadata_sync"), MetadataSync, args)
            .await?;
        self.sync = Some(actor);
        Ok(())
    }

    async fn start_health(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let shared = &self.shared;
        let args = |stats| HealthArgs {
            metadata: shared.args.metadata.clone(),
            table: shared.table.clone(),
            budget: shared.budget.clone(),
            published: shared.published.clone(),
            interval: shared.args.config.health_interval,
            stats,
            node_id: shared.args.node_id,
            peers: shared.peers.clone(),
            probe: shared.args.probe.clone(),
            gossip: shared.args.gossip.clone(),
        };
        let actor = self
            .start_child(myself, (HEALTH_PATH, "health"), Health, args)
            .await?;
        self.health = Some(actor);
        Ok(())
    }

    async fn start_rollout(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let shared = &self.shared;
        let args = |stats| RolloutArgs {
            node_id: shared.args.node_id,
            metadata: shared.args.metadata.clone(),
            table: shared.table.clone(),
            peers: shared.peers.clone(),
            timeout: shared.args.config.rollout_timeout,
            interval: shared.args.config.health_interval,
            stats,
        };
        let actor = self
            .start_child(
                myself,
                (ROLLOUT_PATH, "rollout_controller"),
                RolloutController,
                args,
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
        let stats = self.shared.directory.fresh_stats(&path, "batcher");
        let args = BatcherArgs {
            node_id: self.shared.args.node_id,
            key: key.clone(),
            path,
            model: model.clone(),
            config: self.shared.args.config.clone(),
            budget: self.shared.budget.clone(),
            directory: self.shared.directory.clone(),
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
        self.batchers.insert(key, handle.clone());
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
            .find(|(_, handle)| handle.actor().get_id() == id)
            .map(|(key, _)| Child::Batcher(key.clone()))
    }

    fn recheck_health(&self) {
        if let Some(health) = &self.health {
            health::check(health, &self.shared.directory.stats(HEALTH_PATH, "health"));
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
        if let Err(escalation) = self.shared.budget.try_restart(&path, Instant::now()) {
            tracing::error!(actor = %path, %escalation, "escalating: not restarting");
            if let Child::Batcher(key) = &child {
                if let Some(loaded) = self.batchers.remove(key) {
                    drop(loaded);
                    self.shared
                        .table
                        .set_local(key.clone(), LocalState::Failed(escalation.clone()));
                }
            }
            self.recheck_health();
            return Ok(());
        }
        self.shared.directory.stats(&path, "actor").restarted();
        match child {
            Child::Sync => self.start_sync(myself).await?,
            Child::Health => self.start_health(myself).await?,
            Child::Rollout => self.start_rollout(myself).await?,
            Child::Batcher(key) => {
                if let Some(old) = self.batchers.remove(&key) {
                    let model = old.model().clone();
                    match self.start_batcher(myself, key.clone(), model).await {
                        Ok(handle) => self.shared.table.set_local(key, LocalState::Ready(handle)),
                        Err(error) => self.shared.table.set_local(key, LocalState::Failed(error)),
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
            shared: start,
            sync: None,
            health: None,
            rollout: None,
            batchers: HashMap::new(),
            unloading: TaskTracker::new(),
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
        state.shared.stats.handled();
        match message {
            SupervisorMsg::StartModel { key, model, reply } => {
                if let Some(old) = state.batchers.remove(&key) {
                    old.actor().stop(Some("replaced".into()));
                }
                let result = state.start_batcher(&myself, key, model).await;
                let _ = reply.send(result);
            }
            SupervisorMsg::StopModel { key, reply } => {
                let path = batcher_path(&key);
                if let Some(handle) = state.batchers.remove(&key) {
                    let timeout = state.shared.args.config.drain_timeout;
                    let directory = state.shared.directory.clone();
                    // Draining can take a while; it must not hold up supervision.
                    state.unloading.spawn(async move {
                        handle.drain(timeout).await;
                        let _ = handle
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
                let handles: Vec<BatcherHandle> = state.batchers.values().cloned().collect();
                let timeout = state.shared.args.config.drain_timeout;
                state.unloading.spawn(async move {
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
        let timeout = state.shared.args.config.drain_timeout;
        myself
            .stop_children_and_wait(Some("node shutdown".into()), Some(timeout))
            .await;
        // Unloads and drains end once their batchers have stopped.
        state.unloading.close();
        if tokio::time::timeout(timeout, state.unloading.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = state.unloading.len(),
                "unloads still running after the drain timeout"
            );
        }
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
