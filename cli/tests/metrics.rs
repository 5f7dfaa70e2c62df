//! The metrics port of real nodes: `/metrics` parses as Prometheus text and its counters move
//! with the requests served; `/healthz` answers; `/readyz` follows the node's health.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// GET `path` on `addr` over HTTP/1.1: the status code and the body.
/// One sample per series key (`name{labels}`), checking the exposition format on the way:
/// every sample belongs to a family announced with HELP and TYPE, and its value is a number.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut families = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| families.get(*base).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(families.contains_key(family), "no TYPE for {line}");
        assert!(
            samples.insert(key.to_owned(), value).is_none(),
            "duplicate {key}"
        );
    }
    samples
}

fn find(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .find(|(key, _)| {
            key.split('{').next() == Some(name) && labels.iter().all(|l| key.contains(l))
        })
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} with {labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_the_requests_served() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&dir);
    // Before the cluster is formed the node is up but not ready.
    let nodes = start_cluster_with(&dir, 2, |_, config| {
        config.cluster.heartbeat_interval_ms = 50;
        config.routing.strategy = "round_robin".into();
    })
    .await;
    serve_everywhere(&nodes, &model, "tiny", "1").await;

    let metrics = nodes[0].metrics_addr;
    assert_eq!(http_get(metrics, "/healthz").await.0, 200);
    assert_eq!(
        http_get(metrics, "/readyz").await,
        (200, "ready\n".to_owned())
    );
    let (status, body) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    let before = parse(&body);

    let mut client = inference_client(&nodes[0]).await;
    for _ in 0..20 {
        client
            .embed(embed_request("tiny", &["counted"], ""))
            .await
            .unwrap();
    }
    let refused = client
        .embed(embed_request("tiny", &["counted"], "no-such-task"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    let after = parse(&http_get(metrics, "/metrics").await.1);
    let ok = ["model=\"tiny\"", "task=\"default\"", "code=\"OK\""];
    let served_before = before
        .iter()
        .find(|(k, _)| k.starts_with("troupe_requests_total") && ok.iter().all(|l| k.contains(l)))
        .map_or(0.0, |(_, v)| *v);
    assert_eq!(
        find(&after, "troupe_requests_total", &ok) - served_before,
        20.0
    );
    assert_eq!(
        find(
            &after,
            "troupe_requests_total",
            // A task with no priority is not a label of its own: it counts as "other".
            &["task=\"other\"", "code=\"NOT_FOUND\""]
        ),
        1.0
    );
    let latency = ["model=\"tiny\"", "task=\"default\""];
    assert!(find(&after, "troupe_request_duration_seconds_count", &latency) >= 20.0);
    assert!(
        find(
            &after,
            "troupe_request_duration_seconds_bucket",
            &["le=\"+Inf\""]
        ) >= 20.0
    );
    // Round robin over two nodes: about half went to node 2.
    let forwarded = find(
        &after,
        "troupe_forwarded_requests_total",
        &["peer=\"2\"", "code=\"OK\""],
    );
    assert!(forwarded >= 5.0, "{forwarded}");
    assert!(find(&after, "troupe_batch_size_count", &["model=\"tiny\""]) >= 5.0);
    assert_eq!(find(&after, "troupe_in_flight_requests", &[]), 0.0);
    assert_eq!(find(&after, "troupe_serving", &[]), 1.0);
    assert!(find(&after, "troupe_raft_term", &[]) >= 1.0);
    assert!(find(&after, "troupe_raft_applied_index", &[]) >= 1.0);
    assert!(find(&after, "troupe_raft_leader_changes_total", &[]) >= 1.0);
    assert!(find(&after, "troupe_raft_sync_lag_seconds", &[]) < 5.0);
    assert_eq!(find(&after, "troupe_peer_up", &["peer=\"2\""]), 1.0);
    assert!(find(&after, "troupe_peer_heartbeat_rtt_seconds", &["peer=\"2\""]) > 0.0);
    find(&after, "troupe_peer_clock_offset_seconds", &["peer=\"2\""]);
    find(
        &after,
        "troupe_actor_restarts_total",
        &["path=\"node/health\""],
    );
    // The leader reports the commit index.
    let leader = nodes
        .iter()
        .find(|n| n.metadata.status().role == troupe_consensus::Role::Leader)
        .unwrap();
    let leader_metrics = parse(&http_get(leader.metrics_addr, "/metrics").await.1);
    assert!(find(&leader_metrics, "troupe_raft_commit_index", &[]) >= 1.0);
    // Node 2 pulled the version from node 1, and node 1 sent it.
    let second = parse(&http_get(nodes[1].metrics_addr, "/metrics").await.1);
    let received = find(
        &second,
        "troupe_blob_bytes_total",
        &["direction=\"received\""],
    );
    let sent = find(&after, "troupe_blob_bytes_total", &["direction=\"sent\""]);
    let size = troupe_models::artifact::Manifest::of_dir(&model)
        .unwrap()
        .total_bytes() as f64;
    assert_eq!((received, sent), (size, size));

    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_with_the_reason_until_the_node_can_serve() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(1, &dir).await;
    // Not initialised: no Raft leader.
    let (status, body) = wait_for("health to be computed", Duration::from_secs(10), || async {
        let (status, body) = http_get(node.metrics_addr, "/readyz").await;
        body.contains("raft has no leader")
            .then_some((status, body))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(http_get(node.metrics_addr, "/healthz").await.0, 200);
    node.metadata.initialize(Default::default()).await.unwrap();
    wait_for("ready", Duration::from_secs(10), || async {
        (http_get(node.metrics_addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(http_get(node.metrics_addr, "/nope").await.0, 404);
    node.shutdown().await.unwrap();
}
