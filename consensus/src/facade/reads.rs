//! Reads at the consistency asked for, watches, past states and the applied positions.

use super::*;

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

/// Waits until `watched` reaches `at_least`; returns the value it reached.
pub(super) async fn wait_at_least(
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

impl Metadata {
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
    pub(super) async fn read_index(&self) -> Result<u64, MetadataError> {
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

    pub(super) async fn forward_read_index(
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
}
