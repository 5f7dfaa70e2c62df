//! `troupe up`: a local N-node cluster on 127.0.0.1, serving a model, with the shell on top.
//!
//! Each node is a real `troupe node` child process (this binary) with its own data dir and
//! log under the data dir. Node i listens on api = base + 10·(i−1), peer = api + 1,
//! metrics = api + 2 and the OpenAI-compatible HTTP API on api + 3. `up` forms the cluster
//! (idempotent), pushes the model unless the cluster already has those bytes, activates it
//! unless it is active, waits until every node serves it, prints the endpoints and opens the
//! shell. Ctrl-D or `quit` (or, with `--no-shell`, SIGINT or SIGTERM) stops every node
//! gracefully. The same data dir again resumes the same cluster.
//!
//! The cluster runs with TLS: the first `up` on a data dir makes a CA and the nodes' and the
//! admin's certificates in `<data dir>/certs` (`troupe certs init`), every node starts with
//! `--tls-dir` on it, and the shell connects with the admin certificate. Each `up` also mints
//! an admin API token into `<data dir>/admin.token`, which the shell sends. `up` prints the
//! `export TROUPE_CA=...` line other terminals need.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use troupe_models::artifact::Manifest;
use troupe_models::fetch::{self, FetchOptions};
use troupe_proto::v1::{ClusterInitRequest, Member, ReadRequest};

use super::models::{self, ActivateArgs, PushArgs, StateArgs};
use super::remote::{admin, embed_texts, node_status, WriteOptions};
use super::shell::{self, Session};
use crate::error::CliError;

/// Longest a node may take to answer after it starts, and the cluster to elect a leader.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest every node may take to serve the model once it is active.
const SERVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a node may drain before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Nodes in the cluster (voters).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
    /// Node i listens on api = BASE + 10·(i−1), peer = api + 1, metrics = api + 2, OpenAI
    /// HTTP = api + 3.
    #[arg(long, default_value_t = 7700)]
    pub base_port: u16,
    /// Where the nodes keep their state and logs (node-I/, node-I.log) and the shell its
    /// history. Default: $TROUPE_HOME/up.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The models to serve (repeat the flag, or separate with commas): known names (fetched
    /// into $TROUPE_HOME when missing) or model directories (registered under the directory's
    /// name). Default: the embedding model and the generative one.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = ["all-MiniLM-L6-v2".to_owned(), "smollm2-135m".to_owned()],
        value_name = "NAME|DIR"
    )]
    pub model: Vec<String>,
    /// Do not open the shell: serve until SIGINT or SIGTERM.
    #[arg(long)]
    pub no_shell: bool,
}

/// What a data dir's cluster was formed with; a later `up` must match it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Layout {
    nodes: u16,
    base_port: u16,
}

struct Endpoints {
    id: u64,
    api: String,
    peer: String,
    metrics: String,
    /// The OpenAI-compatible HTTP API (`--http`).
    http: String,
}

impl Endpoints {
    fn of(id: u64, base_port: u16) -> Self {
        let api = u32::from(base_port) + 10 * (id as u32 - 1);
        Self {
            id,
            api: format!("127.0.0.1:{api}"),
            peer: format!("127.0.0.1:{}", api + 1),
            metrics: format!("127.0.0.1:{}", api + 2),
            http: format!("127.0.0.1:{}", api + 3),
        }
    }
}

/// The node processes; dropping it stops them.
struct Nodes {
    children: Vec<(u64, Child)>,
}

impl Nodes {
    /// Asks every node to stop (SIGTERM: graceful drain), waits, kills stragglers.
    fn stop(&mut self) {
        for (_, child) in &self.children {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for (id, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("node {id} did not stop in {STOP_TIMEOUT:?}: killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(POLL),
                }
            }
        }
        self.children.clear();
    }

