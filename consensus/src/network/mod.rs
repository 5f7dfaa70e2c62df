//! Raft over tonic on the peer port: [`client`] is openraft's network (one lazily connected
//! channel per peer), [`server`] the `troupe.v1.RaftPeer` service that feeds incoming RPCs to
//! the local Raft. Messages are typed protobuf ([`wire`] converts openraft's types both ways).

pub mod client;
pub mod guard;
pub mod server;
pub mod wire;

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

/// Decodes `bytes` as every message the peer port's Raft service takes, and runs the guard and
/// the command check on whatever decodes. For the fuzz target and its corpus replay: it must
/// never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_payload(bytes: &[u8]) {
    use prost::Message;
    use troupe_proto::v1 as pb;
    use troupe_transport::VerifiedPeer;
    let peer = Some(VerifiedPeer::Node(1));
    let own_term = bytes.first().copied().map_or(1, u64::from);
    if let Some(rpc) = pb::VoteRequest::decode(bytes)
        .ok()
        .and_then(|m| wire::vote_request_from(m).ok())
    {
        let _ = guard::vote(&rpc, peer, own_term);
    }
    if let Some(rpc) = pb::AppendEntriesRequest::decode(bytes)
        .ok()
        .and_then(|m| wire::append_request_from(m).ok())
    {
        let _ = guard::append_entries(&rpc, peer, own_term);
        let _ = wire::append_request_to(&rpc).encoded_len();
    }
    if let Some(rpc) = pb::InstallSnapshotRequest::decode(bytes)
        .ok()
        .and_then(|m| wire::snapshot_request_from(m).ok())
    {
        let _ = guard::install_snapshot(&rpc, peer, own_term);
    }
    if let Some(proposal) = pb::Proposal::decode(bytes)
        .ok()
        .and_then(|m| wire::proposal_from(m).ok())
    {
        let _ = crate::metadata::state::check_command(&proposal.command);
    }
    // The replies a peer sends back: decoded the same way by the asking side.
    let _ = pb::AppendEntriesReply::decode(bytes).map(wire::append_reply_from);
    let _ = pb::VoteReply::decode(bytes).map(wire::vote_reply_from);
    let _ = pb::InstallSnapshotReply::decode(bytes).map(wire::snapshot_reply_from);
    let _ = pb::ProposeReply::decode(bytes).map(wire::write_result_from);
    let _ = pb::ReadIndexReply::decode(bytes).map(wire::read_index_from);
}
