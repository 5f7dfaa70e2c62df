//! Node configuration: a TOML file, then `TROUPE_*` environment variables, then flags, each
//! overriding the one before. [`NodeConfig::validate`] names every bad field and its fix.
//!
//! - here: the schema (one struct per section, with its defaults), and what each crate's
//!   runtime takes from it (serving, gossip, metadata, TLS, tokens);
//! - `env`: the `TROUPE_*` overlay;
//! - `check`: each section's own checks, and the node's across sections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything a node needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Raft id of this node, unique in the cluster, > 0.
    pub id: u64,
    /// Public gRPC (Inference, Admin, health).
    pub api: String,
    /// Peer gRPC (Raft, forwarding).
    pub peer: String,
    /// HTTP metrics and health probes.
    pub metrics: String,
    /// OpenAI-compatible HTTP API (`/v1/models`, `/v1/embeddings`, `/v1/completions`,
    /// `/v1/chat/completions`), with the API port's TLS and credentials. Off when unset.
    pub http: Option<String>,
    /// Raft log, snapshots and model blobs live here.
    pub data_dir: PathBuf,
    /// Verified copies of model versions, by digest. Default: `<data_dir>/models`. When set,
    /// the directory must exist.
    pub artifact_dir: Option<PathBuf>,
    pub raft: RaftSettings,
    pub serving: ServingSettings,
    pub limits: LimitSettings,
    pub routing: RoutingSettings,
    pub cluster: ClusterSettings,
    /// Certificates for both ports (`[tls]`). A node needs them, or `insecure`.
    pub tls: TlsSettings,
    /// Run both ports in plaintext and let any peer in: only for a trusted network.
    pub insecure: bool,
    /// Who may call the API (`[auth]`): bearer-token verification.
    pub auth: AuthSettings,
}

/// Bearer tokens on the API port. Tokens are verified with the keys in `jwks` (default:
/// `jwks.json` in `tls.dir`), reloaded when the file changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub jwks: Option<PathBuf>,
    /// The `iss` and `aud` a token must carry.
    pub issuer: String,
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        let policy = troupe_transport::TokenPolicy::default();
        Self {
            jwks: None,
            issuer: policy.issuer,
            audience: policy.audience,
            leeway_s: policy.leeway.as_secs(),
        }
    }
}

/// Where a node's certificates are. `dir` is a directory made by `troupe certs init`, of
/// which node `<id>` uses `ca.crt`, `node-<id>.crt` and `node-<id>.key`; `ca`, `cert` and
/// `key` name files directly (and override the directory's).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    pub dir: Option<PathBuf>,
    /// The CA bundle peers' and clients' certificates must chain to (old and new CA during a
    /// rotation).
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How often the files are checked for changes (SIGHUP checks at once); 0: default.
    pub reload_interval_ms: u64,
}

/// Default time between two checks of the certificate files.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// What `troupe node` says when it has neither certificates nor `--insecure`.
pub const NO_TLS_FIX: &str = "make certificates with `troupe certs init --out DIR --nodes N` and start each node with --tls-dir DIR (or [tls] ca, cert and key), or pass --insecure to run in plaintext on a trusted network";

/// Batching, workers and supervision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServingSettings {
    /// `cpu`, or `cuda` (needs a build with `--features cuda`).
    pub device: String,
    /// Arithmetic of encoder linear layers: `fp32`, or `int8` (int8 weights per channel and
    /// activations per token, about twice as fast on a CPU with VNNI, cosine ≥ 0.999 against
    /// fp32). A model version registered with its own precision uses that instead. Decoders
    /// (GGUF) keep their file's quantisation.
    pub precision: String,
    /// Threads of the compute pool (0: one per core).
    pub compute_threads: usize,
    /// Most texts one forward pass takes.
    pub max_batch_size: usize,
    /// Longest a request waits for its batch to fill while a worker is free, in µs.
    pub max_queue_delay_us: u64,
    /// Requests each priority lane holds before refusing with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Priority lanes per batcher.
    pub lanes: usize,
    /// Inference workers per loaded model version.
    pub workers_per_model: usize,
    /// Restart intensity: at most `max_restarts` restarts within `restart_window_s` seconds.
    pub max_restarts: usize,
    pub restart_window_s: u64,
    pub health_interval_ms: u64,
    /// Longest graceful shutdown waits for queued requests.
    pub drain_timeout_ms: u64,
    /// A rollout (`models activate`) not complete on every live node after this many seconds
    /// fails, and the active version stays.
    pub rollout_timeout_s: u64,
    /// Scheduling priority of the compute threads (Linux nice, 0..=19; 0 leaves it alone).
    /// Above 0 they yield the CPU to Raft, heartbeats and routing when every core is busy.
    pub compute_nice: i32,
    /// Memory for each loaded decoder's paged KV cache, in MiB. When it is full, new
    /// generations wait in their priority lane (a higher lane may preempt a lower one).
    pub kv_cache_mb: usize,
    /// Most prompt tokens one decoder step takes beside the running streams (chunked
    /// prefill): smaller keeps streams smooth while long prompts arrive, larger fills faster.
    pub prefill_chunk: usize,
    /// Cap on pulling model files from peers, in megabytes (10^6 bytes) per second, shared by
    /// all of this node's pulls; 0 means no cap.
    pub blob_bandwidth_mbps: f64,
}

