//! How Health reaches a peer. The node implements [`PeerProbe`] over `troupe.v1.Peer`
//! (this crate speaks no gRPC), the same way it provides the artifact fetcher.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, UNIX_EPOCH};

use crate::peers::ServedVersion;

/// One answered heartbeat, with the four timestamps of an NTP exchange. The probe takes
/// `sent_unix_micros` and `returned_unix_micros` right around the call itself (after any
/// connecting), so neither they nor `round_trip` include connection set-up.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatReply {
    /// The node that answered.
    pub node_id: u64,
    /// t0: our wall clock when the request left, µs since the Unix epoch.
    pub sent_unix_micros: u64,
    /// t1: the peer's wall clock when the request arrived.
    pub received_unix_micros: u64,
    /// t2: the peer's wall clock when it answered.
    pub replied_unix_micros: u64,
    /// t3: our wall clock when the answer arrived.
    pub returned_unix_micros: u64,
    /// t3 - t0 on the monotonic clock.
    pub round_trip: Duration,
    pub queue_depth: u64,
    pub in_flight: u64,
    /// Versions loaded, warm and taking requests on the peer.
    pub versions: Vec<ServedVersion>,
    /// leader, follower, candidate, learner or shutdown.
    pub raft_role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub applied_index: u64,
    pub applied_revision: u64,
    /// SERVING on grpc.health.v1.
    pub serving: bool,
    pub backup: bool,
}

/// Sends one heartbeat to a peer.
pub trait PeerProbe: Send + Sync + 'static {
    /// Heartbeats `peer_id` at `peer_addr` (its peer port). The future resolves within
    /// `timeout`, connecting included; the error says why there was no answer.
    fn heartbeat(
        &self,
        peer_id: u64,
        peer_addr: String,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<HeartbeatReply, String>> + Send>>;
}

/// This machine's wall clock in µs since the Unix epoch (0 before it).
pub fn unix_micros() -> u64 {
    troupe_failpoints::wall_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
