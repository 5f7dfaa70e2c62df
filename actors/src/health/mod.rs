//! Health: decides whether this node is SERVING. It is when Raft has a leader this node can
//! reach, every version Raft marks active is loaded and warm here, and no supervisor has
//! escalated. It re-checks on a timer and whenever the serving table changes, and publishes
//! the result on a watch channel that the node maps onto grpc.health.v1. It also runs the
//! health gossip ([`gossip`]): heartbeats to every peer, written into the peer table.

pub mod gossip;
pub mod measure;
pub mod messages;
pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;
use troupe_consensus::Metadata;

pub use messages::{HealthMsg, NodeHealth};
pub use probe::{HeartbeatReply, PeerProbe};

use crate::config::GossipConfig;
use crate::peers::PeerTable;
use crate::restart::RestartBudget;
use crate::stats::{spawn_rechecks, ActorStats};
use crate::table::ServingTable;

#[derive(Clone)]
pub struct HealthArgs {
    pub metadata: Arc<Metadata>,
    pub table: Arc<ServingTable>,
    pub budget: Arc<RestartBudget>,
    pub published: watch::Sender<NodeHealth>,
    pub interval: Duration,
    pub stats: Arc<ActorStats>,
    pub node_id: u64,
    /// Heartbeats write what they learn here.
    pub peers: Arc<PeerTable>,
    pub probe: Arc<dyn PeerProbe>,
    pub gossip: GossipConfig,
}

pub struct HealthState {
    args: HealthArgs,
    ticker: tokio::task::JoinHandle<()>,
    gossip: tokio::task::JoinHandle<()>,
}

pub struct Health;

/// Sends `Check` through the stats-counting path.
pub fn check(actor: &ActorRef<HealthMsg>, stats: &ActorStats) {
    let _ = crate::stats::send(actor, stats, HealthMsg::Check);
}

impl Actor for Health {
    type Msg = HealthMsg;
    type State = HealthState;
    type Arguments = HealthArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: HealthArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let stats = args.stats.clone();
        let ticker = spawn_rechecks(
            args.interval,
            args.table.subscribe(),
            args.metadata.revisions(),
            move || check(&myself, &stats),
        );
        let gossip = tokio::spawn(gossip::run(gossip::GossipArgs {
            node_id: args.node_id,
            raft: args.metadata.clone(),
            peers: args.peers.clone(),
            probe: args.probe.clone(),
            config: args.gossip.clone(),
        }));
        Ok(HealthState {
            args,
            ticker,
            gossip,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.stats.handled();
        let HealthMsg::Check = message;
        let args = &state.args;
        let mut reasons = Vec::new();
        let raft = args.metadata.status();
        if let Some(stopped) = raft.stopped {
            reasons.push(stopped);
        } else if let Some(removed) = raft.removed {
            reasons.push(format!(
                "{removed}: add it back with `troupe cluster add-learner`, or stop it"
            ));
        } else if raft.leader.is_none() {
            reasons.push(
                "raft has no leader: this node cannot reach a quorum (or the cluster is not initialised: run `troupe cluster init`)"
                    .to_owned(),
            );
        }
        reasons.extend(args.table.unready_reasons());
        if let Some(escalation) = args.budget.escalation() {
            reasons.push(escalation);
        }
        let health = NodeHealth {
            serving: reasons.is_empty(),
            reasons,
        };
        args.published.send_if_modified(|current| {
            if *current == health {
                return false;
            }
            if health.serving {
                tracing::info!("node is serving");
            } else {
                tracing::warn!(reasons = ?health.reasons, "node is not serving");
            }
            *current = health;
            true
        });
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        // Dropping the loop's task set aborts every per-peer heartbeat task with it.
        state.gossip.abort();
        Ok(())
    }
}
