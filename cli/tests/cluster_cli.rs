//! Three real nodes started the way `troupe node` starts them (`troupe_node::start`, real gRPC on
//! 127.0.0.1), driven through the real `troupe` CLI: init, membership, priorities with CAS,
//! models, status.

use std::process::Command;
use std::time::Duration;

use common::{args, assert_lost_cas, members_arg, start_node, text, troupe};
use troupe_node::config::NodeConfig;
use troupe_node::RunningNode;

mod common;

/// Forms a one-node cluster through the CLI and waits for it to lead; returns its API address.
async fn init_single(node: &RunningNode) -> String {
    let api = node.api_addr.to_string();
    let member = format!("1={}@{}", node.peer_addr, node.api_addr);
    let init = troupe(args(&[
        "cluster",
        "init",
        "--addr",
        &api,
        "--members",
        &member,
    ]))
    .await;
    assert!(init.status.success(), "{:?}", text(&init));
    node.metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    api
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_node_cluster_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id, &dir).await);
    }
    let api: Vec<String> = nodes.iter().map(|n| n.api_addr.to_string()).collect();
    let members = members_arg(&nodes);

    let init = troupe(args(&[
        "cluster",
        "init",
        "--addr",
        &api[0],
        "--members",
        &members,
        "--json",
    ]))
    .await;
    assert!(init.status.success(), "{:?}", text(&init));
    // Repeating init is harmless: on the same node it reports that nothing changed; on
    // another member it succeeds whether or not that node has heard of the cluster yet
    // (openraft accepts the identical membership on every member).
    let again = troupe(args(&[
        "cluster",
        "init",
        "--addr",
        &api[0],
        "--members",
        &members,
    ]))
    .await;
    assert!(again.status.success(), "{:?}", text(&again));
    assert!(text(&again).0.contains("already initialized"));
    let elsewhere = troupe(args(&[
        "cluster",
        "init",
        "--addr",
        &api[1],
        "--members",
        &members,
    ]))
    .await;
    assert!(elsewhere.status.success(), "{:?}", text(&elsewhere));
    nodes[2]
        .metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();

    // A write sent to any node is forwarded to the leader and prints the revision it took.
    let set = troupe(args(&[
        "priorities",
        "set",
        "search",
        "10",
        "--addr",
        &api[2],
    ]))
    .await;
    assert!(set.status.success(), "{:?}", text(&set));
    let revision: u64 = text(&set).0.trim().parse().unwrap();
    troupe(args(&[
        "priorities",
        "set",
        "batch",
        "-5",
        "--addr",
        &api[1],
    ]))
    .await;

    // A CAS against a revision that is not the task's (here: the later write to "batch")
    // loses: exit 3, and the message names the task's current one.
    let not_current = (revision + 1).to_string();
    let stale = troupe(args(&[
        "priorities",
        "set",
        "search",
        "20",
        "--expected-revision",
        &not_current,
        "--addr",
        &api[0],
    ]))
    .await;
    assert_lost_cas(&stale, revision);
    let fresh = troupe(args(&[
        "priorities",
        "set",
        "search",
        "20",
        "--expected-revision",
        &revision.to_string(),
        "--addr",
        &api[0],
    ]))
    .await;
    assert!(fresh.status.success(), "{:?}", text(&fresh));

    let list = troupe(args(&["priorities", "list", "--addr", &api[1], "--json"])).await;
    let tasks: serde_json::Value = serde_json::from_str(&text(&list).0).unwrap();
    let names: Vec<&str> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["search", "batch"]);
    assert_eq!(tasks[0]["priority"], 20);

    let digest = "ab".repeat(32);
    let register = troupe(args(&[
        "models",
        "register",
        "minilm",
        "--version",
        "1",
        "--digest",
        &digest,
        "--size",
        "1234",
        "--addr",
        &api[1],
    ]))
    .await;
    assert!(register.status.success(), "{:?}", text(&register));
    let other = troupe(args(&[
        "models",
        "register",
        "minilm",
        "--version",
        "1",
        "--digest",
        &"cd".repeat(32),
        "--size",
        "1",
        "--addr",
        &api[1],
    ]))
    .await;
    assert!(
        text(&other).1.contains("ALREADY_EXISTS"),
        "{:?}",
        text(&other)
    );
    let models = troupe(args(&[
        "models", "list", "--addr", &api[0], "--stale", "--json",
    ]))
    .await;
    let models: serde_json::Value = serde_json::from_str(&text(&models).0).unwrap();
    // A stale read may lag; a linearizable one may not.
    let models_now = troupe(args(&["models", "list", "--addr", &api[0], "--json"])).await;
    let models_now: serde_json::Value = serde_json::from_str(&text(&models_now).0).unwrap();
    assert_eq!(models_now[0]["state"], "loading");
    assert!(models.as_array().unwrap().len() <= 1);

    let status = troupe(args(&["cluster", "status", "--addr", &api[0], "--json"])).await;
    let status: serde_json::Value = serde_json::from_str(&text(&status).0).unwrap();
    assert!(status["leader"].is_u64());
    assert_eq!(status["voters"], serde_json::json!([1, 2, 3]));
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3);
    assert!(status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["applied_revision"].is_u64()));

    for node in nodes {
        node.shutdown().await.unwrap();
    }
    let down = troupe(args(&["cluster", "status", "--addr", &api[0]])).await;
    assert_eq!(down.status.code(), Some(1));
    assert!(
        text(&down).1.contains("cannot reach troupe"),
        "{:?}",
        text(&down)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rejoins_with_its_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(1, &dir).await;
    let api = init_single(&node).await;
    let set = troupe(args(&["priorities", "set", "kept", "3", "--addr", &api])).await;
    assert!(set.status.success(), "{:?}", text(&set));
    node.shutdown().await.unwrap();

    // Same data dir, new ports: the single-node cluster comes back with its state. The
    // member address recorded in Raft is the old one; a lone voter elects itself anyway.
    let node = start_node(1, &dir).await;
    node.metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let list = troupe(args(&[
        "priorities",
        "list",
        "--addr",
        &node.api_addr.to_string(),
        "--json",
    ]))
    .await;
    let tasks: serde_json::Value = serde_json::from_str(&text(&list).0).unwrap();
    assert_eq!(tasks[0]["name"], "kept");
    node.shutdown().await.unwrap();
}

