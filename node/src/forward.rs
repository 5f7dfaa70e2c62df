//! Forwarding an Embed or a Generate to a peer (`troupe.v1.Peer/Forward` and
//! `ForwardGenerate` on its peer port): the node's side of the dispatcher's forward hop.
//!
//! Forwarded inference has connections of its own (the transport's forward lane), one per
//! peer, kept open and reused: it never shares an HTTP/2 connection with Raft, heartbeats or
//! blob transfers, so none of them queues behind the others. The request keeps the client's
//! remaining deadline (as `grpc-timeout`), its task and its trace context (`traceparent`), and
//! says which node sent it (`x-troupe-forwarded-by`): the receiver serves it itself or
//! refuses, and never forwards it again.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;
use troupe_actors::PeerView;
use troupe_proto::v1::peer_client::PeerClient;
use troupe_proto::v1::{EmbedRequest, EmbedResponse};
use troupe_transport::{Lane, PeerTransport};

use crate::metrics::NodeMetrics;

/// Metadata naming the node that forwarded a request.
pub const FORWARDED_BY_HEADER: &str = "x-troupe-forwarded-by";

/// Metadata naming the serving-table revision the forwarding node routed at: the receiver
/// serves only once its own table is at least there, so a rollout never looks undone to a
/// client (a request served by the new version, then one forwarded to a node still on the old).
pub const MIN_REVISION_HEADER: &str = "x-troupe-min-revision";

/// W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

pub struct Forwarder {
    node_id: u64,
    max_message_bytes: usize,
    transport: Arc<PeerTransport>,
    /// Counts each forwarded request by the peer's answer.
    metrics: Arc<NodeMetrics>,
}

/// How a forwarded request is sent: what is left of the client's deadline (the peer's
/// `grpc-timeout`), the trace's next hop and the revision the sender routed at.
pub struct Hop {
    pub remaining: Duration,
    pub traceparent: String,
    pub min_revision: u64,
}

impl Forwarder {
    pub fn new(
        node_id: u64,
        transport: Arc<PeerTransport>,
        max_message_bytes: usize,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        Self {
            node_id,
            max_message_bytes,
            transport,
            metrics,
        }
    }

    /// A client of `peer`'s forwarding connection, opened on first use (and again if its
    /// address changed). tonic reconnects a broken one by itself.
    fn client(&self, peer: &PeerView) -> Result<PeerClient<Channel>, Status> {
        let channel = self
            .transport
            .channel(Lane::Forward, peer.node_id, &peer.peer_addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let bound = self.max_message_bytes.max(64 * 1024 * 1024);
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(bound)
            .max_encoding_message_size(bound))
    }

    /// `body` as a request of this hop, with its deadline, origin, revision and trace.
    fn request<T>(&self, body: T, hop: &Hop) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        request.set_timeout(hop.remaining);
        let metadata = request.metadata_mut();
        metadata.insert(FORWARDED_BY_HEADER, self.node_id.into());
        metadata.insert(MIN_REVISION_HEADER, hop.min_revision.into());
        if let Ok(value) = hop.traceparent.parse() {
            metadata.insert(TRACEPARENT_HEADER, value);
        }
        request
    }

    /// Sends an Embed to `peer`. The dispatcher bounds the wait by the request's deadline.
    pub async fn forward(
        &self,
        peer: &PeerView,
        request: EmbedRequest,
        hop: Hop,
    ) -> Result<EmbedResponse, Status> {
        let answer = async {
            let mut client = self.client(peer)?;
            client
                .forward(self.request(request, &hop))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| unreachable(peer, status))
        }
        .await;
        self.counted(peer, answer)
    }

    /// `answer` from `peer`, counted in the forwarded-requests metric by its code.
    fn counted<T>(&self, peer: &PeerView, answer: Result<T, Status>) -> Result<T, Status> {
        let code = answer.as_ref().err().map(Status::code);
        self.metrics.record_forward(peer.node_id, code);
        answer
    }

    /// Sends a generation to `peer` and returns its stream once the first chunk has come (so
    /// that a refusal can still go to the next node), relayed chunk by chunk after. The
    /// dispatcher bounds the wait for the first chunk by the request's deadline.
    pub async fn forward_generate(
        &self,
        peer: &PeerView,
        request: troupe_proto::v1::GenerateRequest,
        hop: Hop,
    ) -> Result<crate::server::generate::ChunkStream, Status> {
        use tokio_stream::StreamExt;
        let started = async {
            let mut client = self.client(peer)?;
            let mut stream = client
                .forward_generate(self.request(request, &hop))
                .await
                .map_err(|status| unreachable(peer, status))?
                .into_inner();
            match stream
                .message()
                .await
                .map_err(|status| unreachable(peer, status))?
            {
                Some(first) => Ok((first, stream)),
                None => Err(Status::unavailable(format!(
                    "node {} ended the generation before its first chunk",
                    peer.node_id
                ))),
            }
        }
        .await;
        let (first, stream) = self.counted(peer, started)?;
        let peer = peer.clone();
        Ok(Box::pin(tokio_stream::once(Ok(first)).chain(stream.map(
            move |item| item.map_err(|status| unreachable(&peer, status)),
        ))))
    }
}

