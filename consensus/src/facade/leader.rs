//! Finding the leader and retrying on it: a call runs here when this node leads, is forwarded
//! to the leader when another node does, and waits out an election in between.

use super::*;

/// How one attempt of a request on this node went (see [`Metadata::with_leader`]).
pub(super) enum Attempt<T> {
    Done(T),
    /// This node does not lead; the node it names does.
    Forward(NodeId),
    /// Not now: worth another attempt once the leader changes.
    Retry(MetadataError),
    Fail(MetadataError),
}

/// Why [`Metadata::with_leader`] gave up, and whether any attempt may have reached a leader.
pub(super) struct Failed {
    pub(super) error: MetadataError,
    pub(super) reached_leader: bool,
}

impl Metadata {
    /// Waits until some node is known as leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, MetadataError> {
        let metrics = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|_| MetadataError::Timeout {
                what: "a leader".into(),
                millis: timeout.as_millis() as u64,
            })?;
        metrics.current_leader.ok_or(MetadataError::NoLeader)
    }

    pub(super) fn leader_addr(&self, leader: NodeId) -> Option<NodeAddr> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
    }

    pub(super) async fn peer_client(
        &self,
        leader: NodeId,
    ) -> Result<(RaftPeerClient<tonic::transport::Channel>, String), MetadataError> {
        let addr = self.leader_addr(leader).ok_or(MetadataError::NoLeader)?;
        let channel = self
            .transport
            .channel(Lane::Writes, leader, &addr.peer_addr)
            .map_err(|e| MetadataError::LeaderUnreachable {
                leader,
                addr: addr.peer_addr.clone(),
                reason: e.to_string(),
            })?;
        Ok((crate::network::peer_client(channel), addr.peer_addr))
    }

    /// Runs a request on the leader: `local` tries it on this node; when this node is not the
    /// leader, `forward` sends it to the one it knows. When that leader stops answering (it
    /// crashed, is paused or is cut off), the request goes to the next leader as soon as this
    /// node knows one. A failed attempt waits at most one heartbeat for news before the next.
    /// All of it within `forward_timeout`.
    pub(super) async fn with_leader<T, L, LF, F, FF>(
        &self,
        mut local: L,
        forward: F,
    ) -> Result<T, Failed>
    where
        L: FnMut() -> LF,
        LF: std::future::Future<Output = Attempt<T>>,
        F: Fn(NodeId, tokio::time::Instant) -> FF,
        FF: std::future::Future<Output = Result<T, MetadataError>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.forward_timeout;
        let me = self.config.node_id;
        let mut reached_leader = false;
        loop {
            let seen = self.leader_view();
            reached_leader |= seen.0 == Some(me);
            let failure = match local().await {
                Attempt::Done(value) => return Ok(value),
                Attempt::Forward(leader) if leader != me => {
                    reached_leader = true;
                    let outcome = self
                        .until_leader_moves(leader, deadline, forward(leader, deadline))
                        .await;
                    // Unanswered: the connection may be dead without a reset (the leader's
                    // address moved, a cut link); the next forward to it connects anew.
                    if matches!(
                        outcome,
                        None | Some(Err(
                            MetadataError::LeaderUnreachable { .. } | MetadataError::Timeout { .. }
                        ))
                    ) {
                        self.transport.forget(Lane::Writes, leader);
                    }
                    match outcome {
                        Some(Ok(value)) => return Ok(value),
                        Some(Err(error)) if !error.is_retryable() => {
                            return Err(Failed {
                                error,
                                reached_leader,
                            })
                        }
                        Some(Err(error)) => error,
                        // A newer leader is known: go there.
                        None => continue,
                    }
                }
                Attempt::Forward(_) => MetadataError::NoLeader,
                Attempt::Retry(error) => error,
                Attempt::Fail(error) => {
                    return Err(Failed {
                        error,
                        reached_leader,
                    })
                }
            };
            if !self.await_leader_change(seen, deadline).await {
                return Err(Failed {
                    error: failure,
                    reached_leader,
                });
            }
        }
    }

    /// The leader and term this node knows now.
    pub(super) fn leader_view(&self) -> (Option<NodeId>, u64) {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        (metrics.current_leader, metrics.current_term)
    }

    /// Runs `call` (a request to `leader`) until it answers, or returns `None` as soon as this
    /// node knows that `leader` no longer leads (a new term or another leader): the answer of
    /// a leader that has stopped responding is not worth waiting for.
    pub(super) async fn until_leader_moves<T>(
        &self,
        leader: NodeId,
        deadline: tokio::time::Instant,
        call: impl std::future::Future<Output = Result<T, MetadataError>>,
    ) -> Option<Result<T, MetadataError>> {
        let mut metrics = self.raft.metrics();
        let term = metrics.borrow().current_term;
        let moved = async move {
            let stopped = metrics
                .wait_for(|m| m.current_term != term || m.current_leader != Some(leader))
                .await
                .is_err();
            if stopped {
                // Raft has stopped: let the call finish or time out on its own.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            answer = call => Some(answer),
            () = moved => None,
            () = tokio::time::sleep_until(deadline) => Some(Err(MetadataError::Timeout {
                what: format!("leader {leader} to answer"),
                millis: self.config.forward_timeout.as_millis() as u64,
            })),
        }
    }

    /// After a failed attempt made while this node knew `seen` as (leader, term): waits until
    /// it knows another leader or a newer term, or one heartbeat interval (a restarted leader,
    /// or a connection that failed once, may answer the next attempt). False when `deadline`
    /// has passed.
    pub(super) async fn await_leader_change(
        &self,
        seen: (Option<NodeId>, u64),
        deadline: tokio::time::Instant,
    ) -> bool {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        let mut metrics = self.raft.metrics();
        let changed = metrics
            .wait_for(|m| m.current_leader.is_some() && (m.current_leader, m.current_term) != seen);
        let pause = (tokio::time::Instant::now() + self.config.heartbeat_interval).min(deadline);
        let _ = tokio::time::timeout_at(pause, changed).await;
        tokio::time::Instant::now() < deadline
    }
}