#[test]
fn config_check_names_each_bad_field_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "id = 0\napi = \"nowhere\"\ndata_dir = \"/proc/forbidden\"\n",
    )
    .unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_troupe"))
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let output = check();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in ["id:", "api:", "IP:PORT", "data_dir:", "tls:", "--insecure"] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    // Certificates that are not there are named.
    let certs = dir.path().join("certs");
    std::fs::write(
        &path,
        format!(
            "id = 3\ndata_dir = {:?}\n[tls]\ndir = {certs:?}\n",
            dir.path().join("d")
        ),
    )
    .unwrap();
    let output = check();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ca.crt") && stderr.contains("troupe certs init"),
        "{stderr}"
    );
    troupe_transport::certs::init(&certs, 3, &[]).unwrap();
    let output = check();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_stream_replays_in_order_and_refuses_compacted_revisions() {
    use troupe_proto::v1::admin_client::AdminClient;
    use troupe_proto::v1::{SetPriorityRequest, WatchRequest};

    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        id: 1,
        api: "127.0.0.1:0".into(),
        peer: "127.0.0.1:0".into(),
        metrics: "127.0.0.1:0".into(),
        data_dir: dir.path().join("node1"),
        insecure: true,
        raft: troupe_node::config::RaftSettings {
            watch_history: 5,
            ..Default::default()
        },
        ..NodeConfig::default()
    };
    let node = troupe_node::start(config).await.unwrap();
    let api = init_single(&node).await;

    let mut client = AdminClient::connect(format!("http://{api}")).await.unwrap();
    let mut stream = client
        .watch(WatchRequest { from_revision: 1 })
        .await
        .unwrap()
        .into_inner();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        client
            .set_priority(SetPriorityRequest {
                name: (*name).into(),
                priority: i as i32,
                expected_revision: None,
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    let mut last = 0;
    for name in ["a", "b", "c"] {
        let change = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(change.key, format!("tasks/{name}"));
        assert!(change.revision > last);
        last = change.revision;
        let value: serde_json::Value = serde_json::from_str(&change.value_json).unwrap();
        assert_eq!(value["kind"], "task");
    }

    for i in 0..6 {
        client
            .set_priority(SetPriorityRequest {
                name: format!("more{i}"),
                priority: 1,
                expected_revision: None,
                request_id: String::new(),
            })
            .await
            .unwrap();
    }
    let status = client
        .watch(WatchRequest { from_revision: 1 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    let snapshot_revision: u64 = status
        .metadata()
        .get("x-troupe-snapshot-revision")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(snapshot_revision > last, "{status:?}");
    // Resuming after the compaction point works.
    client
        .watch(WatchRequest {
            from_revision: snapshot_revision + 1,
        })
        .await
        .unwrap();
    // Shutdown ends open watch streams instead of waiting for them: the buffered changes
    // arrive, then the stream ends.
    node.shutdown().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("the stream ends after shutdown");
    assert!(
        matches!(ended, None | Some(tonic::Code::Unavailable)),
        "{ended:?}"
    );
}