/// A status with a source came from this side's transport (connection refused or reset: the
/// peer died or restarted), not from the peer: UNAVAILABLE, so another node may serve.
fn unreachable(peer: &PeerView, status: Status) -> Status {
    if std::error::Error::source(&status).is_some() {
        Status::unavailable(format!(
            "node {} ({}) could not be reached: {}",
            peer.node_id,
            peer.peer_addr,
            status.message()
        ))
    } else {
        status
    }
}

/// A request's W3C trace context on this node: the trace it belongs to, the span that sent it
/// (the caller's, when the caller sent a `traceparent`), and this node's own span for it.
/// A request forwarded on carries this node's span as its parent, so the spans of one request
/// on two nodes form one tree: client span, then node 1's span, then node 2's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// The caller's span (16 hex digits), or `None` when this request starts the trace.
    pub parent_id: Option<String>,
    /// This node's span for the request (16 hex digits, not all zero).
    pub span_id: String,
    /// The trace flags (2 hex digits; `01` is sampled).
    pub flags: String,
}

impl TraceContext {
    /// The caller's trace when it sent a valid `traceparent`, else a new trace with this
    /// request as its root. `seed` (unique per request) goes into the new ids.
    pub fn of<T>(request: &tonic::Request<T>, seed: &str) -> Self {
        let mut ids = Ids::new(seed);
        let span_id = ids.span_id();
        let caller = request
            .metadata()
            .get(TRACEPARENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        match caller {
            Some((trace_id, parent_id, flags)) => Self {
                trace_id: trace_id.to_ascii_lowercase(),
                parent_id: Some(parent_id.to_ascii_lowercase()),
                span_id,
                flags: flags.to_ascii_lowercase(),
            },
            None => Self {
                trace_id: format!("{:016x}{:016x}", ids.next(), ids.next()),
                parent_id: None,
                span_id,
                flags: "01".into(),
            },
        }
    }

    /// Whether the trace flags' sampled bit is set.
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.flags, 16).is_ok_and(|flags| flags & 1 == 1)
    }

    /// The `traceparent` for the next hop: this trace, with this node's span as the parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// Random 64-bit ids (std's per-process random hasher keys, mixed with a per-request seed).
struct Ids(std::collections::hash_map::DefaultHasher);

impl Ids {
    fn new(seed: &str) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write(seed.as_bytes());
        Self(hasher)
    }

    fn next(&mut self) -> u64 {
        use std::hash::Hasher;
        let id = self.0.finish();
        self.0.write_u64(id);
        id
    }

    /// Never all zero.
    fn span_id(&mut self) -> String {
        format!("{:016x}", self.next() | 1)
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` (ids not all zero), as
/// `(trace id, parent id, flags)`. A later version's longer value keeps its first 4 parts.
fn parse_traceparent(value: &str) -> Option<(&str, &str, &str)> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    let version_ok = parts.first().is_some_and(|v| hex(v, 2) && *v != "ff");
    let fields_ok = match parts.first() {
        Some(&"00") => parts.len() == 4,
        _ => parts.len() >= 4,
    };
    (version_ok
        && fields_ok
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2))
    .then(|| (parts[1], parts[2], parts[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(traceparent: Option<&str>) -> TraceContext {
        let mut request = tonic::Request::new(());
        if let Some(value) = traceparent {
            request
                .metadata_mut()
                .insert(TRACEPARENT_HEADER, value.parse().unwrap());
        }
        TraceContext::of(&request, "r1")
    }

    #[test]
    fn a_callers_trace_is_continued_with_this_nodes_span_as_the_next_parent() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = context(Some(good));
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(trace.flags, "01");
        assert_ne!(trace.span_id, "00f067aa0ba902b7");
        let next = trace.traceparent();
        assert_eq!(
            next,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", trace.span_id)
        );
        assert_eq!(
            parse_traceparent(&next),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736",
                trace.span_id.as_str(),
                "01"
            ))
        );
        // Unsampled stays unsampled.
        let unsampled = context(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ));
        assert_eq!(unsampled.flags, "00");
        assert!(!unsampled.sampled());
        assert!(trace.sampled());
    }

    #[test]
    fn a_bad_or_missing_traceparent_starts_a_new_trace() {
        for bad in [
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-01"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            Some("zz"),
        ] {
            let trace = context(bad);
            assert_eq!(trace.parent_id, None, "{bad:?}");
            assert_ne!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
            let made = trace.traceparent();
            assert!(parse_traceparent(&made).is_some(), "{made}");
        }
        // Each request gets its own trace.
        assert_ne!(context(None).trace_id, context(None).trace_id);
        // A later version's extra fields are ignored.
        let later = context(Some(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ));
        assert_eq!(later.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
