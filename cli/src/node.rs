//! `troupe node`: run one cluster node until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Args;

use super::remote::block_on;
use crate::error::CliError;
use troupe_node::config::NodeConfig;

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML config ([raft], [serving], [limits], [cluster], [routing]); environment
    /// (TROUPE_KEY, TROUPE_SECTION_KEY) and flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Raft node id (> 0, unique in the cluster).
    #[arg(long)]
    pub id: Option<u64>,
    /// Public gRPC address: Inference, Admin, grpc.health.v1 and server reflection.
    #[arg(long, value_name = "ADDR")]
    pub api: Option<String>,
    /// Peer gRPC address: Raft, heartbeats, forwarded inference and model pulls.
    #[arg(long, value_name = "ADDR")]
    pub peer: Option<String>,
    /// Metrics HTTP address: /metrics (Prometheus text), /healthz and /readyz.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// OpenAI-compatible HTTP address: /v1/models, /v1/embeddings, /v1/completions and
    /// /v1/chat/completions (server-sent events when streamed), with the API port's TLS and
    /// credentials (`Authorization: Bearer TOKEN`). Off unless given (or `http` in the config,
    /// TROUPE_HTTP).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Data directory; a directory holding Raft state rejoins with it.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Certificates made by `troupe certs init`: this node uses ca.crt, node-<id>.crt and
    /// node-<id>.key, on both ports, reloaded when they change or on SIGHUP.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure")]
    pub tls_dir: Option<PathBuf>,
    /// Run without TLS: plaintext on both ports and any peer let in. Only for a trusted
    /// network; a node without certificates refuses to start without it.
    #[arg(long)]
    pub insecure: bool,
}

impl NodeArgs {
    pub fn load(&self) -> Result<NodeConfig, CliError> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        if let Some(id) = self.id {
            config.id = id;
        }
        for (flag, slot) in [
            (&self.api, &mut config.api),
            (&self.peer, &mut config.peer),
            (&self.metrics, &mut config.metrics),
        ] {
            if let Some(value) = flag {
                *slot = value.clone();
            }
        }
        if let Some(http) = &self.http {
            config.http = Some(http.clone());
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(dir) = &self.tls_dir {
            config.tls.dir = Some(dir.clone());
        }
        if self.insecure {
            config.insecure = true;
        }
        Ok(config)
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM; stopping on SIGINT only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub fn run(args: NodeArgs) -> Result<(), CliError> {
    // Only the fault tier sets these; a spec that does not parse stops the node before it
    // starts with faults other than the ones asked for.
    troupe_failpoints::init_from_env().map_err(CliError::Usage)?;
    let config = args.load()?;
    config.validate()?;
    block_on(async move {
        troupe_node::run(config, async {
            shutdown_signal().await;
            tracing::info!("shutdown requested");
        })
        .await?;
        Ok(())
    })
}
