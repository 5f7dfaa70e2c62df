//! The node's Raft status, as `Admin/RaftStatus` and the shell show it.

use super::*;

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

/// The index a majority of `voters` holds, from the leader's replication progress (its own
/// log counts for itself).
pub(super) fn quorum_index(
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

impl Metadata {
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
}
