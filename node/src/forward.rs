//! Forwarding an Embed request to a peer (`troupe.v1.Peer/Forward` on its peer port).
//!
//! Forwarded inference has connections of its own, one per peer, kept open and reused: it
//! never shares an HTTP/2 connection with Raft, heartbeats or blob transfers, so none of them
//! queues behind the others. The request keeps the client's remaining deadline (as
//! `grpc-timeout`), its task and its trace context (`traceparent`), and says which node sent
//! it (`x-troupe-forwarded-by`): the receiver serves it itself or refuses, and never forwards
//! it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use troupe_proto::v1::peer_client::PeerClient;
use troupe_proto::v1::{EmbedRequest, EmbedResponse};

/// Metadata naming the node that forwarded a request.
pub const FORWARDED_BY_HEADER: &str = "x-troupe-forwarded-by";

/// W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

pub struct Forwarder {
    node_id: u64,
    connect_timeout: Duration,
    max_message_bytes: usize,
    channels: Mutex<HashMap<u64, (String, Channel)>>,
}

impl Forwarder {
    pub fn new(node_id: u64, connect_timeout: Duration, max_message_bytes: usize) -> Self {
        Self {
            node_id,
            connect_timeout,
            max_message_bytes,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The peer's forwarding connection, opened on first use (and again if its address
    /// changed). tonic reconnects a broken one by itself.
    fn channel(&self, peer: u64, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((known, channel)) = channels.get(&peer) {
            if known == addr {
                return Ok(channel.clone());
            }
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| {
                Status::unavailable(format!("node {peer} has a bad peer address {addr:?}: {e}"))
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(peer, (addr.to_owned(), channel.clone()));
        Ok(channel)
    }

    /// Sends `request` to `peer` with `timeout` left of the client's deadline.
    pub async fn forward(
        &self,
        peer: u64,
        addr: &str,
        request: EmbedRequest,
        timeout: Duration,
        traceparent: &str,
    ) -> Result<EmbedResponse, Status> {
        let channel = self.channel(peer, addr)?;
        let mut client = PeerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes.max(64 * 1024 * 1024))
            .max_encoding_message_size(self.max_message_bytes.max(64 * 1024 * 1024));
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        let metadata = request.metadata_mut();
        metadata.insert(FORWARDED_BY_HEADER, self.node_id.into());
        if let Ok(value) = traceparent.parse() {
            metadata.insert(TRACEPARENT_HEADER, value);
        }
        let answer = tokio::time::timeout(timeout, client.forward(request)).await;
        match answer {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // A status with a source came from this side's transport (connection refused or
            // reset: the peer died or restarted), not from the peer: another node may serve.
            Ok(Err(status)) if std::error::Error::source(&status).is_some() => {
                Err(Status::unavailable(format!(
                    "node {peer} ({addr}) could not be reached: {}",
                    status.message()
                )))
            }
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node {peer} did not answer within the {} ms left of the request's deadline",
                timeout.as_millis()
            ))),
        }
    }
}

/// The request's trace context: the caller's `traceparent` when it sent a valid one, else a
/// new trace with this request as its root.
pub fn trace_context<T>(request: &tonic::Request<T>, seed: &str) -> String {
    if let Some(value) = request
        .metadata()
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        if valid_traceparent(value) {
            return value.to_owned();
        }
    }
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let mut high = state.build_hasher();
    high.write(seed.as_bytes());
    let mut low = state.build_hasher();
    low.write_u64(high.finish());
    let mut span = state.build_hasher();
    span.write_u64(low.finish());
    format!(
        "00-{:016x}{:016x}-{:016x}-01",
        high.finish(),
        low.finish(),
        span.finish() | 1
    )
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, ids not all zero.
fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// The trace id of a `traceparent`.
pub fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_kept_and_a_bad_one_replaced() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert(TRACEPARENT_HEADER, good.parse().unwrap());
        assert_eq!(trace_context(&request, "r1"), good);
        assert_eq!(trace_id(good), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-01",
            "zz",
        ] {
            let mut request = tonic::Request::new(());
            request
                .metadata_mut()
                .insert(TRACEPARENT_HEADER, bad.parse().unwrap());
            let made = trace_context(&request, "r1");
            assert!(valid_traceparent(&made), "{made}");
            assert_ne!(made, bad);
        }
    }
}
