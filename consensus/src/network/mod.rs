//! Raft over tonic on the peer port: [`client`] is openraft's network (one lazily connected
//! channel per peer), [`server`] the `troupe.v1.RaftPeer` service that feeds incoming RPCs to
//! the local Raft. Messages are openraft's own types as JSON inside a `RaftPayload`.

pub mod client;
pub mod server;

use serde::de::DeserializeOwned;
use serde::Serialize;
use troupe_proto::v1::RaftPayload;

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
