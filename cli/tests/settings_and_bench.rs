//! Cluster settings through the CLI, and `troupe bench raft` driving a real 3-node cluster
//! (`troupe_node::start`, real gRPC on 127.0.0.1): the benchmark's puts and CAS really reach the
//! store, and its lost-update check holds.

use common::{args, assert_lost_cas, start_cluster, text};
use troupe_node::RunningNode;

mod common;

async fn troupe(list: &[&str]) -> std::process::Output {
    common::troupe(args(list)).await
}

async fn three_nodes(dir: &tempfile::TempDir) -> (Vec<RunningNode>, Vec<String>) {
    let nodes = start_cluster(dir, 3).await;
    let api = nodes.iter().map(|n| n.api_addr.to_string()).collect();
    (nodes, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settings_are_set_read_and_compared_through_any_node() {
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, api) = three_nodes(&dir).await;

    let set = troupe(&["settings", "set", "max_batch", "32", "--addr", &api[1]]).await;
    assert!(set.status.success(), "{:?}", text(&set));
    let revision: u64 = text(&set).0.trim().parse().unwrap();

    let get = troupe(&["settings", "get", "max_batch", "--addr", &api[2], "--json"]).await;
    assert!(get.status.success(), "{:?}", text(&get));
    let setting: serde_json::Value = serde_json::from_str(&text(&get).0).unwrap();
    assert_eq!(setting["value"], "32");
    assert_eq!(setting["mod_revision"], revision);
    assert_eq!(setting["create_revision"], revision);

    // A CAS on a revision that is not the setting's loses with exit 3 and names the current one.
    let wrong = (revision + 7).to_string();
    let lost = troupe(&[
        "settings",
        "set",
        "max_batch",
        "64",
        "--expected-revision",
        &wrong,
        "--addr",
        &api[0],
    ])
    .await;
    assert_lost_cas(&lost, revision);
    // Over gRPC the lost CAS carries the current revision and value, so a client retries in
    // one round trip (etcd's Txn answers the same way).
    let mut admin =
        troupe_proto::v1::admin_client::AdminClient::connect(format!("http://{}", api[2]))
            .await
            .unwrap();
    let lost = admin
        .set_setting(troupe_proto::v1::SetSettingRequest {
            key: "max_batch".into(),
            value: "64".into(),
            expected_revision: Some(revision + 7),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(lost.code(), tonic::Code::Aborted, "{lost:?}");
    let header = |name: &str| {
        lost.metadata()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header("x-troupe-current-revision"),
        Some(revision.to_string())
    );
    let value = lost
        .metadata()
        .get_bin("x-troupe-current-value-bin")
        .unwrap();
    assert_eq!(value.to_bytes().unwrap().as_ref(), b"32");
    let won = troupe(&[
        "settings",
        "set",
        "max_batch",
        "64",
        "--expected-revision",
        &revision.to_string(),
        "--addr",
        &api[0],
        "--json",
    ])
    .await;
    assert!(won.status.success(), "{:?}", text(&won));
    let won: serde_json::Value = serde_json::from_str(&text(&won).0).unwrap();
    assert_eq!(won["changed"], true);

    let list = troupe(&["settings", "list", "--addr", &api[2], "--json"]).await;
    assert!(list.status.success(), "{:?}", text(&list));
    let settings: serde_json::Value = serde_json::from_str(&text(&list).0).unwrap();
    assert_eq!(settings.as_array().unwrap().len(), 1);
    assert_eq!(settings[0]["key"], "max_batch");
    assert_eq!(settings[0]["value"], "64");

    let missing = troupe(&["settings", "get", "nope", "--addr", &api[0]]).await;
    let (_, stderr) = text(&missing);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: NOT_FOUND: setting 'nope' is not set"),
        "{stderr}"
    );

    let bad_key = troupe(&["settings", "set", "a/b", "1", "--addr", &api[0]]).await;
    let (_, stderr) = text(&bad_key);
    assert!(!bad_key.status.success());
    assert!(stderr.starts_with("error: INVALID_ARGUMENT: "), "{stderr}");

    // A value too long for a trailer (HTTP/2 bounds a header list) still loses as ABORTED,
    // with its revision, and without the value.
    let long = "v".repeat(60_000);
    let set_long = admin
        .set_setting(troupe_proto::v1::SetSettingRequest {
            key: "long".into(),
            value: long.clone(),
            expected_revision: None,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let lost_long = admin
        .set_setting(troupe_proto::v1::SetSettingRequest {
            key: "long".into(),
            value: format!("{long}w"),
            expected_revision: Some(set_long.revision + 7),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(lost_long.code(), tonic::Code::Aborted, "{lost_long:?}");
    assert_eq!(
        lost_long
            .metadata()
            .get("x-troupe-current-revision")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some(set_long.revision.to_string())
    );
    assert!(lost_long
        .metadata()
        .get_bin("x-troupe-current-value-bin")
        .is_none());
}

/// A run-time setting (`limits.…`, `routing.max_attempts`) changes every node's limits as
/// each applies it, and an empty value gives each node its own value back. A key of the
/// node's configuration that is read only at start is refused before it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_time_settings_change_every_node_and_start_time_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, api) = three_nodes(&dir).await;
    let model = common::tiny_model_dir(&dir);
    common::serve_everywhere(&nodes, &model, "tiny", "1").await;
    let two = common::embed_request("tiny", &["one", "two"], "");
    let one = common::embed_request("tiny", &["one"], "");
    for node in &nodes {
        let reply = common::inference_client(node)
            .await
            .embed(two.clone())
            .await
            .unwrap();
        assert_eq!(reply.into_inner().embeddings.len(), 2);
    }

    let set = troupe(&[
        "settings",
        "set",
        "limits.max_texts_per_request",
        "1",
        "--addr",
        &api[1],
    ])
    .await;
    assert!(set.status.success(), "{:?}", text(&set));
    // Every node, not only the one written to, refuses two texts now, naming the limit.
    for node in &nodes {
        common::wait_for(
            "the node to take the new limit",
            std::time::Duration::from_secs(10),
            || async {
                let refused = common::inference_client(node)
                    .await
                    .embed(two.clone())
                    .await
                    .err()?;
                (refused.code() == tonic::Code::InvalidArgument
                    && refused
                        .message()
                        .contains("the limit is 1 (limits.max_texts_per_request)"))
                .then_some(())
            },
        )
        .await;
        common::inference_client(node)
            .await
            .embed(one.clone())
            .await
            .unwrap();
    }

    // Configuration read at start is refused, naming where it is set instead.
    let refused = troupe(&[
        "settings",
        "set",
        "limits.max_connections",
        "9",
        "--addr",
        &api[0],
    ])
    .await;
    let (_, stderr) = text(&refused);
    assert!(!refused.status.success());
    assert!(
        stderr.starts_with("error: INVALID_ARGUMENT: ")
            && stderr.contains("[limits] max_connections")
            && stderr.contains("limits.max_texts_per_request"),
        "{stderr}"
    );
    let zero = troupe(&[
        "settings",
        "set",
        "routing.max_attempts",
        "0",
        "--addr",
        &api[0],
    ])
    .await;
    let (_, stderr) = text(&zero);
    assert!(
        stderr.starts_with("error: INVALID_ARGUMENT: ") && stderr.contains("must be positive"),
        "{stderr}"
    );
    let listed = troupe(&["settings", "list", "--addr", &api[2], "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&text(&listed).0).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Unset: each node goes back to its own limit.
    let unset = troupe(&[
        "settings",
        "set",
        "limits.max_texts_per_request",
        "",
        "--addr",
        &api[2],
    ])
    .await;
    assert!(unset.status.success(), "{:?}", text(&unset));
    for node in &nodes {
        common::wait_for(
            "the node to go back to its own limit",
            std::time::Duration::from_secs(10),
            || async {
                common::inference_client(node)
                    .await
                    .embed(two.clone())
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_raft_puts_and_compare_and_sets_on_a_real_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, api) = three_nodes(&dir).await;
    let addrs = api.join(",");
    let bench = troupe(&[
        "bench",
        "raft",
        "--addr",
        &addrs,
        "--clients",
        "1,4",
        "--seconds",
        "0.5",
        "--warmup",
        "0.1",
        "--cas-clients",
        "4",
        "--cas-keys",
        "2",
        "--phases",
        "put,cas",
        "--json",
    ])
    .await;
    assert!(bench.status.success(), "{:?}", text(&bench));
    let report: serde_json::Value = serde_json::from_str(&text(&bench).0).unwrap();
    let store = &report["stores"][0];
    assert_eq!(store["store"], "troupe");
    let puts = store["put"].as_array().unwrap();
    assert_eq!(puts.len(), 2);
    for (put, clients) in puts.iter().zip([1, 4]) {
        assert_eq!(put["clients"], clients);
        assert!(put["ops"].as_u64().unwrap() > 0, "{put}");
        assert_eq!(put["errors"], 0, "{put}");
        assert!(put["latency"]["p50_ms"].as_f64().unwrap() > 0.0);
    }
    let cas = &store["cas"];
    assert!(cas["cas_ok"].as_u64().unwrap() > 0, "{cas}");
    assert_eq!(cas["lost_update_check_ok"], true, "{cas}");
    assert_eq!(
        cas["sum_of_counters"], cas["successful_cas_total"],
        "every successful CAS is one increment"
    );

    // The puts really landed in the replicated state.
    let state = nodes[2]
        .metadata
        .read(troupe_consensus::ReadConsistency::Linearizable, |s| {
            s.settings
                .keys()
                .filter(|k| k.starts_with("bench.put."))
                .count()
        })
        .await
        .unwrap();
    assert!(state >= 5, "{state} bench keys");

    // Failover needs commands that can kill a member; without them it is reported skipped.
    let skipped = troupe(&[
        "bench", "raft", "--addr", &addrs, "--phases", "failover", "--json",
    ])
    .await;
    assert!(skipped.status.success(), "{:?}", text(&skipped));
    let report: serde_json::Value = serde_json::from_str(&text(&skipped).0).unwrap();
    let why = report["stores"][0]["skipped"][0].as_str().unwrap();
    assert!(why.contains("--kill-cmd"), "{why}");
}

#[tokio::test]
async fn bench_raft_refuses_bad_arguments_with_the_fix() {
    let nothing = troupe(&["bench", "raft"]).await;
    let (_, stderr) = text(&nothing);
    assert_eq!(nothing.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--addr") && stderr.contains("--etcd"),
        "{stderr}"
    );
    let zero = troupe(&["bench", "raft", "--addr", "127.0.0.1:1", "--clients", "0"]).await;
    let (_, stderr) = text(&zero);
    assert_eq!(zero.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--clients"), "{stderr}");
}
