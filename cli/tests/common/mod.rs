//! Helpers the node integration tests share: start a node the way `troupe node` does, run
//! the real `troupe` binary, read its output.

#![allow(dead_code)]

use std::process::{Command, Output};

use troupe_node::config::NodeConfig;
use troupe_node::RunningNode;

/// A node on 127.0.0.1 with OS-chosen ports and its data dir under `dir`.
pub async fn start_node(id: u64, dir: &tempfile::TempDir) -> RunningNode {
    start_node_with(id, dir, |_| {}).await
}

/// The config [`start_node`] uses for node `id`.
pub fn node_config(id: u64, dir: &tempfile::TempDir) -> NodeConfig {
    NodeConfig {
        id,
        api: "127.0.0.1:0".into(),
        peer: "127.0.0.1:0".into(),
        metrics: "127.0.0.1:0".into(),
        data_dir: dir.path().join(format!("node{id}")),
        insecure: true,
        ..NodeConfig::default()
    }
}

/// [`start_node`], with the config changed by `tweak` first.
pub async fn start_node_with(
    id: u64,
    dir: &tempfile::TempDir,
    tweak: impl FnOnce(&mut NodeConfig),
) -> RunningNode {
    let mut config = node_config(id, dir);
    tweak(&mut config);
    troupe_node::start(config).await.unwrap()
}

/// Runs the `troupe` binary built for these tests.
pub async fn troupe(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_troupe"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// stdout and stderr as text.
pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// `--members` for `cluster init`: `1=PEER@API,...` in the order given.
pub fn members_arg(nodes: &[RunningNode]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{}={}@{}", i + 1, n.peer_addr, n.api_addr))
        .collect::<Vec<_>>()
        .join(",")
}

/// `count` nodes (ids 1..=count) formed into one cluster through `troupe cluster init`, each
/// knowing the leader before this returns.
pub async fn start_cluster(dir: &tempfile::TempDir, count: u64) -> Vec<RunningNode> {
    start_cluster_with(dir, count, |_, _| {}).await
}

/// [`start_cluster`], with each node's config changed by `tweak(id, config)` first.
pub async fn start_cluster_with(
    dir: &tempfile::TempDir,
    count: u64,
    tweak: impl Fn(u64, &mut NodeConfig),
) -> Vec<RunningNode> {
    let mut nodes = Vec::new();
    for id in 1..=count {
        nodes.push(start_node_with(id, dir, |config| tweak(id, config)).await);
    }
    let first = nodes[0].api_addr.to_string();
    let members = members_arg(&nodes);
    let init = cluster_init(&first, &members).await;
    assert!(init.status.success(), "{:?}", text(&init));
    for node in &nodes {
        node.metadata
            .wait_for_leader(std::time::Duration::from_secs(10))
            .await
            .unwrap();
    }
    nodes
}

/// A lost compare-and-set: exit 3, and the message names the key's current revision.
pub fn assert_lost_cas(output: &Output, current_revision: u64) {
    let (_, stderr) = text(output);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.starts_with("error: ABORTED: ")
            && stderr.contains(&format!("revision {current_revision}")),
        "{stderr}"
    );
}

/// Polls `condition` until it yields `Some`, failing with `what` after `timeout`: the shared
/// helper ([`troupe_wait::expect`]). Waits on a condition, never a fixed sleep.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: std::time::Duration, condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    troupe_wait::expect(what, timeout, condition).await
}

