//! The `troupe.v1.RaftPeer` service: decodes each RPC, checks it ([`super::guard`]), hands it
//! to the local Raft, and encodes the result (success or Raft's own error) back.

use std::sync::Arc;

use openraft::error::RaftError;
use openraft::Raft;
use tonic::{Request, Response, Status};
use troupe_proto::v1 as pb;
use troupe_proto::v1::raft_peer_server::RaftPeer;
use troupe_proto::v1::{PreVoteRequest, PreVoteResponse};
use troupe_transport::{Refusals, VerifiedPeer};

use super::guard::{self, Refused};
use super::wire;
use crate::proposer::{Proposer, WriteResult};
use crate::removal::Removal;
use crate::types::{NodeId, TypeConfig};

/// The result of a forwarded write, as the follower receives it.
pub type ForwardedWrite = WriteResult;

/// The result of a forwarded read-index request: the log index a linearizable read must wait
/// for, once the leader has confirmed its leadership with a quorum.
pub type ForwardedReadIndex = Result<u64, String>;

#[derive(Clone)]
pub struct RaftPeerService {
    raft: Raft<TypeConfig>,
    proposer: Proposer,
    refusals: Arc<Refusals>,
    removal: Arc<Removal>,
    silence: Arc<LeaderSilence>,
    timings: crate::election::Timings,
}

/// The longest time this node, as a follower, went without an AppendEntries from its leader
/// within one term. Past the election timeout a follower stands for election; a figure near it
/// on a healthy cluster means heartbeats are being delayed (a starved runtime, a slow disk).
#[derive(Debug, Default)]
pub struct LeaderSilence {
    last: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    longest_us: std::sync::atomic::AtomicU64,
    /// When a candidate's RequestVote last arrived, before openraft handles it.
    vote_request: std::sync::Mutex<Option<std::time::Instant>>,
}

