//! openraft's network: a `RaftPeer` client per peer over the transport's Raft lane.

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tonic::transport::Channel;
use troupe_proto::v1::raft_peer_client::RaftPeerClient;
use troupe_transport::{Lane, PeerTransport, Refusal};

use super::wire;
use crate::removal::Removal;
use crate::store::Durable;
use crate::types::{NodeAddr, NodeId, TypeConfig};

/// Builds a [`PeerClient`] for each peer openraft replicates to.
#[derive(Clone)]
pub struct PeerNetworkFactory {
    pub transport: Arc<PeerTransport>,
    pub removal: Arc<Removal>,
    /// How far this node's log is on disk: a leader never sends a commit point past it.
    pub durable: Option<Durable>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerClient {
        PeerClient {
            target,
            addr: node.peer_addr.clone(),
            transport: self.transport.clone(),
            removal: self.removal.clone(),
            durable: self.durable.clone(),
            unanswered: 0,
            pending: false,
        }
    }
}

/// RPCs in a row to one peer that may go unanswered before its connection is dropped and
/// made anew (resolving its name again).
const UNANSWERED_BEFORE_RECONNECT: u32 = 2;

pub struct PeerClient {
    target: NodeId,
    addr: String,
    transport: Arc<PeerTransport>,
    removal: Arc<Removal>,
    durable: Option<Durable>,
    /// RPCs in a row that got no answer: timed out, cut off, or dropped by openraft's own
    /// timeout before they completed.
    unanswered: u32,
    /// A call is under way; still set at the next call, it was dropped unanswered.
    pending: bool,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>;

fn network_error<E: std::error::Error>(
    error: wire::Malformed,
) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&error))
}

impl PeerClient {
    /// Runs one RPC on this peer's channel (made anew after unanswered ones); the reply, or
    /// the error openraft expects for a dead, slow or refusing peer.
    async fn call<Req, Reply, E, Fut>(
        &mut self,
        request: Req,
        option: &RPCOption,
        method: impl FnOnce(RaftPeerClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> RpcResult<Reply, E>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<Reply>, tonic::Status>>,
        E: std::error::Error,
    {
        // A connection can go dead without a reset (the peer's address moved to another
        // host or network, a cut link): HTTP/2 keepalive notices only after seconds, and
        // until then every RPC on it times out. After a few unanswered RPCs in a row the
        // channel is dropped, and the next one connects anew.
        if std::mem::replace(&mut self.pending, true) {
            self.unanswered += 1;
        }
        if self.unanswered >= UNANSWERED_BEFORE_RECONNECT {
            self.transport.forget(Lane::Raft, self.target);
            self.unanswered = 0;
        }
        let client = match self.transport.channel(Lane::Raft, self.target, &self.addr) {
            Ok(channel) => super::peer_client(channel),
            Err(reason) => {
                self.pending = false;
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(reason.to_string()),
                )));
            }
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(option.hard_ttl());
        let reply = method(client, request).await;
        self.pending = false;
        let reply = reply.map_err(|status| {
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) {
                self.unanswered += 1;
            }
            if Refusal::of(&status) == Some(Refusal::NotMember) {
                self.removal.refused_by(self.target);
            }
            let error = std::io::Error::other(format!("{}: {}", status.code(), status.message()));
            match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled => RPCError::Unreachable(Unreachable::new(&error)),
                _ => RPCError::Network(NetworkError::new(&error)),
            }
        })?;
        self.unanswered = 0;
        self.removal.accepted_by(self.target);
        Ok(reply.into_inner())
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        // openraft may count this leader's copy of an entry before its flush ends; followers
        // learn a commit only once it has (see `crate::store::Durable`).
        if let Some(durable) = &self.durable {
            rpc.leader_commit = durable.clamp_commit(rpc.leader_commit);
        }
        let reply = self
            .call(
                wire::append_request_to(&rpc),
                &option,
                |mut c, r| async move { c.append_entries(r).await },
            )
            .await?;
        wire::append_reply_from(reply).map_err(network_error)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let reply = self
            .call(
                wire::snapshot_request_to(&rpc),
                &option,
                |mut c, r| async move { c.install_snapshot(r).await },
            )
            .await?;
        wire::snapshot_reply_from(reply)
            .map_err(network_error)?
            .map_err(|error| {
                RPCError::RemoteError(RemoteError::new(self.target, RaftError::APIError(error)))
            })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        let reply = self
            .call(
                wire::vote_request_to(&rpc),
                &option,
                |mut c, r| async move { c.vote(r).await },
            )
            .await?;
        wire::vote_reply_from(reply).map_err(network_error)
    }
}