/// A one-node cluster on 127.0.0.1 serving `model_dir` as `name` version `1`: registered
/// from the directory, activated, loaded and SERVING on grpc.health.v1.
pub async fn serving_node(
    dir: &tempfile::TempDir,
    model_dir: &std::path::Path,
    name: &str,
    tweak: impl FnOnce(&mut NodeConfig),
) -> RunningNode {
    let mut config = NodeConfig {
        id: 1,
        api: "127.0.0.1:0".into(),
        peer: "127.0.0.1:0".into(),
        metrics: "127.0.0.1:0".into(),
        data_dir: dir.path().join("node1"),
        insecure: true,
        ..NodeConfig::default()
    };
    tweak(&mut config);
    let node = troupe_node::start(config).await.unwrap();
    node.metadata.initialize(Default::default()).await.unwrap();
    node.metadata
        .wait_for_leader(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    register_and_activate(&node, model_dir, name, "1").await;
    wait_serving(&node).await;
    node
}

/// `troupe models register NAME --version V --dir DIR` then `models activate`, through the
/// real CLI.
pub async fn register_and_activate(
    node: &RunningNode,
    model_dir: &std::path::Path,
    name: &str,
    version: &str,
) {
    let addr = node.api_addr.to_string();
    let dir = model_dir.to_string_lossy().into_owned();
    let registered = troupe(args(&[
        "models",
        "register",
        name,
        "--version",
        version,
        "--dir",
        &dir,
        "--addr",
        &addr,
    ]))
    .await;
    assert!(registered.status.success(), "{:?}", text(&registered));
    let activated = troupe(args(&[
        "models",
        "activate",
        name,
        version,
        "--addr",
        &addr,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await;
    assert!(activated.status.success(), "{:?}", text(&activated));
}

pub async fn health_status(node: &RunningNode, service: &str) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.api_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
pub const NOT_SERVING: i32 =
    tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Waits until grpc.health.v1 says the node (and inference) is SERVING.
pub async fn wait_serving(node: &RunningNode) {
    wait_for(
        "the node to report SERVING",
        std::time::Duration::from_secs(60),
        || async {
            (health_status(node, "").await == SERVING
                && health_status(node, "troupe.v1.Inference").await == SERVING)
                .then_some(())
        },
    )
    .await;
}

pub type InferenceClient =
    troupe_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>;

pub async fn inference_client(node: &RunningNode) -> InferenceClient {
    InferenceClient::connect(format!("http://{}", node.api_addr))
        .await
        .unwrap()
}

pub fn embed_request(model: &str, texts: &[&str], task: &str) -> troupe_proto::v1::EmbedRequest {
    troupe_proto::v1::EmbedRequest {
        model: model.to_owned(),
        version: String::new(),
        texts: texts.iter().map(|t| (*t).to_owned()).collect(),
        task: task.to_owned(),
        request_id: String::new(),
        routing_key: String::new(),
    }
}

/// The tiny seeded model in `dir/tiny`.
pub fn tiny_model_dir(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("tiny");
    troupe_models::write_tiny_model_dir(&path, 7).unwrap();
    path
}

/// The real all-MiniLM-L6-v2 when the test run has it (scripts/test.sh always does); without
/// it the caller skips, unless TROUPE_REQUIRE_MODEL says the run must have it.
pub fn real_model() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("TROUPE_MODEL_DIR").map(std::path::PathBuf::from);
    match dir {
        Some(dir) if dir.join("model.safetensors").is_file() => Some(dir),
        _ => {
            assert!(
                std::env::var_os("TROUPE_REQUIRE_MODEL").is_none(),
                "TROUPE_REQUIRE_MODEL is set but TROUPE_MODEL_DIR holds no model"
            );
            eprintln!("SKIPPED: set TROUPE_MODEL_DIR to the all-MiniLM-L6-v2 directory (scripts/test.sh does)");
            None
        }
    }
}

/// The fetched SmolLM2-135M directory (`TROUPE_SMOLLM2_DIR`, else the cache), or None (the
/// caller skips) unless TROUPE_REQUIRE_MODEL says the run must have it.
pub fn smollm2() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("TROUPE_SMOLLM2_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            troupe_models::fetch::model_dir(&troupe_models::fetch::troupe_home(), "smollm2-135m")
        });
    if dir.join(troupe_models::fetch::SMOLLM2_GGUF).is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("TROUPE_REQUIRE_MODEL").is_none(),
        "TROUPE_REQUIRE_MODEL is set but {} holds no SmolLM2 GGUF: run `troupe models fetch smollm2-135m`",
        dir.display()
    );
    eprintln!("SKIPPED: run `troupe models fetch smollm2-135m` or set TROUPE_SMOLLM2_DIR");
    None
}

/// `troupe models push DIR --name NAME --version V --addr ADDR --quiet`, which must succeed.
pub async fn push_model(addr: &str, model: &std::path::Path, name: &str, version: &str) {
    let model = model.to_string_lossy().into_owned();
    let pushed = troupe(args(&[
        "models",
        "push",
        &model,
        "--name",
        name,
        "--version",
        version,
        "--addr",
        addr,
        "--quiet",
    ]))
    .await;
    assert!(pushed.status.success(), "{:?}", text(&pushed));
}