impl Default for ServingSettings {
    fn default() -> Self {
        let actors = troupe_actors::ServingConfig::default();
        Self {
            device: "cpu".into(),
            precision: "fp32".into(),
            compute_threads: 0,
            max_batch_size: actors.max_batch_size,
            max_queue_delay_us: actors.max_queue_delay.as_micros() as u64,
            queue_capacity: actors.queue_capacity,
            lanes: actors.lanes,
            workers_per_model: actors.workers_per_model,
            max_restarts: actors.max_restarts,
            restart_window_s: actors.restart_window.as_secs(),
            health_interval_ms: actors.health_interval.as_millis() as u64,
            drain_timeout_ms: actors.drain_timeout.as_millis() as u64,
            rollout_timeout_s: actors.rollout_timeout.as_secs(),
            compute_nice: actors.compute_nice,
            kv_cache_mb: actors.kv_cache_mb,
            prefill_chunk: actors.prefill_chunk,
            blob_bandwidth_mbps: 0.0,
        }
    }
}

/// Limits of the public API. Each refusal names the limit and this setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Largest request message accepted, in bytes.
    pub max_message_bytes: usize,
    pub max_texts_per_request: usize,
    /// Longest text accepted, in characters (Unicode scalar values).
    pub max_chars_per_text: usize,
    /// HTTP/2 streams one connection may have open.
    pub max_concurrent_streams: u32,
    /// Longest a request may take; a shorter `grpc-timeout` from the client wins.
    pub request_timeout_ms: u64,
    /// HTTP/2 keepalive pings on idle connections, and how long to wait for the answer.
    pub keepalive_interval_s: u64,
    pub keepalive_timeout_s: u64,
    /// A connection with no call in flight for this long is closed (0: never).
    pub idle_timeout_s: u64,
    /// Open connections per port (handshakes included). At the limit a new connection
    /// closes the longest-idle one; when none is idle, the new one is refused.
    pub max_connections: usize,
    /// Largest cluster setting value, in bytes (at most 65536, the replicated state's own
    /// cap): a larger one is refused before it is replicated.
    pub max_setting_value_bytes: usize,
    /// Longest prompt (or rendered conversation) a Generate request may send, in characters.
    pub max_prompt_chars: usize,
    /// Tokens generated when a request does not say (`max_tokens` 0 or absent).
    pub default_max_tokens: usize,
    /// Most tokens one request may ask to generate.
    pub max_tokens: usize,
    /// Longest a generation may stream; a shorter client deadline wins.
    pub generate_timeout_ms: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_texts_per_request: 256,
            max_chars_per_text: 10_000,
            max_concurrent_streams: 1024,
            request_timeout_ms: 30_000,
            keepalive_interval_s: 30,
            keepalive_timeout_s: 10,
            idle_timeout_s: 300,
            max_connections: 4096,
            max_setting_value_bytes: 64 * 1024,
            max_prompt_chars: 32_000,
            default_max_tokens: 256,
            max_tokens: 4096,
            generate_timeout_ms: 300_000,
        }
    }
}

