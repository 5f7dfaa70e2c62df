//! Elections with a pre-vote (Ongaro's thesis, section 9.6), on top of openraft 0.9, which has
//! none.
//!
//! Without it, a follower cut off from the others times out again and again, raising its term
//! each time. When the link comes back, its higher term reaches the leader in the next
//! AppendEntries answer, the leader steps down, and the cluster stops taking writes for an
//! election although nothing was wrong with it (troupe-jepsen measured 1.2-1.6 s).
//!
//! So openraft's own election timer is off (`enable_elect = false`) and the [`run`] task of
//! each voter decides when to stand: once it has not heard from a leader for its lease
//! (`election_timeout_max`) and a random election timeout (`election_timeout_min` to `_max`),
//! it asks the other voters whether they would vote for it ([`answer`]). A voter says yes only
//! if it has not heard from a leader for `election_timeout_min` itself, it does not lead, and
//! the asker's log is at least as up to date as its own (terms are left to the real vote). With a majority of yeses (itself
//! included) the node triggers openraft's election at once; otherwise it waits another random
//! timeout and asks again. A node that cannot reach a majority never raises its term.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use troupe_failpoints::monotonic_now;

use openraft::{CommittedLeaderId, LogId, Raft, ServerState};
use troupe_proto::v1::{LogPosition, PreVoteRequest, PreVoteResponse};
use troupe_transport::{Lane, PeerTransport};

use crate::network::server::LeaderSilence;
use crate::removal::Removal;
use crate::types::{NodeAddr, NodeId, TypeConfig};

/// The election timings of one node (its Raft config).
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
}

impl Timings {
    /// A random election timeout in `min..=max`.
    fn random_timeout(&self) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let spread = self
            .election_timeout_max
            .saturating_sub(self.election_timeout_min);
        // Each RandomState has keys of its own (seeded from the operating system's
        // randomness), so even an empty hash differs every time.
        let hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        self.election_timeout_min + spread.mul_f64(fraction)
    }
}

pub(crate) fn position(log: Option<LogId<NodeId>>) -> Option<LogPosition> {
    log.map(|log| LogPosition {
        term: log.leader_id.term,
        node_id: log.leader_id.node_id,
        index: log.index,
    })
}

fn log_id(position: Option<&LogPosition>) -> Option<LogId<NodeId>> {
    position.map(|p| LogId::new(CommittedLeaderId::new(p.term, p.node_id), p.index))
}

/// This node's answer to a pre-vote request (already checked to come from `candidate`).
pub(crate) fn answer(
    raft: &Raft<TypeConfig>,
    silence: &LeaderSilence,
    timings: Timings,
    request: &PreVoteRequest,
) -> PreVoteResponse {
    let refuse = |reason: String| PreVoteResponse {
        granted: false,
        reason,
    };
    let metrics = raft.metrics().borrow().clone();
    if metrics.state == ServerState::Leader {
        return refuse(format!(
            "node {} leads term {}",
            metrics.id, metrics.current_term
        ));
    }
    if let Some(heard) = silence.last_heard() {
        let since = monotonic_now().saturating_duration_since(heard);
        if since < timings.election_timeout_min {
            return refuse(format!(
                "node {} heard from its leader {} ms ago",
                metrics.id,
                since.as_millis()
            ));
        }
    }
    // No check of the term: a candidate behind in terms learns the current one from the real
    // vote's answer (openraft adopts a higher vote it is answered with), and refusing it here
    // could keep a node with the most complete log from ever standing.
    let own = raft.data_metrics().borrow().last_log;
    let theirs = log_id(request.last_log.as_ref());
    if theirs < own {
        return refuse(format!(
            "node {}'s log (last {own:?}) is ahead of the candidate's ({theirs:?})",
            metrics.id
        ));
    }
    PreVoteResponse {
        granted: true,
        reason: String::new(),
    }
}

/// What the [`run`] task needs.
pub(crate) struct Elector {
    pub node_id: NodeId,
    pub raft: Raft<TypeConfig>,
    pub transport: Arc<PeerTransport>,
    pub silence: Arc<LeaderSilence>,
    pub removal: Arc<Removal>,
    pub timings: Timings,
}

/// How long to wait, after this node's vote changed to `vote`, before standing.
///
/// - A vote for another node (granted to a candidate, or a leader's vote adopted): that node
///   gets the whole lease to win and be heard from, as when a leader is heard.
/// - This node's own uncommitted vote: it stood. If it does not win, most likely because
///   another node stood at the same moment and the vote split, it tries again after one
///   random timeout, as in Raft. The lease again would add `election_timeout_max` to every
///   split vote (a leader kill measured 1.06 s instead of about 0.5 s so).
fn after_vote_change(vote: &openraft::Vote<NodeId>, node_id: NodeId, timings: Timings) -> Duration {
    let own_candidacy = !vote.is_committed() && vote.leader_id().voted_for() == Some(node_id);
    if own_candidacy {
        timings.random_timeout()
    } else {
        timings.election_timeout_max + timings.random_timeout()
    }
}

