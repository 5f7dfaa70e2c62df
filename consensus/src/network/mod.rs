//! Raft over tonic on the peer port: [`client`] is openraft's network (one lazily connected
//! channel per peer), [`server`] the `troupe.v1.RaftPeer` service that feeds incoming RPCs to
//! the local Raft. Messages are openraft's own types as JSON inside a `RaftPayload`.

pub mod client;
pub mod guard;
pub mod server;

use serde::de::DeserializeOwned;
use serde::Serialize;
use troupe_proto::v1::RaftPayload;

/// Largest peer message either side sends or accepts. An append carries up to 64 entries of
/// up to 512 KiB of proposals each; snapshots travel in openraft's 3 MiB chunks.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A peer client that accepts and sends messages up to [`MAX_MESSAGE_BYTES`].
pub(crate) fn peer_client(
    channel: tonic::transport::Channel,
) -> troupe_proto::v1::raft_peer_client::RaftPeerClient<tonic::transport::Channel> {
    troupe_proto::v1::raft_peer_client::RaftPeerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Encodes a value for the wire.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, serde_json::Error> {
    Ok(RaftPayload {
        json: serde_json::to_vec(value)?,
    })
}

/// Decodes a payload; a malformed one is an error, never a panic.
pub(crate) fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, serde_json::Error> {
    serde_json::from_slice(&payload.json)
}

/// Decodes `bytes` as every payload the peer port's Raft service takes, and runs the guard and
/// the command check on whatever decodes. For the fuzz target and its corpus replay: it must
/// never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_payload(bytes: &[u8]) {
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    use troupe_transport::VerifiedPeer;
    let payload = RaftPayload {
        json: bytes.to_vec(),
    };
    let peer = Some(VerifiedPeer::Node(1));
    let own_term = bytes.first().copied().map_or(1, u64::from);
    if let Ok(rpc) = decode::<VoteRequest<crate::types::NodeId>>(&payload) {
        let _ = guard::vote(&rpc, peer, own_term);
    }
    if let Ok(rpc) = decode::<AppendEntriesRequest<crate::types::TypeConfig>>(&payload) {
        let _ = guard::append_entries(&rpc, peer, own_term);
    }
    if let Ok(rpc) = decode::<InstallSnapshotRequest<crate::types::TypeConfig>>(&payload) {
        let _ = guard::install_snapshot(&rpc, peer, own_term);
    }
    if let Ok(proposal) = decode::<crate::metadata::Proposal>(&payload) {
        let _ = crate::metadata::state::check_command(&proposal.command);
    }
}
