//! The `troupe.v1.RaftPeer` service: decodes each RPC, hands it to the local Raft, encodes
//! the result (success or Raft's own error) back.

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::Raft;
use serde::Serialize;
use tonic::{Request, Response, Status};
use troupe_proto::v1::raft_peer_server::RaftPeer;
use troupe_proto::v1::RaftPayload;

use super::{decode, encode};
use crate::metadata::Proposal;
use crate::types::{NodeId, TypeConfig};

/// The result of a forwarded write, as the follower receives it.
pub type ForwardedWrite = Result<
    ClientWriteResponse<TypeConfig>,
    RaftError<NodeId, ClientWriteError<NodeId, crate::types::NodeAddr>>,
>;

/// The result of a forwarded read-index request: the leader's applied revision once it has
/// confirmed leadership.
pub type ForwardedReadIndex = Result<u64, String>;

#[derive(Clone)]
pub struct RaftPeerService {
    raft: Raft<TypeConfig>,
    revisions: tokio::sync::watch::Receiver<u64>,
}

impl RaftPeerService {
    pub fn new(raft: Raft<TypeConfig>, revisions: tokio::sync::watch::Receiver<u64>) -> Self {
        Self { raft, revisions }
    }
}

fn invalid(what: &str, error: serde_json::Error) -> Status {
    Status::invalid_argument(format!("malformed {what} payload: {error}"))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value)
        .map(Response::new)
        .map_err(|e| Status::internal(format!("cannot encode reply: {e}")))
}

#[tonic::async_trait]
impl RaftPeer for RaftPeerService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request.get_ref()).map_err(|e| invalid("append_entries", e))?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request.get_ref()).map_err(|e| invalid("vote", e))?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(request.get_ref()).map_err(|e| invalid("install_snapshot", e))?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn propose(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let proposal: Proposal = decode(request.get_ref()).map_err(|e| invalid("propose", e))?;
        let result: ForwardedWrite = self.raft.client_write(proposal).await;
        reply(&result)
    }

    async fn read_index(
        &self,
        _request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let result: ForwardedReadIndex = match self.raft.ensure_linearizable().await {
            Ok(read_log_id) => {
                let index = read_log_id.map_or(0, |log_id| log_id.index);
                let mut revisions = self.revisions.clone();
                // The leader answers once its own state machine has applied the read index.
                let applied = match revisions.wait_for(|applied| *applied >= index).await {
                    Ok(applied) => Ok(*applied),
                    Err(_) => Err("state machine stopped".to_owned()),
                };
                applied
            }
            Err(error) => Err(error.to_string()),
        };
        reply(&result)
    }
}