    /// The first node that has exited, with how.
    fn exited(&mut self) -> Option<(u64, String)> {
        self.children.iter_mut().find_map(|(id, child)| {
            child
                .try_wait()
                .ok()
                .flatten()
                .map(|status| (*id, status.to_string()))
        })
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn run(args: UpArgs) -> Result<(), CliError> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| fetch::troupe_home().join("up"));
    let last_port = u32::from(args.base_port) + 10 * (u32::from(args.nodes) - 1) + 3;
    if last_port > u32::from(u16::MAX) {
        return Err(CliError::Usage(format!(
            "--base-port {} leaves no room for {} nodes (the last would listen on {last_port}): use a lower base port",
            args.base_port, args.nodes
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    check_layout(&dir, &args)?;
    let certs = ensure_certs(&dir, args.nodes)?;
    let models = args
        .model
        .iter()
        .map(|model| resolve_model(model))
        .collect::<Result<Vec<_>, _>>()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let endpoints: Vec<Endpoints> = (1..=u64::from(args.nodes))
        .map(|id| Endpoints::of(id, args.base_port))
        .collect();
    let mut nodes = Nodes {
        children: Vec::new(),
    };
    for node in &endpoints {
        nodes
            .children
            .push((node.id, spawn_node(&dir, node, &certs)?));
    }
    runtime.block_on(bring_up(&dir, &endpoints, &mut nodes, &models))?;
    let names: Vec<&str> = models.iter().map(|(name, _)| name.as_str()).collect();
    print_endpoints(&dir, &endpoints, &names.join(" and "), &certs);

    let api = endpoints[0].api.clone();
    if args.no_shell {
        println!("serving until SIGINT or SIGTERM");
        let outcome = runtime.block_on(serve_until_signal(&mut nodes));
        println!("stopping the cluster");
        nodes.stop();
        return outcome;
    }
    let mut session = Session::new(api, false);
    let outcome = shell::interactive(&runtime, &mut session, dir.join("shell_history"));
    println!("stopping the cluster");
    nodes.stop();
    outcome
}

fn io_error(path: &Path, error: std::io::Error) -> CliError {
    CliError::Usage(format!("{}: {error}", path.display()))
}

/// Records the layout on first use; afterwards the flags must match it.
fn check_layout(dir: &Path, args: &UpArgs) -> Result<(), CliError> {
    let path = dir.join("up.json");
    let wanted = Layout {
        nodes: args.nodes,
        base_port: args.base_port,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let found: Layout = serde_json::from_slice(&bytes).map_err(|e| {
                CliError::Usage(format!(
                    "{} is damaged ({e}): fix it or use another --data-dir",
                    path.display()
                ))
            })?;
            if found != wanted {
                return Err(CliError::Usage(format!(
                    "{} holds a cluster of {} nodes on base port {}: pass --nodes {} --base-port {}, or use another --data-dir",
                    dir.display(),
                    found.nodes,
                    found.base_port,
                    found.nodes,
                    found.base_port
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = serde_json::to_vec_pretty(&wanted).unwrap_or_default();
            std::fs::write(&path, text).map_err(|e| io_error(&path, e))
        }
        Err(e) => Err(io_error(&path, e)),
    }
}

/// The model's registered name and its directory, fetching a known model when missing.
fn resolve_model(model: &str) -> Result<(String, PathBuf), CliError> {
    let path = Path::new(model);
    if path.is_dir() {
        let name = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| CliError::Usage(format!("{model}: cannot name a model after it")))?;
        return Ok((name, path.to_path_buf()));
    }
    let known = fetch::known_model(model).map_err(|e| {
        CliError::Usage(format!(
            "--model {model:?} is neither a model directory nor a known model ({e})"
        ))
    })?;
    let dir = fetch::model_dir(&fetch::troupe_home(), known.name);
    if !known.is_complete(&dir) {
        println!("fetching {} into {}", known.name, dir.display());
        fetch::fetch(known, &FetchOptions::new(dir.clone()))?;
    }
    Ok((known.name.to_owned(), dir))
}

/// The cluster's certificates in `<dir>/certs`, made on the first `up` (a later `up` with more
/// nodes adds theirs); this process's remote calls use the admin's from here on.
fn ensure_certs(dir: &Path, nodes: u16) -> Result<PathBuf, CliError> {
    use troupe_transport::{certs, token};
    let certs_dir = dir.join("certs");
    let usage = |e: certs::CertsError| CliError::Usage(format!("{e} (in {})", certs_dir.display()));
    if !certs_dir.join("ca.crt").is_file() {
        certs::init(&certs_dir, u64::from(nodes), &[]).map_err(usage)?;
    }
    for id in 1..=u64::from(nodes) {
        if !certs_dir.join(format!("node-{id}.crt")).is_file() {
            certs::add_node(&certs_dir, id, &[]).map_err(usage)?;
        }
    }
    // A data dir from before API tokens has no signing key yet.
    if !certs_dir.join(token::SIGNING_KEY_FILE).is_file() {
        token::init_signing_key(&certs_dir)
            .map_err(|e| CliError::Usage(format!("{e} (in {})", certs_dir.display())))?;
    }
    super::remote::use_tls(admin_tls(&certs_dir));
    let token = mint_admin_token(dir, &certs_dir)?;
    super::remote::use_token(&token)?;
    Ok(certs_dir)
}

/// How long the admin token `up` mints lasts; every `up` mints a new one.
const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

/// A fresh admin token in `<dir>/admin.token` (0600), for the shell and other terminals.
fn mint_admin_token(dir: &Path, certs: &Path) -> Result<String, CliError> {
    let usage =
        |e: &dyn std::fmt::Display| CliError::Usage(format!("{e} (in {})", certs.display()));
    use troupe_transport::token;
    let key =
        token::SigningKey::load(&certs.join(token::SIGNING_KEY_FILE)).map_err(|e| usage(&e))?;
    let minted = key
        .issue(
            &troupe_transport::TokenPolicy::default(),
            "troupe-up",
            troupe_transport::Role::Admin,
            ADMIN_TOKEN_TTL,
        )
        .map_err(|e| usage(&e))?;
    let path = admin_token_path(dir);
    let tmp = dir.join("admin.token.new");
    let _ = std::fs::remove_file(&tmp);
    troupe_transport::certs::write_new(&tmp, &format!("{minted}\n"), true)
        .map_err(|e| usage(&e))?;
    std::fs::rename(&tmp, &path).map_err(|e| usage(&e))?;
    Ok(minted)
}

fn admin_token_path(dir: &Path) -> PathBuf {
    dir.join("admin.token")
}

fn admin_tls(certs: &Path) -> troupe_transport::ClientTls {
    troupe_transport::ClientTls {
        ca: certs.join("ca.crt"),
        identity: Some((
            certs.join("client-admin.crt"),
            certs.join("client-admin.key"),
        )),
    }
}

fn spawn_node(dir: &Path, node: &Endpoints, certs: &Path) -> Result<Child, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Runtime(format!("cannot find the troupe binary: {e}")))?;
    let log_path = dir.join(format!("node-{}.log", node.id));
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io_error(&log_path, e))?;
    let err = log.try_clone().map_err(|e| io_error(&log_path, e))?;
    let mut command = Command::new(exe);
    command
        .arg("node")
        .args(["--id", &node.id.to_string()])
        .args(["--api", &node.api, "--peer", &node.peer])
        .args(["--metrics", &node.metrics])
        .args(["--http", &node.http])
        .arg("--data-dir")
        .arg(dir.join(format!("node-{}", node.id)))
        .arg("--tls-dir")
        .arg(certs)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own process group: Ctrl-C at the shell reaches `up`, not the nodes.
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child when
    // `up` dies, so no node outlives it.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .map_err(|e| CliError::Runtime(format!("cannot start node {}: {e}", node.id)))
}

/// The end of a node's log, for an error about it.
fn log_tail(dir: &Path, id: u64) -> String {
    let path = dir.join(format!("node-{id}.log"));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
    format!("(log {}):\n  {tail}", path.display())
}

/// Fails when a node process has exited.
fn check_alive(dir: &Path, nodes: &mut Nodes) -> Result<(), CliError> {
    match nodes.exited() {
        Some((id, status)) => Err(CliError::Runtime(format!(
            "node {id} exited ({status}) {}",
            log_tail(dir, id)
        ))),
        None => Ok(()),
    }
}

async fn bring_up(
    dir: &Path,
    endpoints: &[Endpoints],
    nodes: &mut Nodes,
    models: &[(String, PathBuf)],
) -> Result<(), CliError> {
    let deadline = Instant::now() + START_TIMEOUT;
    for node in endpoints {
        println!("starting node {} on {}", node.id, node.api);
        while node_status(&node.api).await.is_err() {
            check_alive(dir, nodes)?;
            if Instant::now() >= deadline {
                return Err(CliError::Runtime(format!(
                    "node {} did not answer on {} within {START_TIMEOUT:?} {}",
                    node.id,
                    node.api,
                    log_tail(dir, node.id)
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    let first = &endpoints[0].api;
    let members = endpoints
        .iter()
        .map(|n| Member {
            id: n.id,
            peer_addr: n.peer.clone(),
            api_addr: n.api.clone(),
        })
        .collect();
    let formed = admin(first)
        .await?
        .cluster_init(ClusterInitRequest { members })
        .await?
        .into_inner();
    println!(
        "{}",
        if formed.initialized {
            "formed the cluster"
        } else {
            "resuming the cluster in this data dir"
        }
    );
    loop {
        check_alive(dir, nodes)?;
        if node_status(first).await?.leader.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CliError::Runtime(format!(
                "no Raft leader within {START_TIMEOUT:?} {}",
                log_tail(dir, 1)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    for (model_name, model_dir) in models {
        let version = deploy_model(first, model_name, model_dir).await?;
        println!("waiting until every node serves {model_name}@{version}");
        let generative =
            troupe_models::ModelFormat::of_dir(model_dir) == troupe_models::ModelFormat::Gguf;
        wait_served(dir, endpoints, nodes, model_name, generative).await?;
    }
    Ok(())
}

/// Waits until every node answers a request for `model_name`.
async fn wait_served(
    dir: &Path,
    endpoints: &[Endpoints],
    nodes: &mut Nodes,
    model_name: &str,
    generative: bool,
) -> Result<(), CliError> {
    let deadline = Instant::now() + SERVE_TIMEOUT;
    for node in endpoints {
        loop {
            check_alive(dir, nodes)?;
            let outcome = if generative {
                generate_once(&node.api, model_name).await
            } else {
                embed_once(&node.api, model_name).await
            };
            match outcome {
                Ok(()) => break,
                Err(error) if Instant::now() >= deadline => {
                    return Err(CliError::Runtime(format!(
                        "node {} does not serve {model_name} after {SERVE_TIMEOUT:?}: {error} {}",
                        node.id,
                        log_tail(dir, node.id)
                    )))
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }
    Ok(())
}

/// Pushes the model unless the cluster has a version with these bytes, and activates that
/// version unless it is active. Answers the version.
async fn deploy_model(addr: &str, name: &str, dir: &Path) -> Result<String, CliError> {
    let owned = dir.to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || Manifest::of_dir(&owned))
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))??;
    let digest = manifest.digest();
    let registered = admin(addr)
        .await?
        .list_models(ReadRequest {
            stale: false,
            min_revision: 0,
        })
        .await?
        .into_inner()
        .models;
    let existing = registered
        .iter()
        .find(|m| m.name == name && m.digest == digest);
    let (version, active) = match existing {
        Some(entry) => (entry.version.clone(), entry.state == "active"),
        None => {
            println!("pushing {name} from {}", dir.display());
            super::push::push(PushArgs {
                dir: dir.to_path_buf(),
                name: name.to_owned(),
                version: None,
                format: None,
                precision: None,
                addr: addr.to_owned(),
                quiet: false,
                json: false,
            })
            .await?;
            (digest[..12].to_owned(), false)
        }
    };
    if !active {
        models::activate(ActivateArgs {
            target: StateArgs {
                name: name.to_owned(),
                version: version.clone(),
                write: WriteOptions {
                    expected_revision: None,
                    request_id: None,
                    addr: addr.to_owned(),
                    json: false,
                },
            },
            wait: true,
            wait_timeout: models::DEFAULT_WAIT_TIMEOUT_S,
        })
        .await?;
    }
    Ok(version)
}

async fn generate_once(addr: &str, model: &str) -> Result<(), CliError> {
    let mut client = super::remote::inference(addr, Duration::from_secs(10)).await?;
    let mut request = tonic::Request::new(troupe_proto::v1::GenerateRequest {
        model: model.to_owned(),
        prompt: "troupe up".into(),
        max_tokens: 1,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(10));
    let mut stream = client.generate(request).await?.into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

async fn embed_once(addr: &str, model: &str) -> Result<(), CliError> {
    let texts = vec!["troupe up".into()];
    embed_texts(addr, model, texts, Duration::from_secs(10)).await?;
    Ok(())
}

fn print_endpoints(dir: &Path, endpoints: &[Endpoints], model: &str, certs: &Path) {
    println!(
        "\ncluster up: {} nodes serving {model} over TLS",
        endpoints.len()
    );
    println!(
        "{:>4}  {:<16}  {:<16}  {:<30}  {:<28}  log",
        "node", "api (gRPC)", "peer", "metrics", "openai (HTTP)"
    );
    for node in endpoints {
        println!(
            "{:>4}  {:<16}  {:<16}  {:<30}  {:<28}  {}",
            node.id,
            node.api,
            node.peer,
            format!("http://{}/metrics", node.metrics),
            format!("https://{}/v1", node.http),
            dir.join(format!("node-{}.log", node.id)).display()
        );
    }
    println!("data: {}", dir.display());
    let admin = admin_tls(certs);
    let (cert, key) = admin.identity.unwrap_or_default();
    println!("talk to it from another terminal after:");
    println!(
        "  export TROUPE_CA={} TROUPE_CERT={} TROUPE_KEY={} TROUPE_TOKEN_FILE={}",
        admin.ca.display(),
        cert.display(),
        key.display(),
        admin_token_path(dir).display()
    );
    println!(
        "try: troupe embed --addr {} --model {model} --input docs/sample.txt",
        endpoints[0].api
    );
    println!(
        "or:  curl --cacert {} -H \"Authorization: Bearer $(cat {})\" https://{}/v1/models\n",
        admin.ca.display(),
        admin_token_path(dir).display(),
        endpoints[0].http
    );
}

/// Serves until SIGINT or SIGTERM; fails if a node exits on its own meanwhile.
async fn serve_until_signal(nodes: &mut Nodes) -> Result<(), CliError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Runtime(format!("cannot watch SIGTERM: {e}")))?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = check.tick() => {
                if let Some((id, status)) = nodes.exited() {
                    return Err(CliError::Runtime(format!(
                        "node {id} exited on its own ({status}): stopping the others"
                    )));
                }
            }
        }
    }
}
