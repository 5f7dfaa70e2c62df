//! Membership changes: add a learner, promote it, remove a node; only on the leader.

use super::*;

impl Metadata {
    pub(super) fn leader_only<T>(
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
    pub(super) async fn change_membership<F, Fut>(&self, change: F) -> Result<(), MetadataError>
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
}
