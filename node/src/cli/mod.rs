//! The `troupe` command line. Each command group lives in its own module; every command
//! prints its result on stdout (JSON with `--json` where it has data) and fails with one
//! line on stderr and a non-zero exit.

mod bench;
mod embed;
mod models;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::CliError;

#[derive(Debug, Parser)]
#[command(
    name = "troupe",
    version,
    about = "troupe: a Rust cluster that serves ML inference (sentence embeddings with all-MiniLM-L6-v2 on burn)",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage model weights: fetch them into the local cache.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Embed texts locally (no cluster): one text per line in, one JSON array per line out.
    Embed(embed::EmbedArgs),
    /// Benchmarks: `troupe bench engine` times the inference engine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Where the model comes from: a directory, or a name resolved in the cache.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ModelSource {
    /// Model directory holding config.json, tokenizer.json and model.safetensors.
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
    /// A fetched model by name, e.g. all-MiniLM-L6-v2 (resolved in $TROUPE_HOME).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
}

impl ModelSource {
    pub fn resolve(&self) -> Result<PathBuf, CliError> {
        if let Some(dir) = &self.model_dir {
            return Ok(dir.clone());
        }
        let name = self.model.as_deref().unwrap_or_default();
        let known = troupe_models::fetch::known_model(name)?;
        let dir = troupe_models::fetch::model_dir(&troupe_models::fetch::troupe_home(), known.name);
        if !troupe_models::fetch::is_complete(&dir) {
            return Err(CliError::Usage(format!(
                "model '{}' is not in the cache ({}): run `troupe models fetch {}` first",
                known.name,
                dir.display(),
                known.name
            )));
        }
        Ok(dir)
    }
}

/// Sizes the compute thread pool; 0 means one thread per core.
pub(crate) fn init_threads(threads: usize) -> Result<(), CliError> {
    if threads == 0 {
        return Ok(());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| CliError::ThreadPool(e.to_string()))
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Models(command) => models::run(command),
        Command::Embed(args) => embed::run(args),
        Command::Bench(command) => bench::run(command),
    }
}
