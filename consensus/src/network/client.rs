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
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use troupe_proto::v1::raft_peer_client::RaftPeerClient;
use troupe_proto::v1::RaftPayload;
use troupe_transport::{Lane, PeerTransport, Refusal};

use super::{decode, encode};
use crate::removal::Removal;
use crate::types::{NodeAddr, NodeId, TypeConfig};

/// Builds a [`PeerClient`] for each peer openraft replicates to.
#[derive(Clone)]
pub struct PeerNetworkFactory {
    pub transport: Arc<PeerTransport>,
    pub removal: Arc<Removal>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddr) -> PeerClient {
        PeerClient {
            target,
            addr: node.peer_addr.clone(),
            transport: self.transport.clone(),
            removal: self.removal.clone(),
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
    /// RPCs in a row that got no answer: timed out, cut off, or dropped by openraft's own
    /// timeout before they completed.
    unanswered: u32,
    /// A call is under way; still set at the next call, it was dropped unanswered.
    pending: bool,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        request: &Req,
        option: &RPCOption,
        method: fn(RaftPeerClient<Channel>, tonic::Request<RaftPayload>) -> futures_call::BoxedCall,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = encode(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
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
        let mut request = tonic::Request::new(payload);
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
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

/// The generated client methods, boxed so one `call` serves all three RPCs.
mod futures_call {
    use std::future::Future;
    use std::pin::Pin;

    use tonic::transport::Channel;
    use troupe_proto::v1::raft_peer_client::RaftPeerClient;
    use troupe_proto::v1::RaftPayload;

    pub type BoxedCall = Pin<Box<dyn Future<Output = Result<RaftPayload, tonic::Status>> + Send>>;

    pub fn append_entries(
        mut client: RaftPeerClient<Channel>,
        request: tonic::Request<RaftPayload>,
    ) -> BoxedCall {
        Box::pin(async move {
            client
                .append_entries(request)
                .await
                .map(tonic::Response::into_inner)
        })
    }

    pub fn vote(
        mut client: RaftPeerClient<Channel>,
        request: tonic::Request<RaftPayload>,
    ) -> BoxedCall {
        Box::pin(async move { client.vote(request).await.map(tonic::Response::into_inner) })
    }

    pub fn install_snapshot(
        mut client: RaftPeerClient<Channel>,
        request: tonic::Request<RaftPayload>,
    ) -> BoxedCall {
        Box::pin(async move {
            client
                .install_snapshot(request)
                .await
                .map(tonic::Response::into_inner)
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(&rpc, &option, futures_call::append_entries).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(&rpc, &option, futures_call::install_snapshot)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(&rpc, &option, futures_call::vote).await
    }
}
