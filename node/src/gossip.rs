//! Health gossip's client side: [`GrpcPeerProbe`] sends `troupe.v1.Peer/Heartbeat` over the
//! transport's heartbeat lane (one HTTP/2 connection per peer, kept and reused), so
//! heartbeats never queue behind Raft, forwarded inference or blob transfers, which use lanes
//! of their own. A connection that fails is dropped and made again on the next heartbeat.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe_actors::health::probe::unix_micros;
use troupe_actors::{HeartbeatReply, ModelKey, PeerProbe, ServedVersion};
use troupe_proto::v1::peer_client::PeerClient;
use troupe_proto::v1::{HeartbeatRequest, HeartbeatResponse};
use troupe_transport::{Lane, PeerTransport};

/// Heartbeats peers over their own connections.
pub struct GrpcPeerProbe {
    node_id: u64,
    transport: Arc<PeerTransport>,
}

impl GrpcPeerProbe {
    pub fn new(node_id: u64, transport: Arc<PeerTransport>) -> Self {
        Self { node_id, transport }
    }
}

impl PeerProbe for GrpcPeerProbe {
    fn heartbeat(
        &self,
        peer_id: u64,
        peer_addr: String,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<HeartbeatReply, String>> + Send>> {
        let transport = self.transport.clone();
        let from_node = self.node_id;
        Box::pin(async move {
            let channel = transport
                .channel(Lane::Heartbeat, peer_id, &peer_addr)
                .map_err(|e| e.to_string())?;
            let mut client = PeerClient::new(channel);
            let sent = unix_micros();
            let mut request = tonic::Request::new(HeartbeatRequest {
                from_node,
                sent_unix_micros: sent,
            });
            request.set_timeout(timeout);
            let started = Instant::now();
            // The deadline covers connecting too (the channel connects on first use).
            let answer = tokio::time::timeout(timeout, client.heartbeat(request))
                .await
                .unwrap_or_else(|_| {
                    Err(tonic::Status::deadline_exceeded(format!(
                        "no answer within {} ms",
                        timeout.as_millis()
                    )))
                });
            let round_trip = started.elapsed();
            let returned = unix_micros();
            match answer {
                Ok(response) => reply(response.into_inner(), sent, returned, round_trip),
                Err(status) => {
                    // Start over on a fresh connection next time (the peer may have restarted),
                    // unless the peer answered: a refusal came over a working connection.
                    if troupe_transport::Refusal::of(&status).is_none() {
                        transport.forget(Lane::Heartbeat, peer_id);
                    }
                    Err(format!("{}: {}", status.code(), status.message()))
                }
            }
        })
    }
}

/// The wire answer as Health's plain type; a malformed one is refused, naming the field.
fn reply(
    response: HeartbeatResponse,
    sent: u64,
    returned: u64,
    round_trip: Duration,
) -> Result<HeartbeatReply, String> {
    let load = response
        .load
        .ok_or("the heartbeat answer has no 'load' field")?;
    let mut versions = Vec::with_capacity(response.versions.len());
    for served in response.versions {
        if served.model.is_empty() || served.version.is_empty() {
            return Err(format!(
                "the heartbeat answer names a served version without a model or version: {:?}@{:?}",
                served.model, served.version
            ));
        }
        versions.push(ServedVersion {
            key: ModelKey {
                name: served.model,
                version: served.version,
            },
            default_for_model: served.default_for_model,
        });
    }
    Ok(HeartbeatReply {
        node_id: response.node_id,
        sent_unix_micros: sent,
        received_unix_micros: response.received_unix_micros,
        replied_unix_micros: response.replied_unix_micros,
        returned_unix_micros: returned,
        round_trip,
        queue_depth: load.queue_depth,
        in_flight: load.in_flight,
        versions,
        raft_role: response.raft_role,
        term: response.term,
        leader: response.leader,
        applied_index: response.applied_index,
        applied_revision: response.applied_revision,
        serving: response.serving,
        backup: response.backup,
    })
}
