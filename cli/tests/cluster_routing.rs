//! Three nodes in one process on 127.0.0.1 acting as one service: every routing strategy
//! spreads or pins requests as configured (counted by the node that served each one), a
//! backup takes traffic only when the primaries are down, and a rollout switches every node
//! at once (a copy damaged on disk is dropped and fetched again on the way) or, when the nodes
//! cannot load the version, fails and leaves the old one serving, with no client error in
//! either case.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use troupe_actors::PeerState;
use troupe_node::config::NodeConfig;
use troupe_node::RunningNode;

/// Heartbeats fast enough that tests see peers up (and down) within a second.
fn fast_gossip(config: &mut NodeConfig) {
    config.cluster.heartbeat_interval_ms = 50;
    config.cluster.heartbeat_timeout_ms = Some(200);
    config.cluster.suspect_after = 2;
    config.cluster.down_after = 6;
}

/// Pushes the tiny model to node 1 as `tiny` version `version` and activates it, waiting
/// for the rollout's outcome; returns the CLI's output.
async fn push_and_activate(
    nodes: &[RunningNode],
    model: &std::path::Path,
    version: &str,
) -> std::process::Output {
    let first = nodes[0].api_addr.to_string();
    push_model(&first, model, "tiny", version).await;
    troupe(args(&[
        "models",
        "activate",
        "tiny",
        version,
        "--addr",
        &first,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await
}

/// Waits until every node sees every other one up and serving `tiny`.
async fn wait_all_serving(nodes: &[RunningNode]) {
    for node in nodes {
        wait_for(
            "every peer up and serving tiny",
            Duration::from_secs(30),
            || async {
                let peers = node.tree.peers.snapshot();
                (peers.len() == nodes.len() - 1
                    && peers
                        .iter()
                        .all(|p| p.state == PeerState::Up && p.serves("tiny", "")))
                .then_some(())
            },
        )
        .await;
    }
}

/// A 3-node cluster serving the tiny model, each node configured by `tweak` too.
async fn serving_cluster(
    dir: &tempfile::TempDir,
    tweak: impl Fn(u64, &mut NodeConfig),
) -> Vec<RunningNode> {
    let model = tiny_model_dir(dir);
    let nodes = start_cluster_with(dir, 3, |id, config| {
        fast_gossip(config);
        tweak(id, config);
    })
    .await;
    let activated = push_and_activate(&nodes, &model, "1").await;
    assert!(activated.status.success(), "{:?}", text(&activated));
    wait_all_serving(&nodes).await;
    nodes
}

/// Sends `count` requests one after another to `node`, the i-th with routing key
/// `key(i)`, and counts them by the node that served them.
async fn served_by(
    node: &RunningNode,
    count: usize,
    key: impl Fn(usize) -> String,
) -> BTreeMap<u64, usize> {
    let mut client = inference_client(node).await;
    let mut counts = BTreeMap::new();
    for i in 0..count {
        let mut request = embed_request("tiny", &["where does this go"], "");
        request.routing_key = key(i);
        let reply = client.embed(request).await.unwrap().into_inner();
        *counts.entry(reply.served_by).or_default() += 1;
    }
    counts
}

async fn shutdown_all(nodes: Vec<RunningNode>) {
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_takes_turns_and_weighted_follows_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = serving_cluster(&dir, |_, config| {
        config.routing.strategy = "round_robin".into();
    })
    .await;
    let counts = served_by(&nodes[0], 300, |_| String::new()).await;
    eprintln!("round_robin, 300 requests to node 1: {counts:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&n| (90..=110).contains(&n)),
        "{counts:?}"
    );
    shutdown_all(nodes).await;

    let dir = tempfile::tempdir().unwrap();
    let nodes = serving_cluster(&dir, |_, config| {
        config.routing.strategy = "weighted".into();
        config.routing.weights = [
            ("1".to_owned(), 1),
            ("2".to_owned(), 3),
            ("3".to_owned(), 0),
        ]
        .into();
    })
    .await;
    let counts = served_by(&nodes[0], 400, |_| String::new()).await;
    eprintln!("weighted 1:3:0, 400 requests to node 1: {counts:?}");
    assert_eq!(
        counts.get(&3),
        None,
        "weight 0 takes no traffic: {counts:?}"
    );
    assert!((95..=105).contains(&counts[&1]), "{counts:?}");
    assert!((295..=305).contains(&counts[&2]), "{counts:?}");
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_pins_each_key_and_moves_only_a_lost_nodes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = serving_cluster(&dir, |_, config| {
        config.routing.strategy = "consistent_hash".into();
    })
    .await;
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    // Each key to one node, whichever node the request arrives at.
    let mut owner = BTreeMap::new();
    for entry in [0, 1, 2] {
        for key in &keys {
            let counts = served_by(&nodes[entry], 2, |_| key.clone()).await;
            assert_eq!(counts.len(), 1, "{key} went to {counts:?}");
            let node = *counts.keys().next().unwrap();
            assert_eq!(*owner.entry(key.clone()).or_insert(node), node, "{key}");
        }
    }
    let owners: BTreeMap<u64, usize> = owner.values().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(*n).or_default() += 1;
        m
    });
    eprintln!("consistent_hash, 60 keys: owners {owners:?}");
    assert_eq!(owners.len(), 3, "{owners:?}");

    // Node 3 goes away: its keys move to the next node on the ring, the others stay put.
    let third = nodes.pop().unwrap();
    third.shutdown().await.unwrap();
    for node in &nodes {
        wait_for("node 3 marked down", Duration::from_secs(10), || async {
            (node.tree.peers.state(3) == PeerState::Down).then_some(())
        })
        .await;
    }
    for key in &keys {
        let counts = served_by(&nodes[0], 2, |_| key.clone()).await;
        assert_eq!(counts.len(), 1, "{key} went to {counts:?}");
        let now = *counts.keys().next().unwrap();
        if owner[key] == 3 {
            assert_ne!(now, 3);
        } else {
            assert_eq!(now, owner[key], "{key} moved although its node is up");
        }
    }
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_stays_local_when_idle_and_spreads_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = serving_cluster(&dir, |_, _| {}).await;
    let idle = served_by(&nodes[0], 50, |_| String::new()).await;
    assert_eq!(idle, [(1, 50)].into(), "one request at a time stays local");

    // 24 concurrent clients on node 1: its own queue grows, so peers take some.
    let counts = Arc::new(std::sync::Mutex::new(BTreeMap::<u64, usize>::new()));
    let mut clients = Vec::new();
    for _ in 0..24 {
        let mut client = inference_client(&nodes[0]).await;
        let counts = counts.clone();
        clients.push(tokio::spawn(async move {
            for _ in 0..40 {
                let texts: Vec<&str> = vec!["a longer text keeps the node busy for a while"; 16];
                let reply = client
                    .embed(embed_request("tiny", &texts, ""))
                    .await
                    .unwrap()
                    .into_inner();
                *counts.lock().unwrap().entry(reply.served_by).or_default() += 1;
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    eprintln!("least_outstanding, 24 clients x 40 requests to node 1: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 960);
    assert!(
        counts.get(&2).is_some_and(|&n| n > 0) && counts.get(&3).is_some_and(|&n| n > 0),
        "{counts:?}"
    );
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_traffic_only_when_the_primaries_are_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = serving_cluster(&dir, |id, config| {
        config.routing.strategy = "round_robin".into();
        config.cluster.backup = id == 3;
    })
    .await;
    let backup = nodes.pop().unwrap();
    wait_for(
        "node 3 known as a backup",
        Duration::from_secs(10),
        || async {
            nodes[0]
                .tree
                .peers
                .get(3)
                .is_some_and(|p| p.backup)
                .then_some(())
        },
    )
    .await;
    // Sent to the backup itself: the primaries serve everything.
    let counts = served_by(&backup, 60, |_| String::new()).await;
    eprintln!("primaries up, 60 requests to the backup: {counts:?}");
    assert_eq!(counts.get(&3), None, "{counts:?}");
    assert!(counts.get(&1).is_some_and(|&n| n >= 25) && counts.get(&2).is_some_and(|&n| n >= 25));
    let counts = served_by(&nodes[0], 60, |_| String::new()).await;
    assert_eq!(counts.get(&3), None, "{counts:?}");

    for node in nodes {
        node.shutdown().await.unwrap();
    }
    // Before the primaries are marked down the router retries past them; after, it goes
    // straight to the backup. Either way no request fails.
    let counts = served_by(&backup, 20, |_| String::new()).await;
    assert_eq!(counts, [(3, 20)].into());
    wait_for(
        "both primaries marked down",
        Duration::from_secs(10),
        || async {
            (backup.tree.peers.state(1) == PeerState::Down
                && backup.tree.peers.state(2) == PeerState::Down)
                .then_some(())
        },
    )
    .await;
    let counts = served_by(&backup, 20, |_| String::new()).await;
    assert_eq!(counts, [(3, 20)].into());
    backup.shutdown().await.unwrap();
}

/// Clients that send unversioned requests to every node until stopped, recording errors and
/// the versions that answered.
struct Load {
    stop: Arc<AtomicBool>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    requests: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(nodes: &[RunningNode], per_node: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for node in nodes {
            for _ in 0..per_node {
                let mut client = inference_client(node).await;
                let (stop, errors, requests) = (stop.clone(), errors.clone(), requests.clone());
                tasks.push(tokio::spawn(async move {
                    // Versions this client saw, in order of first sight.
                    let mut seen: Vec<String> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match client
                            .embed(embed_request("tiny", &["keep serving"], ""))
                            .await
                        {
                            Ok(reply) => {
                                let version = reply.into_inner().model_version;
                                if seen.last() != Some(&version) {
                                    seen.push(version);
                                }
                            }
                            Err(status) => errors.lock().unwrap().push(status.to_string()),
                        }
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                    // A client never goes back to an older version.
                    let mut sorted = seen.clone();
                    sorted.sort();
                    assert_eq!(seen, sorted, "versions went back: {seen:?}");
                }));
            }
        }
        Self {
            stop,
            errors,
            requests,
            tasks,
        }
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (self.requests.load(Ordering::Relaxed), errors)
    }
}

/// What every node answers an unversioned request with.
async fn versions_served(nodes: &[RunningNode]) -> Vec<String> {
    let mut versions = Vec::new();
    for node in nodes {
        let reply = inference_client(node)
            .await
            .embed(embed_request("tiny", &["which version"], ""))
            .await
            .unwrap()
            .into_inner();
        versions.push(reply.model_version);
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_switches_every_node_and_a_failed_load_rolls_back_with_no_client_error() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = serving_cluster(&dir, |_, _| {}).await;
    let load = Load::start(&nodes, 2).await;

    // Version 2 goes to node 2 as well as node 1, and node 1's stored copy is then damaged
    // on disk: node 1 drops it and pulls a good one, node 3 pulls from a peer. It becomes
    // active once loaded everywhere, and only then serves.
    let second = dir.path().join("tiny2");
    troupe_models::write_tiny_model_dir(&second, 8).unwrap();
    push_model(&nodes[1].api_addr.to_string(), &second, "tiny", "2").await;
    let first = nodes[0].api_addr.to_string();
    push_model(&first, &second, "tiny", "2").await;
    let digest = damage_stored_copy(&dir, 1, &second);
    let activated = troupe(args(&[
        "models",
        "activate",
        "tiny",
        "2",
        "--addr",
        &first,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await;
    assert!(activated.status.success(), "{:?}", text(&activated));
    troupe_models::artifact::ArtifactStore::new(dir.path().join("node1/models"))
        .verify(&digest)
        .expect("node 1 fetched a good copy again");
    wait_for(
        "every node serving version 2",
        Duration::from_secs(10),
        || async { (versions_served(&nodes).await == ["2", "2", "2"]).then_some(()) },
    )
    .await;
    let listed = troupe(args(&["models", "list", "--addr", &first, "--json"])).await;
    let listed: serde_json::Value = serde_json::from_str(&text(&listed).0).unwrap();
    let v2 = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == "2")
        .unwrap();
    assert_eq!(v2["state"], "active");
    // It became active only after every node had reported it ready.
    let active_at = v2["mod_revision"].as_u64().unwrap();
    let nodes_ready: Vec<u64> = v2["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "ready")
        .map(|n| n["node_id"].as_u64().unwrap())
        .collect();
    assert_eq!(nodes_ready, [1, 2, 3], "{v2}");
    assert!(
        v2["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["revision"].as_u64() < Some(active_at)),
        "{v2}"
    );

    // Version 3's files are intact (the digest matches) but not a model: every node fails
    // to load it, the rollout fails with the reason, and version 2 keeps serving.
    let broken = dir.path().join("tiny3");
    troupe_models::write_tiny_model_dir(&broken, 9).unwrap();
    std::fs::write(broken.join("config.json"), b"{\"hidden_size\": \"large\"}").unwrap();
    let failed = push_and_activate(&nodes, &broken, "3").await;
    let (_, stderr) = text(&failed);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rollout of tiny@3 failed") && stderr.contains("failed to load it"),
        "{stderr}"
    );
    let listed = troupe(args(&["models", "list", "--addr", &first, "--json"])).await;
    let listed: serde_json::Value = serde_json::from_str(&text(&listed).0).unwrap();
    let state_of = |version: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["version"] == version)
            .map(|m| (m["state"].clone(), m["reason"].clone()))
            .unwrap()
    };
    assert_eq!(state_of("2").0, "active");
    assert_eq!(state_of("3").0, "failed");
    assert!(
        state_of("3").1.as_str().unwrap().contains("node"),
        "{listed}"
    );
    assert_eq!(versions_served(&nodes).await, ["2", "2", "2"]);

    let (requests, errors) = load.stop().await;
    eprintln!(
        "{requests} requests during two rollouts, {} errors",
        errors.len()
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(requests > 50, "the load ran: {requests}");
    shutdown_all(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_outlives_its_timeout_fails_and_the_old_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    // Node 3 pulls at 20 kB/s, and rollouts get 4 s.
    let nodes = start_cluster_with(&dir, 3, |id, config| {
        fast_gossip(config);
        config.serving.rollout_timeout_s = 4;
        if id == 3 {
            config.serving.blob_bandwidth_mbps = 0.02;
        }
    })
    .await;
    // Version 1 is on every node's disk already: no pull, a quick rollout.
    for node in &nodes {
        push_model(&node.api_addr.to_string(), &model, "tiny", "1").await;
    }
    let first = nodes[0].api_addr.to_string();
    let activated = troupe(args(&[
        "models",
        "activate",
        "tiny",
        "1",
        "--addr",
        &first,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await;
    assert!(activated.status.success(), "{:?}", text(&activated));
    wait_all_serving(&nodes).await;

    // Version 2 is only on node 1: node 3's capped pull of 200 kB takes over 10 s. A request
    // that names it can still be served, by a node that has it.
    let second = dir.path().join("tiny2");
    troupe_models::write_tiny_model_dir(&second, 8).unwrap();
    std::fs::write(second.join("extra.bin"), vec![7u8; 200_000]).unwrap();
    let load = Load::start(&nodes, 1).await;
    let started = std::time::Instant::now();
    // While node 3 is still pulling, nodes 1 and 2 have version 2 loaded.
    let during = async {
        wait_for(
            "node 3 to see version 2 on its peers",
            Duration::from_secs(4),
            || async {
                let peers = nodes[2].tree.peers.snapshot();
                peers.iter().all(|p| p.serves("tiny", "2")).then_some(())
            },
        )
        .await;
        // Sent to node 3, a request naming version 2 is forwarded to a node that has it.
        let mut request = embed_request("tiny", &["forward me"], "");
        request.version = "2".into();
        let reply = inference_client(&nodes[2])
            .await
            .embed(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(
            [1, 2].contains(&reply.served_by),
            "served by {}",
            reply.served_by
        );
        assert_eq!(reply.model_version, "2");
        // Forwarded to node 3, it is served there or refused: never forwarded again.
        let mut peer = troupe_proto::v1::peer_client::PeerClient::connect(format!(
            "http://{}",
            nodes[2].peer_addr
        ))
        .await
        .unwrap();
        let refused = peer.forward(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
        assert!(refused.message().contains("loading"), "{refused}");
    };
    let (failed, ()) = tokio::join!(push_and_activate(&nodes, &second, "2"), during);
    let (_, stderr) = text(&failed);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("timed out after 4 s") && stderr.contains("node 3 loading"),
        "{stderr}"
    );
    eprintln!(
        "rollout failed {:.1} s after activate: {stderr}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(versions_served(&nodes).await, ["1", "1", "1"]);
    let (requests, errors) = load.stop().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(requests > 10, "the load ran: {requests}");
    shutdown_all(nodes).await;
}