/// How a node chooses where a request is served: here, or forwarded to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSettings {
    /// `least_outstanding`, `round_robin`, `weighted` or `consistent_hash`.
    pub strategy: String,
    /// For `weighted`: node id -> weight (`weights = { 1 = 3, 2 = 1 }`); unlisted nodes weigh
    /// 1, weight 0 only takes traffic when no other node can.
    pub weights: std::collections::BTreeMap<String, u32>,
    /// Nodes tried per request (this one included) before the client gets the last error.
    pub max_attempts: usize,
    /// Longest a connection to a peer for forwarding may take to open.
    pub forward_connect_timeout_ms: u64,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            strategy: "least_outstanding".into(),
            weights: Default::default(),
            max_attempts: 3,
            forward_connect_timeout_ms: 1_000,
        }
    }
}

/// The routing strategies `routing.strategy` accepts.
pub use troupe_actors::router::STRATEGIES as ROUTING_STRATEGIES;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot and allow log compaction after this many entries.
    pub snapshot_every_entries: u64,
    /// Entries kept behind a snapshot.
    pub keep_entries_after_snapshot: u64,
    /// Limit for a write or read sent to the leader, over every failover to a new leader.
    pub forward_timeout_ms: u64,
    /// Changes kept for watches to replay; a watch from before them must resync.
    pub watch_history: usize,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_every_entries: 10_000,
            keep_entries_after_snapshot: 1_000,
            forward_timeout_ms: 5_000,
            watch_history: 10_000,
        }
    }
}

/// Health gossip between the nodes: heartbeats, and when a silent peer is suspect or down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// Time between two heartbeats to the same peer.
    pub heartbeat_interval_ms: u64,
    /// Heartbeats missed in a row before a peer is suspect.
    pub suspect_after: u32,
    /// Heartbeats missed in a row before a peer is down (more than `suspect_after`).
    pub down_after: u32,
    /// Longest one heartbeat (connecting included) may take; unset: the interval.
    pub heartbeat_timeout_ms: Option<u64>,
    /// This node tells its peers it is a backup: routers send it traffic only when no
    /// primary can take it.
    pub backup: bool,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        let gossip = troupe_actors::GossipConfig::default();
        Self {
            heartbeat_interval_ms: gossip.heartbeat_interval.as_millis() as u64,
            suspect_after: gossip.suspect_after,
            down_after: gossip.down_after,
            heartbeat_timeout_ms: None,
            backup: gossip.backup,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: 1,
            api: "127.0.0.1:7700".into(),
            peer: "127.0.0.1:7701".into(),
            metrics: "127.0.0.1:7702".into(),
            http: None,
            data_dir: PathBuf::from("troupe-data"),
            artifact_dir: None,
            raft: RaftSettings::default(),
            serving: ServingSettings::default(),
            limits: LimitSettings::default(),
            routing: RoutingSettings::default(),
            cluster: ClusterSettings::default(),
            tls: TlsSettings::default(),
            insecure: false,
            auth: AuthSettings::default(),
        }
    }
}

/// One problem in a configuration: which field, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} (fix: {})", self.field, self.problem, self.fix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid TOML for troupe: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("environment variable {name}={value:?} is not valid: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ConfigProblem>),
}

