//! Three nodes in one process on 127.0.0.1: a version pushed to one node is pulled by the
//! others from it over the peer port, verified, loaded, and served by every node with the
//! same output; every node reports its readiness through Raft. A copy damaged on disk is
//! never loaded: it is dropped and pulled again from a peer with a good one. A capped pull
//! keeps to its cap, and heartbeats between the two nodes keep a small RTT meanwhile.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_pushed_to_one_node_is_pulled_by_the_others_and_served_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    let nodes = start_cluster(&dir, 3).await;
    let first = nodes[0].api_addr.to_string();

    push_model(&first, &model, "tiny", "1").await;
    // Node 2 gets the same bytes too; then node 1's copy is damaged on disk. The files
    // exist nowhere else (push sends no source directory).
    push_model(&nodes[1].api_addr.to_string(), &model, "tiny", "1").await;
    let digest = damage_stored_copy(&dir, 1, &model);
    std::fs::rename(&model, dir.path().join("elsewhere")).unwrap();
    let second = nodes[1].api_addr.to_string();
    let activated = troupe(args(&[
        "models",
        "activate",
        "tiny",
        "1",
        "--addr",
        &second,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await;
    assert!(activated.status.success(), "{:?}", text(&activated));
    for node in &nodes {
        wait_serving(node).await;
    }

    let texts = ["served by every node", "the same bytes everywhere"];
    let mut outputs = Vec::new();
    for node in &nodes {
        let reply = inference_client(node)
            .await
            .embed(embed_request("tiny", &texts, ""))
            .await
            .unwrap()
            .into_inner();
        outputs.push(
            reply
                .embeddings
                .into_iter()
                .map(|e| e.values)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);

    // Every node holds a verified copy of its own, node 1's pulled again.
    for id in 1..=3 {
        let stored = dir.path().join(format!("node{id}/models"));
        let store = troupe_models::artifact::ArtifactStore::new(stored);
        store.verify(&digest).unwrap();
    }
    for id in 2..=3 {
        let copy = dir.path().join(format!("node{id}/models/{digest}"));
        assert!(copy.join("model.safetensors").is_file(), "node {id}");
    }
    // Every node's readiness is in the metadata.
    let third = nodes[2].api_addr.to_string();
    wait_for("three ready reports", Duration::from_secs(30), || {
        let third = third.clone();
        async move {
            let listed = troupe(args(&["models", "list", "--addr", &third, "--json"])).await;
            let listed: serde_json::Value = serde_json::from_str(&text(&listed).0).ok()?;
            let ready = listed[0]["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["state"] == "ready")
                .count();
            (ready == 3).then_some(())
        }
    })
    .await;
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_keep_to_the_bandwidth_cap() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    // 4 MB of extra weight, so the transfer lasts long enough to measure.
    let extra: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(model.join("extra.bin"), extra).unwrap();
    let nodes = start_cluster_with(&dir, 2, |_, config| {
        config.cluster.heartbeat_interval_ms = 50;
    })
    .await;
    let first = nodes[0].api_addr.to_string();
    let model_arg = model.to_string_lossy().into_owned();
    let pushed = troupe(args(&[
        "models", "push", &model_arg, "--name", "big", "--addr", &first, "--quiet",
    ]))
    .await;
    assert!(pushed.status.success(), "{:?}", text(&pushed));
    let manifest = troupe_models::artifact::Manifest::of_dir(&model).unwrap();

    // Node 2's puller, with a 2 MB/s cap, into a store of its own.
    const CAP: f64 = 2e6;
    let puller = troupe_node::pull::PeerPuller {
        node_id: 2,
        metadata: nodes[1].metadata.clone(),
        store: troupe_models::artifact::ArtifactStore::new(dir.path().join("pulled")),
        bandwidth: Some(std::sync::Arc::new(tokio::sync::Mutex::new(
            troupe_node::pull::TokenBucket::new(CAP),
        ))),
        peers: nodes[1].tree.peers.clone(),
        received: Default::default(),
        transport: nodes[1].transport.clone(),
    };
    // Heartbeats between the two nodes go on while the pull runs: sample their RTT.
    // Each answered heartbeat changes the peer table; the sampler wakes on those changes.
    let peers = nodes[1].tree.peers.clone();
    let (stop_sampling, mut stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut changes = peers.subscribe();
        let (mut rtts, mut last_seen) = (Vec::new(), None);
        loop {
            if let Some(peer) = peers.get(1) {
                if peer.last_seen != last_seen {
                    last_seen = peer.last_seen;
                    rtts.extend(peer.rtt);
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = stopped.changed() => break,
            }
        }
        rtts
    });
    let started = std::time::Instant::now();
    let pulled = troupe_actors::ArtifactFetcher::fetch(&puller, manifest.digest(), vec![1])
        .await
        .unwrap();
    let rate = manifest.total_bytes() as f64 / started.elapsed().as_secs_f64();
    stop_sampling.send_replace(true);
    let mut rtts = sampler.await.unwrap();
    rtts.sort();
    assert!(
        rtts.len() >= 10,
        "heartbeats answered during the pull: {}",
        rtts.len()
    );
    let worst = *rtts.last().unwrap();
    eprintln!(
        "heartbeat rtt during the capped pull: {} samples, median {:.2} ms, max {:.2} ms",
        rtts.len(),
        rtts[rtts.len() / 2].as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    assert!(
        worst < Duration::from_millis(100),
        "heartbeat rtt {worst:?} during the pull"
    );
    eprintln!(
        "pulled {} bytes at {:.2} MB/s (cap 2 MB/s)",
        manifest.total_bytes(),
        rate / 1e6
    );
    assert!(
        (rate - CAP).abs() / CAP <= 0.10,
        "rate {rate:.0} B/s, cap {CAP}"
    );
    assert!(pulled.join("extra.bin").is_file());
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}
