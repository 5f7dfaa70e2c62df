//! Health gossip between three real nodes in one process (`troupe_node::start`, gRPC on
//! 127.0.0.1): every node heartbeats the other two and records their RTT, clock offset, load,
//! Raft position and serving state; `troupe cluster status --json` shows it; a node that
//! stops is marked suspect, then down, within the configured number of heartbeats, and up
//! again once it is back on the same ports and data dir.

mod common;

use std::time::{Duration, Instant};

use common::*;
use troupe_actors::PeerState;
use troupe_node::config::NodeConfig;
use troupe_node::server::heartbeat::role_name;
use troupe_node::RunningNode;

const INTERVAL_MS: u64 = 50;
const SUSPECT_AFTER: u32 = 2;
const DOWN_AFTER: u32 = 5;

fn gossip(id: u64, config: &mut NodeConfig) {
    config.cluster.heartbeat_interval_ms = INTERVAL_MS;
    config.cluster.suspect_after = SUSPECT_AFTER;
    config.cluster.down_after = DOWN_AFTER;
    // Node 3 advertises itself as a backup.
    config.cluster.backup = id == 3;
}

/// Why `observer`'s view of `peer` does not (yet) match what `peer` says of itself.
fn mismatch(observer: &RunningNode, peer: &RunningNode) -> Option<String> {
    let peer_id = peer.metadata.node_id();
    let Some(view) = observer.tree.peers.get(peer_id) else {
        return Some(format!("peer {peer_id} is not in the table"));
    };
    let own = peer.metadata.status();
    let serving = peer.tree.health.borrow().serving;
    let checks = [
        (view.state == PeerState::Up, "state"),
        (view.rtt.is_some_and(|rtt| rtt > Duration::ZERO), "rtt"),
        (view.clock_offset_micros.abs() < 50_000, "clock offset"),
        (view.raft_role == role_name(own.role), "raft role"),
        (view.term == own.term, "term"),
        (view.leader == own.leader, "leader"),
        (view.applied_index == own.applied_index, "applied index"),
        (
            view.applied_revision == own.applied_revision,
            "applied revision",
        ),
        (view.sync_lag == 0, "sync lag"),
        (view.serving == serving, "serving"),
        (view.backup == (peer_id == 3), "backup"),
        (view.versions.is_empty(), "versions"),
    ];
    checks
        .iter()
        .find(|(ok, _)| !ok)
        .map(|(_, what)| format!("{what} of peer {peer_id}: {view:?} vs {own:?}"))
}

fn all_mismatches(nodes: &[RunningNode]) -> Vec<String> {
    let mut found = Vec::new();
    for observer in nodes {
        for peer in nodes {
            if observer.metadata.node_id() != peer.metadata.node_id() {
                if let Some(why) = mismatch(observer, peer) {
                    found.push(format!("node {}: {why}", observer.metadata.node_id()));
                }
            }
        }
    }
    found
}

