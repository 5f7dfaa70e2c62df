//! Three nodes in one process serving the real all-MiniLM-L6-v2, pushed to one node and pulled
//! by the others: the rollout's time is printed (the 90 MB version, uncapped, on loopback).
//! Then clients saturate every node (both cores busy with forward passes) for
//! `TROUPE_SOAK_SECS` seconds (default 180): Raft keeps its leader and term, and no node marks
//! a peer down. Raft and heartbeats run on the async runtime; forward passes run on compute
//! threads at a lower priority (`serving.compute_nice`), so control work does not queue
//! behind inference.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use troupe_actors::PeerState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturating_inference_moves_no_raft_leader_and_marks_no_peer_down() {
    let Some(model) = real_model() else { return };
    let soak = Duration::from_secs(
        std::env::var("TROUPE_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(180),
    );
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_cluster_with(&dir, 3, |_, config| {
        config.cluster.heartbeat_interval_ms = 100;
        config.cluster.suspect_after = 3;
        config.cluster.down_after = 10;
    })
    .await;
    let first = nodes[0].api_addr.to_string();
    let bytes = troupe_models::artifact::Manifest::of_dir(&model)
        .unwrap()
        .total_bytes();

    push_model(&first, &model, "minilm", "1").await;
    let started = Instant::now();
    let activated = troupe(args(&[
        "models",
        "activate",
        "minilm",
        "1",
        "--addr",
        &first,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await;
    assert!(activated.status.success(), "{:?}", text(&activated));
    eprintln!(
        "rollout: {:.1} MB version active on 3 nodes {:.2} s after activate (2 pulls from a peer, verify, load, warm-up; uncapped)",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    for node in &nodes {
        wait_serving(node).await;
    }

    let status = |i: usize| nodes[i].metadata.status();
    let (leader, term) = (status(0).leader, status(0).term);
    assert!(leader.is_some());
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..6 {
            let mut client = inference_client(node).await;
            let (stop, served, failures) = (stop.clone(), served.clone(), failures.clone());
            clients.push(tokio::spawn(async move {
                let texts =
                    ["a sentence of about sixteen tokens to keep both cores busy all the time"; 8];
                while !stop.load(Ordering::Relaxed) {
                    match client.embed(embed_request("minilm", &texts, "")).await {
                        Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            eprintln!("request failed: {status}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
    }

    // Watch every node's view of its peers for the whole run, and the worst RTT seen.
    let began = Instant::now();
    let mut worst = PeerState::Up;
    let mut suspect_events = 0;
    let mut max_rtt = Duration::ZERO;
    let mut rtts = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while began.elapsed() < soak {
        tick.tick().await;
        for node in &nodes {
            for peer in node.tree.peers.snapshot() {
                if peer.state == PeerState::Suspect {
                    suspect_events += 1;
                }
                if peer.state > worst {
                    worst = peer.state;
                    eprintln!(
                        "node {} sees node {} {} at {:.1} s",
                        node.metadata.node_id(),
                        peer.node_id,
                        peer.state.as_str(),
                        began.elapsed().as_secs_f64()
                    );
                }
                if let Some(rtt) = peer.rtt {
                    max_rtt = max_rtt.max(rtt);
                    rtts.push(rtt);
                }
            }
        }
        for i in 0..3 {
            let now = status(i);
            assert_eq!(
                (now.leader, now.term),
                (leader, term),
                "node {} saw a leader change at {:.1} s (longest leader silences, ms: {:?})",
                i + 1,
                began.elapsed().as_secs_f64(),
                (0..3)
                    .map(|i| status(i).longest_leader_silence_ms)
                    .collect::<Vec<_>>()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    rtts.sort();
    let p99 = rtts[rtts.len() * 99 / 100];
    let served = served.load(Ordering::Relaxed);
    eprintln!(
        "soak: {:.0} s, {served} requests of 8 texts ({:.1} req/s), failures {}, heartbeat rtt p99 {:.2} ms max {:.2} ms, suspect samples {suspect_events}, worst peer state {}",
        soak.as_secs_f64(),
        served as f64 / soak.as_secs_f64(),
        failures.load(Ordering::Relaxed),
        p99.as_secs_f64() * 1e3,
        max_rtt.as_secs_f64() * 1e3,
        worst.as_str()
    );
    // The margin: a follower stands for election after 150-300 ms without its leader.
    eprintln!(
        "longest time a follower went without an AppendEntries from its leader, ms: {:?}",
        (0..3)
            .filter(|&i| status(i).leader != Some(status(i).node_id))
            .map(|i| (i + 1, status(i).longest_leader_silence_ms))
            .collect::<Vec<_>>()
    );
    assert_ne!(worst, PeerState::Down, "a peer was marked down under load");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(served > 0);
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}
