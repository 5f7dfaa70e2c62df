//! Writes: proposals, proposed here on the leader or forwarded once to it, each with a
//! request id so a retry applies once.

use super::*;

/// Request ids that troupe assigns start with this; a client's may not.
pub const ASSIGNED_ID_PREFIX: &str = "~";

/// Request ids for writes whose client gave none: a random prefix per process and a counter,
/// so no two proposals anywhere share one.
pub(super) struct WriteIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl WriteIds {
    pub(super) fn new(node_id: NodeId) -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the operating system's randomness.
        let mut nonce = std::collections::hash_map::RandomState::new().build_hasher();
        nonce.write_u64(node_id);
        Self {
            prefix: format!("{ASSIGNED_ID_PREFIX}{node_id}.{:016x}.", nonce.finish()),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(super) fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
}

impl Metadata {
    /// Proposes a write and waits for the state machine's outcome (applied, unchanged, CAS
    /// conflict or rejection). On a follower the write is forwarded to the leader. When that
    /// leader stops answering (it crashed, is paused or is cut off), the write goes to the next
    /// leader as soon as this node knows one, within `forward_timeout` in all. Every proposal
    /// carries a request id (one is assigned when the client gave none), so a write that the
    /// old leader had already replicated applies once however often it is sent.
    pub async fn propose(&self, mut proposal: Proposal) -> Result<Outcome, MetadataError> {
        // An invalid command is refused here, before it costs a log entry on every node.
        if let Err(reason) = crate::metadata::state::check_command(&proposal.command) {
            return Ok(Outcome::Rejected { reason });
        }
        if let Some(id) = &proposal.request_id {
            if id.starts_with(ASSIGNED_ID_PREFIX) {
                return Ok(Outcome::Rejected {
                    reason: crate::metadata::Rejection::Invalid {
                        field: "request_id".into(),
                        reason: format!(
                            "ids starting with '{ASSIGNED_ID_PREFIX}' are reserved for the ids troupe assigns: choose another"
                        ),
                    },
                });
            }
        }
        proposal
            .request_id
            .get_or_insert_with(|| self.write_ids.next());
        let proposal = &proposal;
        let local = || async move {
            match self.proposer.write(proposal.clone()).await {
                Ok(outcome) => Attempt::Done(outcome),
                Err(WriteFailure::ForwardToLeader(Some(leader))) => Attempt::Forward(leader),
                Err(WriteFailure::ForwardToLeader(None)) => Attempt::Retry(MetadataError::NoLeader),
                Err(WriteFailure::Membership(e)) => Attempt::Fail(MetadataError::Membership(e)),
                Err(WriteFailure::Fatal(e)) => Attempt::Fail(MetadataError::Raft(e)),
            }
        };
        let forward = |leader, deadline| self.forward_write(leader, proposal, deadline);
        self.with_leader(local, forward).await.map_err(|failed| {
            // Once an attempt may have reached a leader's log, a failure does not mean that
            // the write did not apply.
            if failed.reached_leader {
                MetadataError::OutcomeUnknown(Box::new(failed.error))
            } else {
                failed.error
            }
        })
    }

    pub(super) async fn forward_write(
        &self,
        leader: NodeId,
        proposal: &Proposal,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, MetadataError> {
        let (mut client, addr) = self.peer_client(leader).await?;
        let unreachable = |reason: String| MetadataError::LeaderUnreachable {
            leader,
            addr: addr.clone(),
            reason,
        };
        let mut request = tonic::Request::new(wire::proposal_to(proposal));
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let reply = client
            .propose(request)
            .await
            .map_err(|s| unreachable(s.to_string()))?;
        let result: ForwardedWrite =
            wire::write_result_from(reply.into_inner()).map_err(|e| unreachable(e.to_string()))?;
        match result {
            Ok(outcome) => Ok(outcome),
            // The leader changed under us: the write did not apply there; it is sent again.
            Err(WriteFailure::ForwardToLeader(_)) => Err(MetadataError::NoLeader),
            Err(WriteFailure::Membership(e)) => Err(MetadataError::Membership(e)),
            Err(WriteFailure::Fatal(e)) => Err(unreachable(e)),
        }
    }
}