/// Flips a byte in the middle of `model.safetensors` of the version `model` (a directory with
/// the same files) in the artifact store of node `id` under `dir`: a copy damaged on disk.
pub fn damage_stored_copy(dir: &tempfile::TempDir, id: u64, model: &std::path::Path) -> String {
    let digest = troupe_models::artifact::Manifest::of_dir(model)
        .unwrap()
        .digest();
    let damaged = dir
        .path()
        .join(format!("node{id}/models/{digest}/model.safetensors"));
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&damaged, bytes).unwrap();
    digest
}

/// Pushes `model` to the first node as `name` version `version` and activates it, waiting
/// for the rollout; then waits until every node is SERVING and the first sees every other
/// one serving it.
pub async fn serve_everywhere(
    nodes: &[RunningNode],
    model: &std::path::Path,
    name: &str,
    version: &str,
) {
    push_and_activate(&nodes[0].api_addr.to_string(), model, name, version).await;
    for node in nodes {
        wait_serving(node).await;
    }
    for peer in nodes.iter().skip(1) {
        let id = peer.metadata.node_id();
        wait_for(
            "node 1 to see its peers serving",
            std::time::Duration::from_secs(10),
            || async {
                nodes[0]
                    .tree
                    .peers
                    .get(id)
                    .is_some_and(|p| p.serves(name, ""))
                    .then_some(())
            },
        )
        .await;
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
/// A port on 127.0.0.1 that was free a moment ago and that this test process has not handed
/// out before: tests in one binary run in parallel, and the kernel may give a port just
/// released by one test's probe to the next test's, so two nodes would race for one port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A `troupe node` process on 127.0.0.1 (free ports, data under `dir/node<id>`), killed when
/// dropped.
pub struct NodeProcess {
    pub id: u64,
    pub child: std::process::Child,
    pub api: String,
    pub peer: String,
}

impl NodeProcess {
    /// Starts node `id`; `configure` adds environment or flags to its command first.
    pub fn spawn(id: u64, dir: &std::path::Path, configure: impl FnOnce(&mut Command)) -> Self {
        let (api, peer, metrics) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_troupe"));
        command
            .args(["node", "--id", &id.to_string(), "--api", &api])
            .args(["--peer", &peer, "--metrics", &metrics, "--data-dir"])
            .arg(dir.join(format!("node{id}")))
            .arg("--insecure")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        configure(&mut command);
        let child = command.spawn().unwrap();
        Self {
            id,
            child,
            api,
            peer,
        }
    }

    /// `ID=PEER@API` for `cluster init --members`.
    pub fn member(&self) -> String {
        format!("{}={}@{}", self.id, self.peer, self.api)
    }

    /// SIGTERM (the node drains and stops), then its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child, which has not been waited for.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forms `processes` into one cluster through `troupe cluster init` (retried until the nodes
/// listen) and waits until the first knows a leader.
pub async fn init_process_cluster(processes: &[NodeProcess]) {
    let first = processes[0].api.clone();
    let members = processes
        .iter()
        .map(NodeProcess::member)
        .collect::<Vec<_>>()
        .join(",");
    let timeout = std::time::Duration::from_secs(30);
    wait_for("the nodes to listen", timeout, || {
        let (first, members) = (first.clone(), members.clone());
        async move {
            let init = cluster_init(&first, &members).await;
            init.status.success().then_some(())
        }
    })
    .await;
    wait_for("a leader", timeout, || {
        let first = first.clone();
        async move {
            let output = troupe(args(&["cluster", "status", "--addr", &first, "--json"])).await;
            let status: serde_json::Value = serde_json::from_str(&text(&output).0).ok()?;
            status["leader"].as_u64()
        }
    })
    .await;
}

/// Waits until the node at `api` has heard, through its heartbeats, that `peer` serves
/// unversioned requests for `model`: only then does its router forward them there.
pub async fn wait_peer_serves(api: &str, peer: u64, model: &str) {
    let endpoint = format!("http://{api}");
    wait_for(
        &format!("node at {api} to see node {peer} serving {model}"),
        std::time::Duration::from_secs(20),
        || {
            let endpoint = endpoint.clone();
            async move {
                let mut admin = troupe_proto::v1::admin_client::AdminClient::connect(endpoint)
                    .await
                    .ok()?;
                let status = admin
                    .node_status(troupe_proto::v1::NodeStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                status
                    .peers
                    .iter()
                    .any(|p| {
                        p.node_id == peer
                            && p.default_versions
                                .iter()
                                .any(|v| v.rsplit_once('@').map(|(name, _)| name) == Some(model))
                    })
                    .then_some(())
            }
        },
    )
    .await;
}

/// `troupe cluster init --addr FIRST --members MEMBERS`.
pub async fn cluster_init(first: &str, members: &str) -> Output {
    troupe(args(&[
        "cluster",
        "init",
        "--addr",
        first,
        "--members",
        members,
    ]))
    .await
}

/// Pushes `model` as `name` `version` through `api`, activates it and waits (`--wait`) until
/// it serves.
pub async fn push_and_activate(api: &str, model: &std::path::Path, name: &str, version: &str) {
    push_model(api, model, name, version).await;
    let activated = troupe(args(&[
        "models",
        "activate",
        name,
        version,
        "--addr",
        api,
        "--wait",
        "--wait-timeout",
        "120",
    ]))
    .await;
    assert!(activated.status.success(), "{:?}", text(&activated));
}

/// `GET path` on a node's metrics port: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Sends a bearer token with each call.
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel whose calls carry a bearer token.
pub type Authed =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

pub fn authed(channel: tonic::transport::Channel, token: &str) -> Authed {
    tonic::service::interceptor::InterceptedService::new(
        channel,
        Bearer(format!("Bearer {token}").parse().unwrap()),
    )
}

/// A token for `role`, signed with the key `troupe certs init` wrote into `certs`.
pub fn mint(certs: &std::path::Path, role: troupe_transport::Role) -> String {
    troupe_transport::token::SigningKey::load(
        &certs.join(troupe_transport::token::SIGNING_KEY_FILE),
    )
    .unwrap()
    .issue(
        &troupe_transport::TokenPolicy::default(),
        "test",
        role,
        std::time::Duration::from_secs(3600),
    )
    .unwrap()
}

/// Writes in a loop on each of several tasks until stopped, counting successes and failures:
/// the load that rotations must not disturb.
pub struct WriteLoad {
    stop: tokio::sync::watch::Sender<bool>,
    pub done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl WriteLoad {
    /// One task per `writer`; each calls its writer with an increasing sequence number.
    pub fn start<W, Fut>(writers: Vec<W>) -> Self
    where
        W: FnMut(u64) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks = writers
            .into_iter()
            .enumerate()
            .map(|(i, mut write)| {
                let (stopped, done, failed) = (stopped.clone(), done.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !*stopped.borrow() {
                        n += 1;
                        match write(n).await {
                            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                            Err(status) => {
                                eprintln!("writer {} failed: {status:?}", i + 1);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            done,
            failed,
            tasks,
        }
    }

    /// Waits until `more` writes beyond the current count have succeeded.
    pub async fn progress(&self, more: u64) {
        use std::sync::atomic::Ordering;
        let target = self.done.load(Ordering::Relaxed) + more;
        wait_for(
            "the load to make progress",
            std::time::Duration::from_secs(20),
            || async { (self.done.load(Ordering::Relaxed) >= target).then_some(()) },
        )
        .await
    }

    /// Stops the writers; `(done, failed)`.
    pub async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.send_replace(true);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Node `id` with mTLS from the certificates in `certs` (checked for changes every 50 ms).
pub async fn tls_node(dir: &tempfile::TempDir, certs: &std::path::Path, id: u64) -> RunningNode {
    let certs = certs.to_owned();
    start_node_with(id, dir, |config| {
        config.insecure = false;
        config.tls.dir = Some(certs.clone());
        config.tls.reload_interval_ms = 50;
    })
    .await
}

/// `count` [`tls_node`]s formed into one cluster, each knowing the leader.
pub async fn tls_cluster(
    dir: &tempfile::TempDir,
    certs: &std::path::Path,
    count: u64,
) -> Vec<RunningNode> {
    let mut nodes = Vec::new();
    for id in 1..=count {
        nodes.push(tls_node(dir, certs, id).await);
    }
    let members = nodes
        .iter()
        .zip(1..)
        .map(|(n, id)| {
            (
                id,
                troupe_consensus::types::NodeAddr {
                    api_addr: n.api_addr.to_string(),
                    peer_addr: n.peer_addr.to_string(),
                },
            )
        })
        .collect();
    nodes[0].metadata.initialize(members).await.unwrap();
    for node in &nodes {
        node.metadata
            .wait_for_leader(std::time::Duration::from_secs(20))
            .await
            .unwrap();
    }
    nodes
}