impl NodeConfig {
    /// Reads a TOML file. Unknown keys are errors, so a typo never passes silently.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            reason: e.to_string().replace('\n', " "),
        })
    }

    /// Where verified model artifacts are kept.
    pub fn model_store_dir(&self) -> PathBuf {
        self.artifact_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("models"))
    }

    /// The actor tree's settings.
    pub fn serving_config(&self) -> troupe_actors::ServingConfig {
        let s = &self.serving;
        troupe_actors::ServingConfig {
            max_batch_size: s.max_batch_size,
            max_queue_delay: Duration::from_micros(s.max_queue_delay_us),
            queue_capacity: s.queue_capacity,
            lanes: s.lanes,
            workers_per_model: s.workers_per_model,
            max_restarts: s.max_restarts,
            restart_window: Duration::from_secs(s.restart_window_s),
            health_interval: Duration::from_millis(s.health_interval_ms),
            drain_timeout: Duration::from_millis(s.drain_timeout_ms),
            rollout_timeout: Duration::from_secs(s.rollout_timeout_s),
            compute_nice: s.compute_nice,
            kv_cache_mb: s.kv_cache_mb,
            prefill_chunk: s.prefill_chunk,
        }
    }

    /// Health gossip's settings.
    pub fn gossip_config(&self) -> troupe_actors::GossipConfig {
        let c = &self.cluster;
        troupe_actors::GossipConfig {
            heartbeat_interval: Duration::from_millis(c.heartbeat_interval_ms),
            heartbeat_timeout: Duration::from_millis(
                c.heartbeat_timeout_ms.unwrap_or(c.heartbeat_interval_ms),
            ),
            suspect_after: c.suspect_after,
            down_after: c.down_after,
            backup: c.backup,
        }
    }

    /// The node's certificate files, or `None` when it runs insecure.
    pub fn tls_files(&self) -> Option<troupe_transport::TlsFiles> {
        if self.insecure {
            return None;
        }
        let tls = &self.tls;
        let from_dir = tls
            .dir
            .as_ref()
            .map(|dir| troupe_transport::TlsFiles::for_node(dir, self.id));
        let pick = |explicit: &Option<PathBuf>, of_dir: Option<&PathBuf>| {
            explicit.clone().or_else(|| of_dir.cloned())
        };
        Some(troupe_transport::TlsFiles {
            ca: pick(&tls.ca, from_dir.as_ref().map(|f| &f.ca))?,
            cert: pick(&tls.cert, from_dir.as_ref().map(|f| &f.cert))?,
            key: pick(&tls.key, from_dir.as_ref().map(|f| &f.key))?,
        })
    }

    /// Connection limits of each port.
    pub fn conn_limits(&self) -> troupe_transport::ConnLimits {
        troupe_transport::ConnLimits {
            max_connections: self.limits.max_connections,
            idle_timeout: (self.limits.idle_timeout_s > 0)
                .then(|| Duration::from_secs(self.limits.idle_timeout_s)),
        }
    }

    /// The JWKS that verifies API tokens, or `None` when the node runs insecure.
    pub fn jwks_path(&self) -> Option<PathBuf> {
        if self.insecure {
            return None;
        }
        self.auth.jwks.clone().or_else(|| {
            self.tls
                .dir
                .as_ref()
                .map(|dir| dir.join(troupe_transport::token::JWKS_FILE))
        })
    }

    /// What an API token must say.
    pub fn token_policy(&self) -> troupe_transport::TokenPolicy {
        troupe_transport::TokenPolicy {
            issuer: self.auth.issuer.clone(),
            audience: self.auth.audience.clone(),
            leeway: Duration::from_secs(self.auth.leeway_s),
        }
    }

    /// How often the certificate files are checked for changes.
    pub fn tls_reload_interval(&self) -> Duration {
        match self.tls.reload_interval_ms {
            0 => TLS_RELOAD_INTERVAL,
            ms => Duration::from_millis(ms),
        }
    }

    /// The router's strategy (the config must be valid).
    pub fn routing_strategy(&self) -> Box<dyn troupe_actors::Strategy> {
        let weights = self
            .routing
            .weights
            .iter()
            .filter_map(|(node, weight)| Some((node.parse().ok()?, *weight)))
            .collect();
        // The name was checked at load (`RoutingSettings::check`).
        troupe_actors::router::strategy(&self.routing.strategy, weights)
            .unwrap_or_else(|| Box::new(troupe_actors::router::LeastOutstanding))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    pub fn metadata_config(&self) -> troupe_consensus::MetadataConfig {
        let mut config = troupe_consensus::MetadataConfig::new(
            self.id,
            self.api.clone(),
            self.peer.clone(),
            self.data_dir.clone(),
        );
        config.heartbeat_interval = Duration::from_millis(self.raft.heartbeat_interval_ms);
        config.election_timeout_min = Duration::from_millis(self.raft.election_timeout_min_ms);
        config.election_timeout_max = Duration::from_millis(self.raft.election_timeout_max_ms);
        config.snapshot_every_entries = self.raft.snapshot_every_entries;
        config.keep_entries_after_snapshot = self.raft.keep_entries_after_snapshot;
        config.forward_timeout = Duration::from_millis(self.raft.forward_timeout_ms);
        config.watch_history = self.raft.watch_history;
        config
    }
}

mod check;
mod env;
#[cfg(test)]
mod tests;

pub use check::Problems;
pub use env::{env_name, ENV_KEYS};
