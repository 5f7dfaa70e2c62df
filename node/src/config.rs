//! Node configuration: a TOML file, then `TROUPE_*` environment variables, then flags, each
//! overriding the one before. [`NodeConfig::validate`] names every bad field and its fix.

use std::net::SocketAddr;
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
pub const ROUTING_STRATEGIES: [&str; 4] = [
    "least_outstanding",
    "round_robin",
    "weighted",
    "consistent_hash",
];

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

    /// Applies `TROUPE_<KEY>` for top-level keys (`TROUPE_ID`, `TROUPE_API`,
    /// `TROUPE_DATA_DIR`...) and `TROUPE_<SECTION>_<KEY>` for keys of every section (`[raft]`,
    /// `[serving]`, `[limits]`, `[cluster]`...: `TROUPE_SERVING_MAX_BATCH_SIZE=64`). Other `TROUPE_*` variables belong
    /// to other commands and are left alone.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let invalid = |name: &str, value: &str, reason: String| ConfigError::Env {
            name: name.to_owned(),
            value: value.to_owned(),
            reason,
        };
        let mut tree =
            toml::Table::try_from(&*self).map_err(|e| invalid("TROUPE_*", "", e.to_string()))?;
        // `artifact_dir` and `http` are absent from the tree while unset, so list the keys by
        // hand.
        let top = [
            "id",
            "api",
            "peer",
            "metrics",
            "http",
            "data_dir",
            "artifact_dir",
            "insecure",
        ];
        // Likewise optional section keys: integers, and paths (strings).
        let optional_integers = [("cluster", "heartbeat_timeout_ms")];
        let optional_paths = [
            ("tls", "dir"),
            ("tls", "ca"),
            ("tls", "cert"),
            ("tls", "key"),
            ("auth", "jwks"),
        ];
        let mut names: Vec<(String, Option<String>, String)> = top
            .iter()
            .map(|key| {
                (
                    format!("TROUPE_{}", key.to_uppercase()),
                    None,
                    (*key).to_owned(),
                )
            })
            .collect();
        for (section, value) in &tree {
            if let toml::Value::Table(table) = value {
                let optional = optional_integers
                    .iter()
                    .chain(&optional_paths)
                    .filter(|(of, key)| of == section && !table.contains_key(*key))
                    .map(|(_, key)| (*key).to_owned());
                for key in table.keys().cloned().chain(optional) {
                    names.push((
                        format!("TROUPE_{}_{}", section.to_uppercase(), key.to_uppercase()),
                        Some(section.clone()),
                        key,
                    ));
                }
            }
        }
        let mut changed = false;
        for (name, section, key) in names {
            let Some(raw) = env(&name) else { continue };
            let slot = match &section {
                None => &mut tree,
                Some(section) => match tree.get_mut(section) {
                    Some(toml::Value::Table(table)) => table,
                    _ => continue,
                },
            };
            let integer = section
                .as_deref()
                .is_some_and(|section| optional_integers.contains(&(section, key.as_str())));
            let value = match slot.get(&key) {
                None if integer => raw
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|e| invalid(&name, &raw, format!("expected an integer: {e}")))?,
                Some(toml::Value::Integer(_)) => raw
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|e| invalid(&name, &raw, format!("expected an integer: {e}")))?,
                Some(toml::Value::Float(_)) => raw
                    .parse::<f64>()
                    .map(toml::Value::Float)
                    .map_err(|e| invalid(&name, &raw, format!("expected a number: {e}")))?,
                Some(toml::Value::Boolean(_)) => raw
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|e| invalid(&name, &raw, format!("expected true or false: {e}")))?,
                _ => toml::Value::String(raw.clone()),
            };
            slot.insert(key, value);
            changed = true;
        }
        if changed {
            *self = tree
                .try_into()
                .map_err(|e: toml::de::Error| invalid("TROUPE_*", "", e.to_string()))?;
        }
        Ok(())
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

    /// Every problem in the configuration, empty when it is usable.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, what: String, fix: &str| {
            problems.push(ConfigProblem {
                field: field.into(),
                problem: what,
                fix: fix.into(),
            })
        };
        if self.id == 0 {
            problem(
                "id",
                "0 is not a valid node id".into(),
                "use a positive integer unique in the cluster",
            );
        }
        for (field, value) in [
            ("api", &self.api),
            ("peer", &self.peer),
            ("metrics", &self.metrics),
        ] {
            if value.parse::<SocketAddr>().is_err() {
                problem(
                    field,
                    format!("{value:?} is not an address"),
                    "write it as IP:PORT, e.g. 127.0.0.1:7700",
                );
            }
        }
        // Port 0 asks the OS for a free port, so equal ":0" addresses do not collide.
        let fixed = |addr: &str| !addr.ends_with(":0");
        let clash = |a: &str, b: &str| a == b && fixed(a);
        if clash(&self.api, &self.peer)
            || clash(&self.api, &self.metrics)
            || clash(&self.peer, &self.metrics)
        {
            problem(
                "api/peer/metrics",
                "two ports are the same".into(),
                "give each its own port",
            );
        }
        if let Some(http) = &self.http {
            if http.parse::<SocketAddr>().is_err() {
                problem(
                    "http",
                    format!("{http:?} is not an address"),
                    "write it as IP:PORT, e.g. 127.0.0.1:7703, or leave it out to serve no HTTP API",
                );
            } else if [&self.api, &self.peer, &self.metrics]
                .into_iter()
                .any(|other| clash(http, other))
            {
                problem(
                    "http",
                    format!("{http} is also the api, peer or metrics address"),
                    "give the HTTP API its own port (troupe up uses api + 3)",
                );
            }
        }
        if let Err(reason) = check_writable(&self.data_dir) {
            problem(
                "data_dir",
                format!("{} is not writable: {reason}", self.data_dir.display()),
                "point it at a directory this user can create and write",
            );
        }
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0 {
            problem(
                "raft.heartbeat_interval_ms",
                "must be positive".into(),
                "use e.g. 50",
            );
        }
        if raft.election_timeout_min_ms <= raft.heartbeat_interval_ms {
            problem(
                "raft.election_timeout_min_ms",
                "must exceed the heartbeat interval".into(),
                "use at least 3x raft.heartbeat_interval_ms",
            );
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            problem(
                "raft.election_timeout_max_ms",
                "must exceed election_timeout_min_ms".into(),
                "use e.g. 2x raft.election_timeout_min_ms",
            );
        }
        if raft.snapshot_every_entries == 0 {
            problem(
                "raft.snapshot_every_entries",
                "must be positive".into(),
                "use e.g. 10000",
            );
        }
        if raft.watch_history == 0 {
            problem(
                "raft.watch_history",
                "must be positive".into(),
                "use e.g. 10000",
            );
        }
        if raft.forward_timeout_ms == 0 {
            problem(
                "raft.forward_timeout_ms",
                "must be positive".into(),
                "use e.g. 5000",
            );
        }
        let cluster = &self.cluster;
        if cluster.heartbeat_interval_ms == 0 {
            problem(
                "cluster.heartbeat_interval_ms",
                "must be positive".into(),
                "use e.g. 200",
            );
        }
        if cluster.suspect_after == 0 {
            problem(
                "cluster.suspect_after",
                "must be at least 1 missed heartbeat".into(),
                "use e.g. 3",
            );
        }
        if cluster.down_after <= cluster.suspect_after {
            problem(
                "cluster.down_after",
                format!(
                    "{} does not exceed cluster.suspect_after ({})",
                    cluster.down_after, cluster.suspect_after
                ),
                "use more missed heartbeats than cluster.suspect_after, e.g. 10 with 3",
            );
        }
        if cluster.heartbeat_timeout_ms == Some(0) {
            problem(
                "cluster.heartbeat_timeout_ms",
                "must be positive".into(),
                "use e.g. 200, or leave it unset to use cluster.heartbeat_interval_ms",
            );
        }
        if let Some(dir) = &self.artifact_dir {
            if !dir.is_dir() {
                problem(
                    "artifact_dir",
                    format!(
                        "model directory {} does not exist or is not a directory",
                        dir.display()
                    ),
                    "create it, or remove artifact_dir to keep models under data_dir/models",
                );
            }
        }
        let serving = &self.serving;
        match serving.device.as_str() {
            "cpu" => {}
            "cuda" if cfg!(feature = "cuda") => {}
            "cuda" => problem(
                "serving.device",
                "this troupe was built without CUDA support".into(),
                "use \"cpu\", or rebuild with `cargo build --release --features cuda`",
            ),
            other => problem(
                "serving.device",
                format!("{other:?} is not a device"),
                "use \"cpu\" or \"cuda\"",
            ),
        }
        if let Err(error) = troupe_models::Precision::from_name(&serving.precision) {
            problem(
                "serving.precision",
                error.to_string(),
                "use \"fp32\" or \"int8\"",
            );
        }
        let max_batch = troupe_models::MAX_BATCH_SIZE;
        for (field, value, fix) in [
            (
                "serving.max_batch_size",
                serving.max_batch_size as u64,
                "use 1..=1024, e.g. 32",
            ),
            (
                "serving.queue_capacity",
                serving.queue_capacity as u64,
                "use e.g. 256",
            ),
            ("serving.lanes", serving.lanes as u64, "use e.g. 4"),
            (
                "serving.workers_per_model",
                serving.workers_per_model as u64,
                "use e.g. 1 (each worker computes with the whole thread pool)",
            ),
            (
                "serving.max_restarts",
                serving.max_restarts as u64,
                "use e.g. 10",
            ),
            (
                "serving.restart_window_s",
                serving.restart_window_s,
                "use e.g. 60",
            ),
            (
                "serving.health_interval_ms",
                serving.health_interval_ms,
                "use e.g. 500",
            ),
            (
                "serving.drain_timeout_ms",
                serving.drain_timeout_ms,
                "use e.g. 30000",
            ),
            (
                "serving.rollout_timeout_s",
                serving.rollout_timeout_s,
                "use e.g. 300",
            ),
            (
                "limits.max_message_bytes",
                self.limits.max_message_bytes as u64,
                "use e.g. 4194304",
            ),
            (
                "limits.max_texts_per_request",
                self.limits.max_texts_per_request as u64,
                "use e.g. 256",
            ),
            (
                "limits.max_chars_per_text",
                self.limits.max_chars_per_text as u64,
                "use e.g. 10000",
            ),
            (
                "limits.max_concurrent_streams",
                u64::from(self.limits.max_concurrent_streams),
                "use e.g. 1024",
            ),
            (
                "limits.request_timeout_ms",
                self.limits.request_timeout_ms,
                "use e.g. 30000",
            ),
            (
                "limits.keepalive_interval_s",
                self.limits.keepalive_interval_s,
                "use e.g. 30",
            ),
            (
                "limits.keepalive_timeout_s",
                self.limits.keepalive_timeout_s,
                "use e.g. 10",
            ),
        ] {
            if value == 0 {
                problem(field, "must be positive".into(), fix);
            }
        }
        if serving.max_batch_size > max_batch {
            problem(
                "serving.max_batch_size",
                format!(
                    "{} is above the engine's limit of {max_batch}",
                    serving.max_batch_size
                ),
                "use 1..=1024, e.g. 32",
            );
        }
        if !(serving.blob_bandwidth_mbps.is_finite() && serving.blob_bandwidth_mbps >= 0.0) {
            problem(
                "serving.blob_bandwidth_mbps",
                format!("{} is not a rate", serving.blob_bandwidth_mbps),
                "use megabytes per second, e.g. 100, or 0 for no cap",
            );
        }
        if serving.lanes > 64 {
            problem(
                "serving.lanes",
                format!("{} lanes is too many", serving.lanes),
                "use 1..=64",
            );
        }
        if !(0..=19).contains(&serving.compute_nice) {
            problem(
                "serving.compute_nice",
                format!("{} is not a nice value", serving.compute_nice),
                "use 0..=19 (0: the default priority; 10: yield to Raft and heartbeats)",
            );
        }
        if !(1..=1 << 20).contains(&serving.kv_cache_mb) {
            problem(
                "serving.kv_cache_mb",
                format!("{} MiB", serving.kv_cache_mb),
                "use 1..=1048576 (SmolLM2-135M needs 0.7 MiB per 16 tokens of context)",
            );
        }
        if !(1..=8192).contains(&serving.prefill_chunk) {
            problem(
                "serving.prefill_chunk",
                format!("{} tokens", serving.prefill_chunk),
                "use 1..=8192 (64 keeps streams smooth)",
            );
        }
        let limits = &self.limits;
        if limits.default_max_tokens == 0 || limits.default_max_tokens > limits.max_tokens {
            problem(
                "limits.default_max_tokens",
                format!(
                    "{} with limits.max_tokens {}",
                    limits.default_max_tokens, limits.max_tokens
                ),
                "use 1..=limits.max_tokens",
            );
        }
        let routing = &self.routing;
        if !ROUTING_STRATEGIES.contains(&routing.strategy.as_str()) {
            problem(
                "routing.strategy",
                format!("{:?} is not a routing strategy", routing.strategy),
                "use least_outstanding, round_robin, weighted or consistent_hash",
            );
        }
        for node in routing.weights.keys() {
            if node.parse::<u64>().map_or(true, |id| id == 0) {
                problem(
                    "routing.weights",
                    format!("{node:?} is not a node id"),
                    "key each weight by a node id, e.g. weights = { 1 = 3, 2 = 1 }",
                );
            }
        }
        if routing.max_attempts == 0 {
            problem(
                "routing.max_attempts",
                "must be positive".into(),
                "use e.g. 3 (this node and two peers)",
            );
        }
        if routing.forward_connect_timeout_ms == 0 {
            problem(
                "routing.forward_connect_timeout_ms",
                "must be positive".into(),
                "use e.g. 1000",
            );
        }
        let tls = &self.tls;
        let any_tls =
            tls.dir.is_some() || tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some();
        if self.insecure && any_tls {
            problem(
                "insecure",
                "is set together with [tls] certificates".into(),
                "choose one: TLS (drop --insecure) or plaintext (drop the [tls] settings)",
            );
        } else if !self.insecure && !any_tls {
            problem(
                "tls",
                "this node has no certificates, and would let anyone reach its Raft group".into(),
                NO_TLS_FIX,
            );
        } else if any_tls && tls.dir.is_none() {
            for (field, value) in [
                ("tls.ca", &tls.ca),
                ("tls.cert", &tls.cert),
                ("tls.key", &tls.key),
            ] {
                if value.is_none() {
                    problem(
                        field,
                        "is missing: without tls.dir, ca, cert and key are all needed".into(),
                        "set it, or set tls.dir (--tls-dir) to a directory made by `troupe certs init`",
                    );
                }
            }
        }
        // The files themselves: present, parseable, matching, and naming this node.
        if let Some(files) = self.tls_files() {
            match troupe_transport::TlsState::load(files.clone()) {
                Ok(state) => {
                    let named = state.current().identity.clone();
                    if named != troupe_transport::Identity::Node(self.id) {
                        problems.push(ConfigProblem {
                            field: "tls.cert".into(),
                            problem: format!(
                                "{} names {named}, not node {}",
                                files.cert.display(),
                                self.id
                            ),
                            fix: format!("use node-{}.crt and node-{}.key", self.id, self.id),
                        });
                    }
                }
                Err(error) => problems.push(ConfigProblem {
                    field: "tls".into(),
                    problem: error.to_string(),
                    fix: "fix the files, or make new ones with `troupe certs init` (or `troupe certs add-node` for one more node)".into(),
                }),
            }
        }
        if self.auth.issuer.is_empty() || self.auth.audience.is_empty() {
            problems.push(ConfigProblem {
                field: "auth.issuer/auth.audience".into(),
                problem: "may not be empty".into(),
                fix: format!(
                    "leave them out for the defaults ({:?} and {:?})",
                    troupe_transport::token::DEFAULT_ISSUER,
                    troupe_transport::token::DEFAULT_AUDIENCE
                ),
            });
        }
        if self.auth.leeway_s > 300 {
            problems.push(ConfigProblem {
                field: "auth.leeway_s".into(),
                problem: format!(
                    "{} s lets expired tokens in for too long",
                    self.auth.leeway_s
                ),
                fix: "use at most 300 (the default is 30)".into(),
            });
        }
        // An explicit JWKS must be there; the default one in tls.dir may appear later.
        if let (Some(path), false) = (&self.auth.jwks, self.insecure) {
            if let Err(error) = troupe_transport::token::Jwks::load(path) {
                problems.push(ConfigProblem {
                    field: "auth.jwks".into(),
                    problem: error.to_string(),
                    fix: "point it at the jwks.json `troupe certs init` wrote".into(),
                });
            }
        } else if let Some(path) = self.jwks_path().filter(|p| p.exists()) {
            if let Err(error) = troupe_transport::token::Jwks::load(&path) {
                problems.push(ConfigProblem {
                    field: "auth.jwks".into(),
                    problem: error.to_string(),
                    fix: "fix the file, or remove it to accept client certificates only".into(),
                });
            }
        }
        if self.limits.max_connections < 16 {
            problems.push(ConfigProblem {
                field: "limits.max_connections".into(),
                problem: format!("{} leaves no room for clients", self.limits.max_connections),
                fix: "use at least 16 (the default is 4096)".into(),
            });
        }
        let cap = troupe_consensus::metadata::state::MAX_SETTING_BYTES;
        if self.limits.max_setting_value_bytes == 0 || self.limits.max_setting_value_bytes > cap {
            problems.push(ConfigProblem {
                field: "limits.max_setting_value_bytes".into(),
                problem: format!(
                    "{} is not between 1 and {cap}, the most the replicated state accepts",
                    self.limits.max_setting_value_bytes
                ),
                fix: format!("use at most {cap} (the default)"),
            });
        }
        problems
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
    pub fn routing_strategy(&self) -> troupe_actors::Strategy {
        use troupe_actors::Strategy;
        match self.routing.strategy.as_str() {
            "round_robin" => Strategy::RoundRobin,
            "weighted" => Strategy::Weighted(
                self.routing
                    .weights
                    .iter()
                    .filter_map(|(node, weight)| Some((node.parse().ok()?, *weight)))
                    .collect(),
            ),
            "consistent_hash" => Strategy::ConsistentHash,
            _ => Strategy::LeastOutstanding,
        }
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

/// Creates the directory if needed and proves a file can be written in it.
fn check_writable(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let probe = dir.join(".troupe-write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| e.to_string())?;
    std::fs::remove_file(&probe).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_fields_are_named_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "id = 2\napi = \"127.0.0.1:7700\"\nbogus = 1\n").unwrap();
        let error = NodeConfig::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("bogus"), "{error}");

        let config = NodeConfig {
            id: 0,
            api: "localhost".into(),
            data_dir: dir.path().join("data"),
            insecure: true,
            ..NodeConfig::default()
        };
        let problems = config.problems();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["id", "api"]);
        assert!(problems[1].fix.contains("IP:PORT"));

        let config = NodeConfig {
            data_dir: dir.path().join("data"),
            artifact_dir: Some(dir.path().join("missing")),
            serving: ServingSettings {
                max_batch_size: 5000,
                device: "tpu".into(),
                ..ServingSettings::default()
            },
            limits: LimitSettings {
                max_texts_per_request: 0,
                ..LimitSettings::default()
            },
            insecure: true,
            ..NodeConfig::default()
        };
        let problems = config.problems();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "artifact_dir",
                "serving.device",
                "limits.max_texts_per_request",
                "serving.max_batch_size"
            ]
        );
        assert!(problems[1].fix.contains("--features cuda") || problems[1].fix.contains("\"cpu\""));
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = NodeConfig::default();
        config
            .apply_env(|name| match name {
                "TROUPE_ID" => Some("7".into()),
                "TROUPE_API" => Some("127.0.0.1:9000".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!((config.id, config.api.as_str()), (7, "127.0.0.1:9000"));
        let error = config.apply_env(|name| (name == "TROUPE_ID").then(|| "x".to_owned()));
        assert!(error.unwrap_err().to_string().contains("TROUPE_ID"));

        // Section keys: TROUPE_<SECTION>_<KEY>; other TROUPE_* variables are not ours.
        let mut config = NodeConfig::default();
        config
            .apply_env(|name| match name {
                "TROUPE_SERVING_MAX_BATCH_SIZE" => Some("64".into()),
                "TROUPE_LIMITS_MAX_TEXTS_PER_REQUEST" => Some("9".into()),
                "TROUPE_ARTIFACT_DIR" => Some("/srv/models".into()),
                "TROUPE_HOME" | "TROUPE_MODEL_DIR" => Some("/elsewhere".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.serving.max_batch_size, 64);
        assert_eq!(config.limits.max_texts_per_request, 9);
        assert_eq!(config.artifact_dir, Some(PathBuf::from("/srv/models")));
        let error = config
            .apply_env(|name| (name == "TROUPE_SERVING_LANES").then(|| "many".to_owned()))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("TROUPE_SERVING_LANES") && error.contains("integer"),
            "{error}"
        );
    }

    #[test]
    fn cluster_settings_come_from_the_file_and_the_environment_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "[cluster]\nheartbeat_interval_ms = 50\nsuspect_after = 2\ndown_after = 5\n",
        )
        .unwrap();
        let mut config = NodeConfig::from_file(&path).unwrap();
        let gossip = config.gossip_config();
        assert_eq!(gossip.heartbeat_interval, Duration::from_millis(50));
        // The timeout follows the interval unless set.
        assert_eq!(gossip.heartbeat_timeout, Duration::from_millis(50));
        assert_eq!((gossip.suspect_after, gossip.down_after), (2, 5));
        assert!(!gossip.backup);

        // The optional timeout is absent from the file and still settable from the
        // environment, like every other key.
        config
            .apply_env(|name| match name {
                "TROUPE_CLUSTER_HEARTBEAT_TIMEOUT_MS" => Some("80".into()),
                "TROUPE_CLUSTER_BACKUP" => Some("true".into()),
                "TROUPE_CLUSTER_DOWN_AFTER" => Some("7".into()),
                _ => None,
            })
            .unwrap();
        let gossip = config.gossip_config();
        assert_eq!(gossip.heartbeat_timeout, Duration::from_millis(80));
        assert_eq!(gossip.down_after, 7);
        assert!(gossip.backup);
        let error = config
            .apply_env(|name| {
                (name == "TROUPE_CLUSTER_HEARTBEAT_TIMEOUT_MS").then(|| "soon".to_owned())
            })
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("TROUPE_CLUSTER_HEARTBEAT_TIMEOUT_MS"),
            "{error}"
        );

        let config = NodeConfig {
            data_dir: dir.path().join("data"),
            cluster: ClusterSettings {
                heartbeat_interval_ms: 0,
                suspect_after: 0,
                down_after: 0,
                heartbeat_timeout_ms: Some(0),
                backup: false,
            },
            insecure: true,
            ..NodeConfig::default()
        };
        let problems = config.problems();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "cluster.heartbeat_interval_ms",
                "cluster.suspect_after",
                "cluster.down_after",
                "cluster.heartbeat_timeout_ms"
            ]
        );
        let config = NodeConfig {
            data_dir: dir.path().join("data"),
            cluster: ClusterSettings {
                suspect_after: 4,
                down_after: 4,
                ..ClusterSettings::default()
            },
            insecure: true,
            ..NodeConfig::default()
        };
        let problems = config.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0]
            .problem
            .contains("does not exceed cluster.suspect_after (4)"));
        assert!(NodeConfig {
            data_dir: dir.path().join("data"),
            insecure: true,
            ..NodeConfig::default()
        }
        .problems()
        .is_empty());
    }

    #[test]
    fn a_node_needs_certificates_or_insecure_and_the_refusal_names_both_fixes() {
        let bare = NodeConfig::default();
        let problems = bare.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "tls");
        assert!(
            problems[0].fix.contains("troupe certs init") && problems[0].fix.contains("--insecure")
        );
        assert_eq!(bare.tls_files(), None);

        // TROUPE_TLS_DIR and TROUPE_INSECURE reach the config like every other key.
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        troupe_transport::certs::init(&certs, 2, &[]).unwrap();
        let mut config = NodeConfig {
            id: 2,
            data_dir: dir.path().join("data"),
            ..NodeConfig::default()
        };
        config
            .apply_env(|name| (name == "TROUPE_TLS_DIR").then(|| certs.display().to_string()))
            .unwrap();
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        let files = config.tls_files().unwrap();
        assert_eq!(files.cert, certs.join("node-2.crt"));
        assert_eq!(files.ca, certs.join("ca.crt"));
        // The files must name this node.
        config.id = 1;
        config.tls.cert = Some(certs.join("node-2.crt"));
        config.tls.key = Some(certs.join("node-2.key"));
        let problems = config.problems();
        assert_eq!(problems[0].field, "tls.cert", "{problems:?}");
        assert!(problems[0].problem.contains("names node 2, not node 1"));
        config.tls.cert = Some(certs.join("node-1.crt"));
        let problems = config.problems();
        assert!(
            problems[0].problem.contains("does not match the key"),
            "{problems:?}"
        );
        // An explicit file overrides the directory's.
        config.tls.key = Some("/keys/two.key".into());
        assert_eq!(config.tls_files().unwrap().key, Path::new("/keys/two.key"));
        assert!(config.problems()[0].problem.contains("/keys/two.key"));
        // Both at once is a contradiction.
        config
            .apply_env(|name| (name == "TROUPE_INSECURE").then(|| "true".into()))
            .unwrap();
        assert!(config.insecure);
        assert_eq!(config.problems()[0].field, "insecure");

        // Files without a directory must come as a set.
        let partial = NodeConfig {
            tls: TlsSettings {
                ca: Some("/ca.crt".into()),
                ..TlsSettings::default()
            },
            ..NodeConfig::default()
        };
        let fields: Vec<String> = partial.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(fields, ["tls.cert", "tls.key"]);
    }

    #[test]
    fn the_http_address_comes_from_the_file_or_the_environment_and_is_checked() {
        let config: NodeConfig = toml::from_str("http = \"127.0.0.1:7703\"").unwrap();
        assert_eq!(config.http.as_deref(), Some("127.0.0.1:7703"));
        let dir = tempfile::tempdir().unwrap();
        let mut config = NodeConfig {
            insecure: true,
            data_dir: dir.path().join("data"),
            ..NodeConfig::default()
        };
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        config
            .apply_env(|name| (name == "TROUPE_HTTP").then(|| "127.0.0.1:7702".into()))
            .unwrap();
        assert_eq!(config.http.as_deref(), Some("127.0.0.1:7702"));
        let problems = config.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "http");
        config.http = Some("localhost".into());
        assert!(config.problems()[0].problem.contains("not an address"));
        config.http = Some("127.0.0.1:0".into());
        assert!(config.problems().is_empty());
    }
}
