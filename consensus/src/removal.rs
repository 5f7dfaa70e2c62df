//! Noticing that this node was removed from the cluster. A removed node must stop
//! campaigning (its votes would only disturb the members) and stop serving.
//!
//! It knows it was removed when its own log holds a membership without it. That entry may
//! never reach it, though: the leader stops replicating to a node once its removal commits.
//! So it also concludes it when a majority of the voters it knows refuse its Raft messages
//! as coming from a non-member (the peer gate's `not_a_member`). Only members pass a peer
//! gate, so only members can say that. If a leader later replicates to it after all, it is a
//! member again and campaigns as before.

use std::collections::BTreeSet;
use std::sync::Mutex;

use openraft::Raft;
use tokio::sync::{watch, Notify};

use crate::types::{NodeId, TypeConfig};

pub struct Removal {
    node_id: NodeId,
    /// Peers whose last answer was "you are not a member".
    refused_by: Mutex<BTreeSet<NodeId>>,
    changed: Notify,
    /// Why this node is removed, while it is.
    removed: watch::Sender<Option<String>>,
    /// Whether this node has seen itself in a membership. A node being added replays the
    /// older memberships (without it) first: that is no removal.
    was_member: std::sync::atomic::AtomicBool,
}

impl Removal {
    pub fn new(node_id: NodeId) -> Self {
        Self {
            node_id,
            refused_by: Mutex::default(),
            changed: Notify::new(),
            removed: watch::channel(None).0,
            was_member: Default::default(),
        }
    }

    /// `peer` refused this node's Raft message as coming from a non-member.
    pub fn refused_by(&self, peer: NodeId) {
        if self.lock().insert(peer) {
            self.changed.notify_one();
        }
    }

    /// `peer` answered a Raft message.
    pub fn accepted_by(&self, peer: NodeId) {
        if self.lock().remove(&peer) {
            self.changed.notify_one();
        }
    }

    /// A leader replicated to this node.
    pub fn heard_from_leader(&self) {
        let had = {
            let mut refused = self.lock();
            let had = !refused.is_empty();
            refused.clear();
            had
        };
        if had {
            self.changed.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<NodeId>> {
        self.refused_by.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why this node is removed, if it is.
    pub fn reason(&self) -> Option<String> {
        self.removed.borrow().clone()
    }

    /// The verdict for the membership `raft` holds now.
    fn verdict(&self, raft: &Raft<TypeConfig>) -> Option<String> {
        let metrics = raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let nodes: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        if nodes.is_empty() {
            // Not initialised yet, or being added: nothing to conclude.
            return None;
        }
        let member = nodes.contains(&self.node_id);
        if member {
            self.was_member
                .store(true, std::sync::atomic::Ordering::Relaxed);
        } else if self.was_member.load(std::sync::atomic::Ordering::Relaxed) {
            let at = metrics.membership_config.log_id().map_or(0, |l| l.index);
            return Some(format!(
                "removed from the cluster: the membership at log index {at} no longer lists node {}",
                self.node_id
            ));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let refused: BTreeSet<NodeId> = self.lock().intersection(&voters).copied().collect();
        (refused.len() > voters.len() / 2).then(|| {
            format!(
                "removed from the cluster: voters {refused:?} refuse node {} as not a member",
                self.node_id
            )
        })
    }

    /// Follows `raft`'s membership and the refusals until Raft stops. While this node is
    /// removed it does not stand for election ([`crate::election`] asks [`Removal::reason`]).
    pub async fn run(self: std::sync::Arc<Self>, raft: Raft<TypeConfig>) {
        let mut metrics = raft.metrics();
        loop {
            let verdict = self.verdict(&raft);
            let was = self.reason();
            if verdict.is_some() != was.is_some() {
                match &verdict {
                    Some(reason) => {
                        tracing::warn!(node_id = self.node_id, reason = %reason, "this node was removed from the cluster: it stops campaigning and serving");
                    }
                    None => {
                        tracing::info!(
                            node_id = self.node_id,
                            "this node is a cluster member again: it campaigns and serves again"
                        );
                    }
                }
            }
            if verdict != was {
                self.removed.send_replace(verdict);
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = self.changed.notified() => {}
            }
        }
    }
}
