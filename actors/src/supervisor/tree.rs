//! The tree as the node holds it ([`ActorTree`]: start, drain, stop) and as request handlers
//! and Admin read it ([`TreeView`]: the serving table, peers, in-flight count, actors, and an
//! operator's restart).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::watch;

use super::{NodeSupervisor, SupervisorMsg, SupervisorStart, TreeArgs, ROOT};
use crate::batcher::BatcherHandle;
use crate::health::NodeHealth;
use crate::peers::{InFlight, PeerTable};
use crate::restart::RestartBudget;
use crate::stats::{call, ActorDirectory, ActorInfo, ActorStats, OPERATOR_RESTART};
use crate::table::{LocalState, ServingTable};

/// Why [`TreeView::restart`] did not restart an actor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestartError {
    #[error("no actor at {0:?}: `actors` lists the paths")]
    NoSuchActor(String),
    #[error("the root supervisor cannot be restarted: restart the node process instead")]
    Root,
    #[error("{path} is a thread of {owner}, not an actor: restart {owner}, which starts its threads afresh")]
    Thread { path: String, owner: String },
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
        if self.directory.is_thread(path) {
            let owner = path.rsplit_once('/').map_or(ROOT, |(owner, _)| owner);
            return Err(RestartError::Thread {
                path: path.to_owned(),
                owner: owner.to_owned(),
            });
        }
        let Some((Some(old), _)) = self.directory.lookup(path) else {
            return Err(RestartError::NoSuchActor(path.to_owned()));
        };
        let mut changes = self.directory.subscribe();
        old.stop(Some(OPERATOR_RESTART.to_owned()));
        let restarted = async {
            loop {
                match self.directory.lookup(path) {
                    None => return Err(RestartError::Gone(path.to_owned())),
                    // A new incarnation is attached once its `pre_start` has returned: it is
                    // up (ractor marks it Running a moment later, and tells no one).
                    Some((Some(cell), restarts))
                        if cell.get_id() != old.get_id()
                            && !matches!(
                                cell.get_status(),
                                ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
                            ) =>
                    {
                        return Ok(restarts)
                    }
                    // The directory changes when the new incarnation is attached, or when
                    // the path is retired.
                    Some(_) => {
                        if changes.changed().await.is_err() {
                            return Err(RestartError::Gone(path.to_owned()));
                        }
                    }
                }
            }
        };
        tokio::time::timeout(timeout, restarted)
            .await
            .unwrap_or_else(|_| {
                Err(RestartError::NotRestarted {
                    path: path.to_owned(),
                    timeout,
                })
            })
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
