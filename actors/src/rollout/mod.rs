//! RolloutController: makes `troupe models activate` cluster-atomic.
//!
//! Activating a version marks it `wanted` in Raft. Every node then loads and warms it beside
//! the active version (MetadataSync) and reports its readiness through Raft. On the Raft
//! leader, this actor watches those reports: once every live serving node (every member that
//! heartbeats do not mark down) reports the version ready, it proposes it `active`, and every
//! node switches to it as it applies that one entry. If a live node reports that it failed to
//! load the version, or the rollout outlives `rollout_timeout`, it proposes it `failed` with
//! the reason; the old version never stopped serving. Each proposal is a compare-and-set on the
//! version's `mod_revision`, so an operator's write in between wins over a stale decision.

pub mod messages;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use troupe_consensus::metadata::{
    Command, ModelState, ModelVersionRecord, NodeModelState, Outcome, Proposal, MAX_REASON_BYTES,
};
use troupe_consensus::{Metadata, Role};

pub use messages::RolloutMsg;

use crate::peers::{PeerState, PeerTable};
use crate::stats::{spawn_rechecks, ActorStats};
use crate::table::{ModelKey, ServingTable};

#[derive(Clone)]
pub struct RolloutArgs {
    pub node_id: u64,
    pub metadata: Arc<Metadata>,
    pub table: Arc<ServingTable>,
    pub peers: Arc<PeerTable>,
    /// A rollout not complete after this long fails.
    pub timeout: Duration,
    /// How often rollouts are looked at when nothing else prompts it (for the timeout).
    pub interval: Duration,
    pub stats: Arc<ActorStats>,
}

pub struct RolloutState {
    args: RolloutArgs,
    ticker: tokio::task::JoinHandle<()>,
    /// Versions with a decision on its way through Raft, by the mod_revision it was made at.
    proposing: HashSet<(ModelKey, u64)>,
    /// When this node first saw a rollout that carries no start time.
    first_seen: HashMap<(ModelKey, u64), u64>,
}

pub struct RolloutController;

/// What to do with a version being rolled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Some live node is not ready yet, and there is time left.
    Wait,
    /// Every live serving node reports it ready.
    Activate,
    /// A live node failed to load it, or the rollout timed out.
    Fail(String),
}

/// The rollout rule, as a pure function of the version's record, the live serving nodes, and
/// the time elapsed since the rollout started.
pub fn decide(
    record: &ModelVersionRecord,
    live_nodes: &[u64],
    elapsed: Duration,
    timeout: Duration,
) -> Decision {
    let started = record.revisions.mod_revision;
    let mut failures = Vec::new();
    let mut waiting = Vec::new();
    for node in live_nodes {
        match record.nodes.get(node) {
            Some(report) if report.state == NodeModelState::Ready => {}
            // A failure reported before this rollout began is about an earlier attempt.
            Some(report) if report.state == NodeModelState::Failed && report.revision > started => {
                failures.push(format!("node {node} failed to load it: {}", report.reason));
            }
            Some(report) => waiting.push(format!("node {node} {}", report.state.as_str())),
            None => waiting.push(format!("node {node} has not reported")),
        }
    }
    if !failures.is_empty() {
        return Decision::Fail(failures.join("; "));
    }
    if waiting.is_empty() && !live_nodes.is_empty() {
        return Decision::Activate;
    }
    if elapsed >= timeout {
        return Decision::Fail(format!(
            "rollout timed out after {} s (serving.rollout_timeout_s) with {} not ready",
            timeout.as_secs(),
            waiting.join(", ")
        ));
    }
    Decision::Wait
}

