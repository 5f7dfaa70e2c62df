//! The health-gossip part of `troupe cluster status`: each node's view of its peers, as
//! JSON and as a compact table.

use serde::Serialize;
use troupe_proto::v1::PeerHealthEntry;

/// One peer as one node's heartbeats see it.
#[derive(Serialize)]
pub struct PeerHealthView {
    node_id: u64,
    peer_addr: String,
    /// unknown, up, suspect or down.
    state: String,
    missed: u32,
    rtt_micros: Option<u64>,
    clock_offset_micros: i64,
    queue_depth: u64,
    in_flight: u64,
    versions: Vec<String>,
    default_versions: Vec<String>,
    raft_role: String,
    term: u64,
    leader: Option<u64>,
    applied_index: u64,
    applied_revision: u64,
    sync_lag: u64,
    serving: bool,
    backup: bool,
    last_seen_ms_ago: Option<u64>,
}

impl From<PeerHealthEntry> for PeerHealthView {
    fn from(entry: PeerHealthEntry) -> Self {
        Self {
            node_id: entry.node_id,
            peer_addr: entry.peer_addr,
            state: entry.state,
            missed: entry.missed,
            rtt_micros: entry.rtt_micros,
            clock_offset_micros: entry.clock_offset_micros,
            queue_depth: entry.queue_depth,
            in_flight: entry.in_flight,
            versions: entry.versions,
            default_versions: entry.default_versions,
            raft_role: entry.raft_role,
            term: entry.term,
            leader: entry.leader,
            applied_index: entry.applied_index,
            applied_revision: entry.applied_revision,
            sync_lag: entry.sync_lag,
            serving: entry.serving,
            backup: entry.backup,
            last_seen_ms_ago: entry.last_seen_ms_ago,
        }
    }
}

/// One line per (observer, peer): state, RTT, load (queued/in flight), sync lag, clock
/// offset, and how long ago the peer last answered.
pub fn print_table<'a>(views: impl IntoIterator<Item = (u64, &'a [PeerHealthView])>) {
    let views: Vec<(u64, &[PeerHealthView])> = views
        .into_iter()
        .filter(|(_, peers)| !peers.is_empty())
        .collect();
    if views.is_empty() {
        return;
    }
    println!("\nheartbeats (as each reachable node sees its peers):");
    println!(
        "{:>4}  {:>4}  {:<8}  {:>8}  {:>11}  {:>6}  {:>10}  {:>9}",
        "from", "to", "state", "rtt_ms", "load q/f", "lag", "offset_ms", "seen_ago"
    );
    let millis = |micros: i64| format!("{:.2}", micros as f64 / 1000.0);
    for (from, peers) in views {
        for peer in peers {
            println!(
                "{:>4}  {:>4}  {:<8}  {:>8}  {:>11}  {:>6}  {:>10}  {:>9}",
                from,
                peer.node_id,
                peer.state,
                peer.rtt_micros.map_or("-".into(), |rtt| millis(rtt as i64)),
                format!("{}/{}", peer.queue_depth, peer.in_flight),
                peer.sync_lag,
                if peer.last_seen_ms_ago.is_some() {
                    millis(peer.clock_offset_micros)
                } else {
                    "-".into()
                },
                peer.last_seen_ms_ago
                    .map_or("never".into(), |ago| format!("{ago} ms")),
            );
        }
    }
}