/// Decides when this node stands for election; see the module doc. Ends when Raft stops.
pub(crate) async fn run(elector: Elector) {
    let Elector {
        node_id,
        raft,
        silence,
        removal,
        timings,
        ..
    } = &elector;
    let (node_id, timings) = (*node_id, *timings);
    let mut metrics = raft.metrics();
    let mut vote = metrics.borrow().vote;
    // The last sign of a live leader or election: a leader's AppendEntries, a change of vote
    // (a vote granted, an election started), or this task's start.
    let mut contact = monotonic_now();
    let mut timeout = timings.election_timeout_max + timings.random_timeout();
    loop {
        let heard = silence.last_heard().filter(|heard| *heard > contact);
        if let Some(heard) = heard {
            contact = heard;
            timeout = timings.election_timeout_max + timings.random_timeout();
        }
        let deadline = contact + timeout;
        if monotonic_now() < deadline {
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = metrics.borrow().vote;
                    if now != vote {
                        vote = now;
                        contact = monotonic_now();
                        timeout = after_vote_change(&now, node_id, timings);
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            continue;
        }
        // Time to stand, if this node may.
        contact = monotonic_now();
        timeout = timings.random_timeout();
        let (state, term, voters, nodes) = {
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let nodes: BTreeMap<NodeId, NodeAddr> = membership
                .nodes()
                .map(|(id, node)| (*id, node.clone()))
                .collect();
            (m.state, m.current_term, voters, nodes)
        };
        if state == ServerState::Leader
            || state == ServerState::Shutdown
            || !voters.contains(&node_id)
            || removal.reason().is_some()
        {
            continue;
        }
        let request = PreVoteRequest {
            candidate: node_id,
            term: term + 1,
            last_log: position(raft.data_metrics().borrow().last_log),
        };
        let asked = monotonic_now();
        let needed = voters.len() / 2;
        let granted = 1 + ask(&elector, &voters, &nodes, &request, needed).await;
        // A leader or an election heard of while asking makes the answers stale: a vote
        // request counts from its arrival, since openraft publishes a vote it granted later.
        let news = silence.last_heard().is_some_and(|heard| heard > asked)
            || silence.last_vote_request().is_some_and(|at| at > asked)
            || metrics.borrow().vote != vote;
        if news {
            continue;
        }
        if granted > needed {
            tracing::info!(
                node_id,
                term = term + 1,
                granted,
                voters = voters.len(),
                "a majority would vote for this node: standing for election"
            );
            if raft.trigger().elect().await.is_err() {
                return;
            }
        } else {
            tracing::debug!(
                node_id,
                granted,
                voters = voters.len(),
                "no majority would vote for this node: not standing"
            );
        }
    }
}

/// Asks every other voter at once; the number that said yes within the shortest election
/// timeout, counted until `enough` did.
async fn ask(
    elector: &Elector,
    voters: &[NodeId],
    nodes: &BTreeMap<NodeId, NodeAddr>,
    request: &PreVoteRequest,
    enough: usize,
) -> usize {
    let Elector {
        node_id,
        transport,
        removal,
        timings,
        ..
    } = elector;
    let node_id = *node_id;
    let mut asks = tokio::task::JoinSet::new();
    for &voter in voters.iter().filter(|&&v| v != node_id) {
        let Some(addr) = nodes.get(&voter) else {
            continue;
        };
        let Ok(channel) = transport.channel(Lane::Raft, voter, &addr.peer_addr) else {
            continue;
        };
        let mut call = tonic::Request::new(*request);
        let limit = timings.election_timeout_min;
        call.set_timeout(limit);
        let removal = removal.clone();
        asks.spawn(async move {
            // Bounded here too: the header bounds only the server's work, not a connect to a
            // node that is cut off.
            let mut client = crate::network::peer_client(channel);
            match tokio::time::timeout(limit, client.pre_vote(call)).await {
                Err(_) => {
                    tracing::debug!(voter, "pre-vote unanswered within the election timeout");
                    false
                }
                Ok(Ok(reply)) => {
                    removal.accepted_by(voter);
                    let reply = reply.into_inner();
                    if !reply.granted {
                        tracing::debug!(voter, reason = %reply.reason, "pre-vote refused");
                    }
                    reply.granted
                }
                Ok(Err(status)) => {
                    // A member that refuses this node as no member: how a removed node learns
                    // it was removed.
                    if troupe_transport::Refusal::of(&status)
                        == Some(troupe_transport::Refusal::NotMember)
                    {
                        removal.refused_by(voter);
                    }
                    tracing::debug!(voter, %status, "pre-vote refused");
                    false
                }
            }
        });
    }
    let mut granted = 0;
    while let Some(answer) = asks.join_next().await {
        granted += usize::from(answer.unwrap_or(false));
        if granted >= enough {
            break;
        }
    }
    granted
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMINGS: Timings = Timings {
        election_timeout_min: Duration::from_millis(150),
        election_timeout_max: Duration::from_millis(300),
    };

    #[test]
    fn a_failed_candidacy_retries_within_one_timeout_and_a_granted_vote_waits_the_lease() {
        for _ in 0..100 {
            // Node 1 stood in term 5: if it has not won, it stands again soon.
            let own = after_vote_change(&openraft::Vote::new(5, 1), 1, TIMINGS);
            assert!((TIMINGS.election_timeout_min..=TIMINGS.election_timeout_max).contains(&own));
            // Node 1 voted for node 2: node 2 gets the lease to win and be heard.
            let granted = after_vote_change(&openraft::Vote::new(5, 2), 1, TIMINGS);
            assert!(granted >= TIMINGS.election_timeout_max + TIMINGS.election_timeout_min);
            // A committed vote is a leader's (this node's or another's): the lease too.
            let led = after_vote_change(&openraft::Vote::new_committed(5, 1), 1, TIMINGS);
            assert!(led >= TIMINGS.election_timeout_max + TIMINGS.election_timeout_min);
        }
    }
}
