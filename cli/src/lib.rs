//! The `troupe` command line. Each command group lives in its own module; every command
//! prints its result on stdout (JSON with `--json` where it has data) and fails with one
//! line on stderr and a non-zero exit.

mod bench;
mod certs;
mod cluster;
mod config_check;
mod embed;
pub mod error;
mod generate;
mod models;
mod node;
mod peer_health;
mod priorities;
mod push;
pub(crate) mod remote;
mod revisions;
mod settings;
mod shell;
mod token;
mod up;

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
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// How remote commands reach nodes. Without --ca they connect in plaintext (for nodes run
/// with --insecure).
#[derive(Debug, Clone, Args)]
pub struct ClientTlsArgs {
    /// The cluster CA (PEM) to verify nodes' certificates with: remote commands then use
    /// TLS. `troupe certs init` writes it as ca.crt. (`troupe node` ignores --ca, --cert and
    /// --key: it takes its own with --tls-dir or [tls].)
    #[arg(
        id = "tls_ca",
        long = "ca",
        global = true,
        env = "TROUPE_CA",
        value_name = "FILE"
    )]
    pub ca: Option<PathBuf>,
    /// A client certificate to present (with --key), e.g. client-admin.crt.
    #[arg(
        id = "tls_cert",
        long = "cert",
        global = true,
        env = "TROUPE_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(
        id = "tls_key",
        long = "key",
        global = true,
        env = "TROUPE_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub key: Option<PathBuf>,
    /// A bearer token (`troupe token issue`) sent with every call; it wins over a client
    /// certificate's role.
    #[arg(
        long,
        global = true,
        env = "TROUPE_TOKEN",
        value_name = "JWT",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file holding the bearer token (keeps it out of the process list).
    #[arg(long, global = true, env = "TROUPE_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The bearer token these flags give, if any.
    pub fn token(&self) -> Result<Option<String>, CliError> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|e| CliError::Usage(format!("--token-file {}: {e}", path.display())))
    }

    /// The TLS settings these flags ask for.
    pub fn client_tls(&self) -> Result<Option<troupe_transport::ClientTls>, CliError> {
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => Ok(None),
            (None, _, _) => Err(CliError::Usage(
                "--cert/--key need --ca (TROUPE_CA): the CA that signed the nodes' certificates"
                    .into(),
            )),
            (Some(ca), cert, key) => Ok(Some(troupe_transport::ClientTls {
                ca: ca.clone(),
                identity: cert.clone().zip(key.clone()),
            })),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local cluster (3 nodes by default) on 127.0.0.1 serving all-MiniLM-L6-v2,
    /// then open the shell on it; the same --data-dir again resumes it.
    Up(up::UpArgs),
    /// Run a cluster node until SIGINT or SIGTERM.
    Node(node::NodeArgs),
    /// Cluster membership, status (with each node's view of its peers) and a node's actor tree.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Follow metadata changes as they apply (from --from REV, default the next one) until
    /// Ctrl-C or --count changes.
    Watch(revisions::WatchArgs),
    /// The models, priorities and settings as they were at a past revision (while the node's
    /// history still holds it).
    History(revisions::HistoryArgs),
    /// Task priorities (Raft-ordered).
    #[command(subcommand)]
    Priorities(priorities::PrioritiesCommand),
    /// Cluster settings (Raft-ordered): the request limits change every running node; other
    /// keys are the cluster's own data.
    #[command(subcommand)]
    Settings(settings::SettingsCommand),
    /// Models: fetch weights into the local cache; push, register, activate, retire and list
    /// versions in the cluster.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// The cluster CA and its node and client certificates (rcgen).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// API bearer tokens: mint one for a role, rotate the signing key, retire an old key.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Check a node config file: names each bad field and the fix.
    #[command(subcommand)]
    Config(config_check::ConfigCommand),
    /// Embed texts locally, or on a node with --addr: one text per line in, one JSON array
    /// per line out.
    Embed(embed::EmbedArgs),
    /// Generate text locally with a decoder model (SmolLM2 from `troupe models fetch
    /// smollm2-135m`): one JSON line per prompt, {"prompt_ids", "token_ids", "text",
    /// "finish_reason"}.
    Generate(generate::GenerateArgs),
    /// Benchmarks: `troupe bench engine` times the inference engine, `troupe bench raft` the
    /// metadata store side by side with etcd, `troupe bench serve` a serving node.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The admin actor shell: an interactive prompt over a node, or one command with -c. It
    /// takes the cluster, models, priorities, settings, watch and history commands above
    /// (with the shell's node as --addr), short words for the common ones (status, nodes,
    /// raft, actors), and embed, similar, generate and chat on the rest of the line.
    Shell(shell::ShellArgs),
}

/// Where the model comes from: a directory, or a name resolved in the cache (or, for
/// commands that talk to a node, the registered model name).
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
        if !known.is_complete(&dir) {
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

/// The compute device a local command runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// The CPU backend (burn Flex with troupe's fused kernels).
    Cpu,
    /// NVIDIA GPU through burn-cuda (needs a build with `--features cuda`).
    Cuda,
}

impl DeviceKind {
    /// Fails on `cuda` when this binary was built without the `cuda` feature.
    pub fn check_available(self) -> Result<(), CliError> {
        if self == DeviceKind::Cuda && !cfg!(feature = "cuda") {
            return Err(CliError::Usage(
                "this troupe was built without CUDA support: rebuild with `cargo build --release --features cuda` or use --device cpu".into(),
            ));
        }
        Ok(())
    }
}

/// Runs `$body` with `$backend` bound to the burn backend type and `$device` to its device.
macro_rules! with_backend {
    ($kind:expr, |$backend:ident, $device:ident| $body:expr) => {{
        match $kind {
            #[cfg(feature = "cuda")]
            $crate::DeviceKind::Cuda => {
                type $backend = troupe_models::backend::CudaBackend;
                let $device = troupe_models::backend::CudaDevice::default();
                $body
            }
            _ => {
                type $backend = troupe_models::CpuBackend;
                let $device = troupe_models::cpu_device();
                $body
            }
        }
    }};
}
pub(crate) use with_backend;

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
    // `troupe node` takes its own certificates (--tls-dir, [tls]); every other command is a
    // client.
    if !matches!(cli.command, Command::Node(_)) {
        if let Some(tls) = cli.tls.client_tls()? {
            remote::use_tls(tls);
        }
        if let Some(token) = cli.tls.token()? {
            remote::use_token(&token)?;
        }
    }
    match cli.command {
        Command::Certs(command) => certs::run(command),
        Command::Token(command) => token::run(command),
        Command::Up(args) => up::run(args),
        Command::Node(args) => node::run(args),
        Command::Cluster(command) => cluster::run(command),
        Command::Priorities(command) => priorities::run(command),
        Command::Settings(command) => settings::run(command),
        Command::Watch(args) => remote::block_on(revisions::watch(&args)),
        Command::History(args) => remote::block_on(revisions::history(&args)),
        Command::Config(command) => config_check::run(command),
        Command::Models(command) => models::run(command),
        Command::Embed(args) => embed::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Shell(args) => shell::run(args),
    }
}