fn now_unix_ms() -> u64 {
    troupe_failpoints::wall_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn truncate(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// Sends `Check` through the stats-counting path.
/// How long a rollout decision that did not apply (an error, a refusal) waits before the
/// controller decides again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub fn check(actor: &ActorRef<RolloutMsg>, stats: &ActorStats) {
    let _ = crate::stats::send(actor, stats, RolloutMsg::Check);
}

impl RolloutState {
    /// Members that must be ready: every voter and learner that heartbeats do not mark down.
    fn live_nodes(&self) -> Vec<u64> {
        let status = self.args.metadata.status();
        let mut members: Vec<u64> = status
            .voters
            .iter()
            .chain(&status.learners)
            .copied()
            .collect();
        members.sort_unstable();
        members.dedup();
        members
            .into_iter()
            .filter(|id| *id == self.args.node_id || self.args.peers.state(*id) != PeerState::Down)
            .collect()
    }

    fn check(&mut self, myself: &ActorRef<RolloutMsg>) {
        if self.args.metadata.status().role != Role::Leader {
            self.first_seen.clear();
            return;
        }
        let rollouts: Vec<(ModelKey, ModelVersionRecord)> = self
            .args
            .table
            .versions()
            .into_iter()
            .filter(|(_, record)| record.state == ModelState::Wanted)
            .collect();
        self.first_seen.retain(|(key, revision), _| {
            rollouts
                .iter()
                .any(|(k, r)| k == key && r.revisions.mod_revision == *revision)
        });
        if rollouts.is_empty() {
            return;
        }
        let live = self.live_nodes();
        let now = now_unix_ms();
        for (key, record) in rollouts {
            let revision = record.revisions.mod_revision;
            if self.proposing.contains(&(key.clone(), revision)) {
                continue;
            }
            let started = record.rollout_started_unix_ms.unwrap_or_else(|| {
                *self
                    .first_seen
                    .entry((key.clone(), revision))
                    .or_insert(now)
            });
            let elapsed = Duration::from_millis(now.saturating_sub(started));
            let (state, reason) = match decide(&record, &live, elapsed, self.args.timeout) {
                Decision::Wait => continue,
                Decision::Activate => {
                    tracing::info!(model = %key, nodes = ?live, "every serving node is ready: activating");
                    (ModelState::Active, None)
                }
                Decision::Fail(reason) => {
                    tracing::warn!(model = %key, %reason, "rollout failed: the active version stays");
                    (ModelState::Failed, Some(truncate(reason)))
                }
            };
            self.proposing.insert((key.clone(), revision));
            let proposal = Proposal {
                command: Command::SetModelState {
                    name: key.name.clone(),
                    version: key.version.clone(),
                    state,
                    traffic_weight: None,
                    reason,
                    requested_at_unix_ms: None,
                },
                expected_revision: Some(revision),
                request_id: Some(format!("rollout/{key}/{revision}")),
            };
            let (metadata, actor, stats) = (
                self.args.metadata.clone(),
                myself.clone(),
                self.args.stats.clone(),
            );
            tokio::spawn(async move {
                let retry = match metadata.propose(proposal).await {
                    Ok(Outcome::Conflict { .. }) => {
                        tracing::info!(model = %key, "the version changed meanwhile: decision dropped");
                        false
                    }
                    Ok(Outcome::Rejected { reason }) => {
                        tracing::error!(model = %key, %reason, "the rollout decision was refused; retrying");
                        true
                    }
                    Ok(_) => false,
                    Err(error) => {
                        tracing::warn!(model = %key, %error, "cannot propose the rollout decision; retrying");
                        true
                    }
                };
                if retry {
                    // Not at once: a decision that failed fast would otherwise spin.
                    tokio::time::sleep(RETRY_AFTER).await;
                }
                let _ = crate::stats::send(&actor, &stats, RolloutMsg::Proposed { key });
            });
        }
    }
}

impl Actor for RolloutController {
    type Msg = RolloutMsg;
    type State = RolloutState;
    type Arguments = RolloutArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RolloutArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let stats = args.stats.clone();
        let ticker = spawn_rechecks(
            args.interval,
            args.table.subscribe(),
            args.peers.subscribe(),
            move || check(&myself, &stats),
        );
        Ok(RolloutState {
            args,
            ticker,
            proposing: HashSet::new(),
            first_seen: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.args.stats.handled();
        match message {
            RolloutMsg::Check => state.check(&myself),
            RolloutMsg::Proposed { key } => {
                state.proposing.retain(|(k, _)| *k != key);
                state.check(&myself);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use troupe_consensus::metadata::NodeReadiness;

    fn record(reports: &[(u64, NodeModelState, u64)]) -> ModelVersionRecord {
        let mut record = crate::table::version_record(ModelState::Wanted, 10);
        record.nodes = reports
            .iter()
            .map(|(node, state, revision)| {
                (
                    *node,
                    NodeReadiness {
                        state: *state,
                        reason: "bad weights".into(),
                        revision: *revision,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>();
        record.rollout_started_unix_ms = Some(0);
        record
    }

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[test]
    fn activates_only_when_every_live_node_is_ready() {
        let ready = NodeModelState::Ready;
        let loading = NodeModelState::Loading;
        let partial = record(&[(1, ready, 11), (2, loading, 12)]);
        assert_eq!(
            decide(&partial, &[1, 2, 3], Duration::ZERO, TIMEOUT),
            Decision::Wait
        );
        let all = record(&[(1, ready, 11), (2, ready, 12), (3, ready, 13)]);
        assert_eq!(
            decide(&all, &[1, 2, 3], Duration::ZERO, TIMEOUT),
            Decision::Activate
        );
        // A node marked down is not waited for.
        let two = record(&[(1, ready, 11), (2, ready, 12)]);
        assert_eq!(
            decide(&two, &[1, 2], Duration::ZERO, TIMEOUT),
            Decision::Activate
        );
        assert_eq!(decide(&two, &[], Duration::ZERO, TIMEOUT), Decision::Wait);
    }

    #[test]
    fn fails_on_a_fresh_failure_report_or_the_timeout() {
        let failed = record(&[
            (1, NodeModelState::Ready, 11),
            (2, NodeModelState::Failed, 12),
        ]);
        let Decision::Fail(reason) = decide(&failed, &[1, 2], Duration::ZERO, TIMEOUT) else {
            panic!("a failed node fails the rollout");
        };
        assert!(
            reason.contains("node 2") && reason.contains("bad weights"),
            "{reason}"
        );
        // A failure from before this rollout (revision 5 < 10) is an earlier attempt's.
        let stale = record(&[
            (1, NodeModelState::Ready, 11),
            (2, NodeModelState::Failed, 5),
        ]);
        assert_eq!(
            decide(&stale, &[1, 2], Duration::ZERO, TIMEOUT),
            Decision::Wait
        );
        let Decision::Fail(reason) = decide(&stale, &[1, 2], TIMEOUT, TIMEOUT) else {
            panic!("the timeout fails the rollout");
        };
        assert!(
            reason.contains("timed out") && reason.contains("node 2"),
            "{reason}"
        );
    }
}