/// Follows `observer`'s peer table until `peer` is down; returns when it was first seen
/// suspect and when down, measured from `since`.
async fn watch_until_down(
    observer: &RunningNode,
    peer: u64,
    since: Instant,
    deadline: Duration,
) -> (Option<Duration>, Duration) {
    let mut changes = observer.tree.peers.subscribe();
    let give_up = tokio::time::Instant::now() + deadline;
    let mut suspect_at = None;
    loop {
        match observer.tree.peers.state(peer) {
            PeerState::Suspect if suspect_at.is_none() => suspect_at = Some(since.elapsed()),
            PeerState::Down => return (suspect_at, since.elapsed()),
            _ => {}
        }
        let changed = tokio::time::timeout_at(give_up, changes.changed()).await;
        assert!(
            matches!(changed, Ok(Ok(()))),
            "node {} did not mark node {peer} down within {deadline:?} (state {:?})",
            observer.metadata.node_id(),
            observer.tree.peers.state(peer)
        );
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_see_every_peer_and_notice_one_going_down_and_coming_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = start_cluster_with(&dir, 3, gossip).await;
    let api: Vec<String> = nodes.iter().map(|n| n.api_addr.to_string()).collect();
    for (task, node) in [("search", 0), ("batch", 2)] {
        let set = troupe(args(&[
            "priorities",
            "set",
            task,
            "5",
            "--addr",
            &api[node],
        ]))
        .await;
        assert!(set.status.success(), "{:?}", text(&set));
    }

    // Every node sees both peers up, with the Raft position each reports of itself, once
    // the writes have been applied everywhere.
    let settled = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut changes = nodes[0].tree.peers.subscribe();
    loop {
        let mismatches = all_mismatches(&nodes);
        if mismatches.is_empty() {
            break;
        }
        // Every heartbeat changes the table, so this wakes at least once an interval.
        let changed = tokio::time::timeout_at(settled, changes.changed()).await;
        assert!(
            matches!(changed, Ok(Ok(()))),
            "gossip never settled: {mismatches:#?}"
        );
    }
    assert!(nodes[0].metadata.status().applied_revision >= 2);
    let mut rtts = Vec::new();
    let mut offsets = Vec::new();
    for node in &nodes {
        assert_eq!(node.tree.peers.own_sync_lag(), 0);
        for view in node.tree.peers.snapshot() {
            rtts.push(view.rtt.unwrap());
            offsets.push(view.clock_offset_micros);
        }
    }
    rtts.sort();
    println!(
        "heartbeat rtt over {} peer views: min {:.3} ms, median {:.3} ms, max {:.3} ms; clock offsets {:?} µs",
        rtts.len(),
        millis(rtts[0]),
        millis(rtts[rtts.len() / 2]),
        millis(rtts[rtts.len() - 1]),
        offsets
    );

    // The same through the real CLI: each node's peers, with their states and figures.
    let status = troupe(args(&["cluster", "status", "--addr", &api[0], "--json"])).await;
    assert!(status.status.success(), "{:?}", text(&status));
    let status: serde_json::Value = serde_json::from_str(&text(&status).0).unwrap();
    let listed = status["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    for node in listed {
        assert!(node["applied_revision"].is_u64() && node["reachable"] == true);
        assert_eq!(node["sync_lag"], 0, "{node}");
        let peers = node["peers"].as_array().unwrap();
        let ids: Vec<u64> = peers
            .iter()
            .map(|p| p["node_id"].as_u64().unwrap())
            .collect();
        let others: Vec<u64> = (1..=3)
            .filter(|id| Some(*id) != node["id"].as_u64())
            .collect();
        assert_eq!(ids, others, "{node}");
        for peer in peers {
            assert_eq!(peer["state"], "up", "{peer}");
            assert!(peer["rtt_micros"].as_u64().is_some_and(|r| r > 0), "{peer}");
            assert!(peer["raft_role"] == "leader" || peer["raft_role"] == "follower");
            assert_eq!(peer["backup"], peer["node_id"] == 3, "{peer}");
            assert!(peer["last_seen_ms_ago"].is_u64(), "{peer}");
        }
    }
    let table = troupe(args(&["cluster", "status", "--addr", &api[1]])).await;
    let (table, _) = text(&table);
    assert!(
        table.contains("heartbeats") && table.contains(" up "),
        "{table}"
    );
    println!("{table}");

    // Node 3 stops. Its peer port is the last thing to close, so the clock starts when its
    // shutdown has finished: from then on no heartbeat can be answered.
    let stopped = nodes.pop().unwrap();
    let (stopped_api, stopped_peer) = (stopped.api_addr, stopped.peer_addr);
    let shutdown_started = Instant::now();
    stopped.shutdown().await.unwrap();
    let gone = Instant::now();
    let interval = Duration::from_millis(INTERVAL_MS);
    let bound = interval * (DOWN_AFTER + 2) + Duration::from_secs(1);
    let (first, second) = tokio::join!(
        watch_until_down(&nodes[0], 3, gone, bound * 3),
        watch_until_down(&nodes[1], 3, gone, bound * 3),
    );
    let suspect =
        |at: Option<Duration>| at.map_or("never".into(), |at| format!("{:.0}", millis(at)));
    println!(
        "node 3 shut down in {:.0} ms; then suspect after {} / {} ms and down after {:.0} / {:.0} ms (nodes 1 / 2; bound {:.0} ms, {DOWN_AFTER} heartbeats of {INTERVAL_MS} ms)",
        millis(gone - shutdown_started),
        suspect(first.0),
        suspect(second.0),
        millis(first.1),
        millis(second.1),
        millis(bound),
    );
    for (observer, (suspect_at, down_at)) in [(1, first), (2, second)] {
        let suspect_at = suspect_at.unwrap_or_else(|| {
            panic!("node {observer} went straight to down without being suspect")
        });
        assert!(suspect_at < down_at);
        assert!(
            down_at <= bound,
            "node {observer} took {down_at:?} to mark node 3 down, more than {bound:?}"
        );
    }
    // The survivors still see each other, and the CLI shows node 3 down from both.
    for (observer, peer) in [(0, 1), (1, 0)] {
        let peer_id = nodes[peer].metadata.node_id();
        assert_eq!(nodes[observer].tree.peers.state(peer_id), PeerState::Up);
    }
    let status = troupe(args(&["cluster", "status", "--addr", &api[0], "--json"])).await;
    let status: serde_json::Value = serde_json::from_str(&text(&status).0).unwrap();
    for node in status["nodes"].as_array().unwrap() {
        let peers = node["peers"].as_array().unwrap();
        if node["id"] == 3 {
            assert!(node["reachable"] == false && peers.is_empty(), "{node}");
            continue;
        }
        let third = peers.iter().find(|p| p["node_id"] == 3).unwrap();
        assert_eq!(third["state"], "down", "{third}");
        assert!(third["missed"].as_u64().unwrap() >= u64::from(DOWN_AFTER));
    }

    // Back on the same ports and data dir: up again everywhere.
    let restarted_at = Instant::now();
    let restarted = start_node_with(3, &dir, |config| {
        gossip(3, config);
        config.api = stopped_api.to_string();
        config.peer = stopped_peer.to_string();
    })
    .await;
    nodes.push(restarted);
    wait_for(
        "every node to see every peer up again",
        Duration::from_secs(20),
        || async { all_mismatches(&nodes).is_empty().then_some(()) },
    )
    .await;
    println!(
        "node 3 seen up again {:.0} ms after its restart began",
        millis(restarted_at.elapsed())
    );

    for node in nodes {
        node.shutdown().await.unwrap();
    }
}