impl LeaderSilence {
    /// An AppendEntries of `term` arrived.
    fn heard(&self, term: u64) {
        let now = troupe_failpoints::monotonic_now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last_term, at)) = *last {
            if last_term == term {
                let gap = now.duration_since(at).as_micros() as u64;
                self.longest_us
                    .fetch_max(gap, std::sync::atomic::Ordering::Relaxed);
            }
        }
        *last = Some((term, now));
    }

    /// When an AppendEntries from a leader last arrived.
    pub fn last_heard(&self) -> Option<std::time::Instant> {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|(_, at)| at)
    }

    /// A candidate's RequestVote arrived: an election is under way.
    fn vote_requested(&self) {
        *self.vote_request.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(troupe_failpoints::monotonic_now());
    }

    /// When a candidate's RequestVote last arrived. Recorded as it arrives, before openraft
    /// handles it: openraft publishes the vote it grants only later, so the elector could
    /// otherwise stand against a candidate it has just voted for, and unseat it as it wins.
    pub fn last_vote_request(&self) -> Option<std::time::Instant> {
        *self.vote_request.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn longest(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.longest_us.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl RaftPeerService {
    pub(crate) fn new(
        raft: Raft<TypeConfig>,
        proposer: Proposer,
        refusals: Arc<Refusals>,
        removal: Arc<Removal>,
        silence: Arc<LeaderSilence>,
        timings: crate::election::Timings,
    ) -> Self {
        Self {
            raft,
            proposer,
            refusals,
            removal,
            silence,
            timings,
        }
    }

    fn own_term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Counts and logs a refused message; the caller gets the refusal's status.
    fn refuse<T>(&self, request: &Request<T>, refused: Refused) -> Status {
        let remote = request
            .extensions()
            .get::<troupe_transport::ConnInfo>()
            .and_then(|info| info.remote);
        self.refusals
            .refuse(refused.refusal, "peer", remote, &refused.reason);
        refused.refusal.status(&refused.reason)
    }
}

/// openraft's answer as the peer gets it, or `UNAVAILABLE` when this node's Raft core has
/// stopped (it panicked, or its storage failed): that is this node's failure, not an answer to
/// the message, and the node logs it.
fn answer<T, E, Reply>(
    result: Result<T, RaftError<NodeId, E>>,
    reply: impl FnOnce(Result<T, E>) -> Reply,
) -> Result<Response<Reply>, Status> {
    match result {
        Err(RaftError::Fatal(fatal)) => {
            tracing::error!(%fatal, "the Raft core has stopped: this node cannot take part in the cluster until it is restarted");
            Err(Status::unavailable(format!(
                "this node's Raft core has stopped ({fatal}): it must be restarted"
            )))
        }
        Err(RaftError::APIError(error)) => Ok(Response::new(reply(Err(error)))),
        Ok(value) => Ok(Response::new(reply(Ok(value)))),
    }
}

/// An infallible openraft call's value.
fn infallible<T>(result: Result<T, openraft::error::Infallible>) -> T {
    match result {
        Ok(value) => value,
        Err(never) => match never {},
    }
}

/// The message, and the request without it (its metadata and extensions: the verified
/// sender, the connection), so decoding takes the message without a copy.
fn split<T>(request: Request<T>) -> (Request<()>, T) {
    let (metadata, extensions, message) = request.into_parts();
    (Request::from_parts(metadata, extensions, ()), message)
}

#[tonic::async_trait]
impl RaftPeer for RaftPeerService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesReply>, Status> {
        let (request, message) = split(request);
        let rpc = wire::append_request_from(message)
            .map_err(|error| self.refuse(&request, guard::malformed(error)))?;
        guard::append_entries(&rpc, VerifiedPeer::of(&request), self.own_term())
            .map_err(|refused| self.refuse(&request, refused))?;
        let term = rpc.vote.leader_id().term;
        let result = self.raft.append_entries(rpc).await;
        // A leader this node follows (not one it told of a higher vote).
        if let Ok(response) = &result {
            if !matches!(
                response,
                openraft::raft::AppendEntriesResponse::HigherVote(_)
            ) {
                self.silence.heard(term);
            }
        }
        if result.as_ref().is_ok_and(|response| response.is_success()) {
            // A leader replicates only to members: whatever refusals said, this node is one.
            self.removal.heard_from_leader();
        }
        answer(result, |r| wire::append_reply_to(&infallible(r)))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteReply>, Status> {
        let (request, message) = split(request);
        let rpc = wire::vote_request_from(message)
            .map_err(|error| self.refuse(&request, guard::malformed(error)))?;
        guard::vote(&rpc, VerifiedPeer::of(&request), self.own_term())
            .map_err(|refused| self.refuse(&request, refused))?;
        self.silence.vote_requested();
        answer(self.raft.vote(rpc).await, |r| {
            wire::vote_reply_to(&infallible(r))
        })
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotReply>, Status> {
        let (request, message) = split(request);
        let rpc = wire::snapshot_request_from(message)
            .map_err(|error| self.refuse(&request, guard::malformed(error)))?;
        guard::install_snapshot(&rpc, VerifiedPeer::of(&request), self.own_term())
            .map_err(|refused| self.refuse(&request, refused))?;
        let term = rpc.vote.leader_id().term;
        let result = self.raft.install_snapshot(rpc).await;
        if result.is_ok() {
            self.silence.heard(term);
        }
        answer(result, |r| wire::snapshot_reply_to(&r))
    }

    async fn pre_vote(
        &self,
        request: Request<PreVoteRequest>,
    ) -> Result<Response<PreVoteResponse>, Status> {
        guard::pre_vote(request.get_ref(), VerifiedPeer::of(&request))
            .map_err(|refused| self.refuse(&request, refused))?;
        Ok(Response::new(crate::election::answer(
            &self.raft,
            &self.silence,
            self.timings,
            request.get_ref(),
        )))
    }

    async fn propose(
        &self,
        request: Request<pb::Proposal>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let (request, message) = split(request);
        let proposal = wire::proposal_from(message)
            .map_err(|error| self.refuse(&request, guard::malformed(error)))?;
        // A forwarded write is checked here too: nothing invalid reaches the log, whoever
        // proposes it.
        let result: ForwardedWrite = match crate::metadata::state::check_command(&proposal.command)
        {
            Err(reason) => Ok(crate::metadata::Outcome::Rejected { reason }),
            Ok(()) => self.proposer.write(proposal).await,
        };
        Ok(Response::new(wire::write_result_to(&result)))
    }

    async fn read_index(
        &self,
        _request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexReply>, Status> {
        let result: ForwardedReadIndex = match self.raft.ensure_linearizable().await {
            Ok(read_log_id) => Ok(read_log_id.map_or(0, |log_id| log_id.index)),
            Err(error) => Err(error.to_string()),
        };
        Ok(Response::new(wire::read_index_to(&result)))
    }
}
