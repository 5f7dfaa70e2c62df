//! Checking a node's configuration: each section checks its own keys, and the node the keys
//! that span sections (addresses, TLS and auth, directories). Every problem names its key,
//! what is wrong and the fix.

use std::net::SocketAddr;
use std::path::Path;

use super::*;

/// The problems found so far.
#[derive(Default)]
pub struct Problems(Vec<ConfigProblem>);

impl Problems {
    pub fn add(&mut self, field: &str, problem: String, fix: &str) {
        self.0.push(ConfigProblem {
            field: field.into(),
            problem,
            fix: fix.into(),
        });
    }

    pub fn push(&mut self, problem: ConfigProblem) {
        self.0.push(problem);
    }

    pub fn into_vec(self) -> Vec<ConfigProblem> {
        self.0
    }
}

impl NodeConfig {
    /// Every problem in the configuration, empty when it is usable.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut out = Problems::default();
        self.check_node(&mut out);
        self.raft.check(&mut out);
        self.cluster.check(&mut out);
        self.serving.check(&mut out);
        self.limits.check(&mut out);
        self.routing.check(&mut out);
        out.0
    }

    /// The keys that are not one section's: id, addresses, directories, TLS and auth.
    fn check_node(&self, out: &mut Problems) {
        if self.id == 0 {
            out.add(
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
                out.add(
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
            out.add(
                "api/peer/metrics",
                "two ports are the same".into(),
                "give each its own port",
            );
        }
        if let Some(http) = &self.http {
            if http.parse::<SocketAddr>().is_err() {
                out.add(
                    "http",
                    format!("{http:?} is not an address"),
                    "write it as IP:PORT, e.g. 127.0.0.1:7703, or leave it out to serve no HTTP API",
                );
            } else if [&self.api, &self.peer, &self.metrics]
                .into_iter()
                .any(|other| clash(http, other))
            {
                out.add(
                    "http",
                    format!("{http} is also the api, peer or metrics address"),
                    "give the HTTP API its own port (troupe up uses api + 3)",
                );
            }
        }
        if let Err(reason) = check_writable(&self.data_dir) {
            out.add(
                "data_dir",
                format!("{} is not writable: {reason}", self.data_dir.display()),
                "point it at a directory this user can create and write",
            );
        }
        if let Some(dir) = &self.artifact_dir {
            if !dir.is_dir() {
                out.add(
                    "artifact_dir",
                    format!(
                        "model directory {} does not exist or is not a directory",
                        dir.display()
                    ),
                    "create it, or remove artifact_dir to keep models under data_dir/models",
                );
            }
        }
        let tls = &self.tls;
        let any_tls =
            tls.dir.is_some() || tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some();
        if self.insecure && any_tls {
            out.add(
                "insecure",
                "is set together with [tls] certificates".into(),
                "choose one: TLS (drop --insecure) or plaintext (drop the [tls] settings)",
            );
        } else if !self.insecure && !any_tls {
            out.add(
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
                    out.add(
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
                        out.push(ConfigProblem {
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
                Err(error) => out.push(ConfigProblem {
                    field: "tls".into(),
                    problem: error.to_string(),
                    fix: "fix the files, or make new ones with `troupe certs init` (or `troupe certs add-node` for one more node)".into(),
                }),
            }
        }
        if self.auth.issuer.is_empty() || self.auth.audience.is_empty() {
            out.push(ConfigProblem {
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
            out.push(ConfigProblem {
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
                out.push(ConfigProblem {
                    field: "auth.jwks".into(),
                    problem: error.to_string(),
                    fix: "point it at the jwks.json `troupe certs init` wrote".into(),
                });
            }
        } else if let Some(path) = self.jwks_path().filter(|p| p.exists()) {
            if let Err(error) = troupe_transport::token::Jwks::load(&path) {
                out.push(ConfigProblem {
                    field: "auth.jwks".into(),
                    problem: error.to_string(),
                    fix: "fix the file, or remove it to accept client certificates only".into(),
                });
            }
        }
    }
}

impl RaftSettings {
    /// `[raft]`: timings that order correctly, positive sizes.
    pub fn check(&self, out: &mut Problems) {
        let raft = self;
        if raft.heartbeat_interval_ms == 0 {
            out.add(
                "raft.heartbeat_interval_ms",
                "must be positive".into(),
                "use e.g. 50",
            );
        }
        if raft.election_timeout_min_ms <= raft.heartbeat_interval_ms {
            out.add(
                "raft.election_timeout_min_ms",
                "must exceed the heartbeat interval".into(),
                "use at least 3x raft.heartbeat_interval_ms",
            );
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            out.add(
                "raft.election_timeout_max_ms",
                "must exceed election_timeout_min_ms".into(),
                "use e.g. 2x raft.election_timeout_min_ms",
            );
        }
        if raft.snapshot_every_entries == 0 {
            out.add(
                "raft.snapshot_every_entries",
                "must be positive".into(),
                "use e.g. 10000",
            );
        }
        if raft.watch_history == 0 {
            out.add(
                "raft.watch_history",
                "must be positive".into(),
                "use e.g. 10000",
            );
        }
        if raft.forward_timeout_ms == 0 {
            out.add(
                "raft.forward_timeout_ms",
                "must be positive".into(),
                "use e.g. 5000",
            );
        }
    }
}

impl ClusterSettings {
    /// `[cluster]`: heartbeat timing and the missed-heartbeat thresholds.
    pub fn check(&self, out: &mut Problems) {
        let cluster = self;
        if cluster.heartbeat_interval_ms == 0 {
            out.add(
                "cluster.heartbeat_interval_ms",
                "must be positive".into(),
                "use e.g. 200",
            );
        }
        if cluster.suspect_after == 0 {
            out.add(
                "cluster.suspect_after",
                "must be at least 1 missed heartbeat".into(),
                "use e.g. 3",
            );
        }
        if cluster.down_after <= cluster.suspect_after {
            out.add(
                "cluster.down_after",
                format!(
                    "{} does not exceed cluster.suspect_after ({})",
                    cluster.down_after, cluster.suspect_after
                ),
                "use more missed heartbeats than cluster.suspect_after, e.g. 10 with 3",
            );
        }
        if cluster.heartbeat_timeout_ms == Some(0) {
            out.add(
                "cluster.heartbeat_timeout_ms",
                "must be positive".into(),
                "use e.g. 200, or leave it unset to use cluster.heartbeat_interval_ms",
            );
        }
    }
}

impl ServingSettings {
    /// `[serving]`: device, precision, batch and queue shapes, restarts, the KV cache.
    pub fn check(&self, out: &mut Problems) {
        let serving = self;
        match serving.device.as_str() {
            "cpu" => {}
            "cuda" if cfg!(feature = "cuda") => {}
            "cuda" => out.add(
                "serving.device",
                "this troupe was built without CUDA support".into(),
                "use \"cpu\", or rebuild with `cargo build --release --features cuda`",
            ),
            other => out.add(
                "serving.device",
                format!("{other:?} is not a device"),
                "use \"cpu\" or \"cuda\"",
            ),
        }
        if let Err(error) = troupe_models::Precision::from_name(&serving.precision) {
            out.add(
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
        ] {
            if value == 0 {
                out.add(field, "must be positive".into(), fix);
            }
        }
        if serving.max_batch_size > max_batch {
            out.add(
                "serving.max_batch_size",
                format!(
                    "{} is above the engine's limit of {max_batch}",
                    serving.max_batch_size
                ),
                "use 1..=1024, e.g. 32",
            );
        }
        if !(serving.blob_bandwidth_mbps.is_finite() && serving.blob_bandwidth_mbps >= 0.0) {
            out.add(
                "serving.blob_bandwidth_mbps",
                format!("{} is not a rate", serving.blob_bandwidth_mbps),
                "use megabytes per second, e.g. 100, or 0 for no cap",
            );
        }
        if serving.lanes > 64 {
            out.add(
                "serving.lanes",
                format!("{} lanes is too many", serving.lanes),
                "use 1..=64",
            );
        }
        if !(0..=19).contains(&serving.compute_nice) {
            out.add(
                "serving.compute_nice",
                format!("{} is not a nice value", serving.compute_nice),
                "use 0..=19 (0: the default priority; 10: yield to Raft and heartbeats)",
            );
        }
        if !(1..=1 << 20).contains(&serving.kv_cache_mb) {
            out.add(
                "serving.kv_cache_mb",
                format!("{} MiB", serving.kv_cache_mb),
                "use 1..=1048576 (SmolLM2-135M needs 0.7 MiB per 16 tokens of context)",
            );
        }
        if !(1..=8192).contains(&serving.prefill_chunk) {
            out.add(
                "serving.prefill_chunk",
                format!("{} tokens", serving.prefill_chunk),
                "use 1..=8192 (64 keeps streams smooth)",
            );
        }
    }
}

impl LimitSettings {
    /// `[limits]`: positive sizes and timeouts, token limits that fit each other.
    pub fn check(&self, out: &mut Problems) {
        let limits = self;
        for (field, value, fix) in [
            (
                "limits.max_message_bytes",
                limits.max_message_bytes as u64,
                "use e.g. 4194304",
            ),
            (
                "limits.max_texts_per_request",
                limits.max_texts_per_request as u64,
                "use e.g. 256",
            ),
            (
                "limits.max_chars_per_text",
                limits.max_chars_per_text as u64,
                "use e.g. 10000",
            ),
            (
                "limits.max_concurrent_streams",
                u64::from(limits.max_concurrent_streams),
                "use e.g. 1024",
            ),
            (
                "limits.request_timeout_ms",
                limits.request_timeout_ms,
                "use e.g. 30000",
            ),
            (
                "limits.keepalive_interval_s",
                limits.keepalive_interval_s,
                "use e.g. 30",
            ),
            (
                "limits.keepalive_timeout_s",
                limits.keepalive_timeout_s,
                "use e.g. 10",
            ),
        ] {
            if value == 0 {
                out.add(field, "must be positive".into(), fix);
            }
        }
        if limits.default_max_tokens == 0 || limits.default_max_tokens > limits.max_tokens {
            out.add(
                "limits.default_max_tokens",
                format!(
                    "{} with limits.max_tokens {}",
                    limits.default_max_tokens, limits.max_tokens
                ),
                "use 1..=limits.max_tokens",
            );
        }
        if limits.max_connections < 16 {
            out.push(ConfigProblem {
                field: "limits.max_connections".into(),
                problem: format!("{} leaves no room for clients", limits.max_connections),
                fix: "use at least 16 (the default is 4096)".into(),
            });
        }
        let cap = troupe_consensus::metadata::state::MAX_SETTING_BYTES;
        if limits.max_setting_value_bytes == 0 || limits.max_setting_value_bytes > cap {
            out.push(ConfigProblem {
                field: "limits.max_setting_value_bytes".into(),
                problem: format!(
                    "{} is not between 1 and {cap}, the most the replicated state accepts",
                    limits.max_setting_value_bytes
                ),
                fix: format!("use at most {cap} (the default)"),
            });
        }
    }
}

impl RoutingSettings {
    /// `[routing]`: the strategy, its weights, attempts.
    pub fn check(&self, out: &mut Problems) {
        let routing = self;
        if !ROUTING_STRATEGIES.contains(&routing.strategy.as_str()) {
            out.add(
                "routing.strategy",
                format!("{:?} is not a routing strategy", routing.strategy),
                "use least_outstanding, round_robin, weighted or consistent_hash",
            );
        }
        for node in routing.weights.keys() {
            if node.parse::<u64>().map_or(true, |id| id == 0) {
                out.add(
                    "routing.weights",
                    format!("{node:?} is not a node id"),
                    "key each weight by a node id, e.g. weights = { 1 = 3, 2 = 1 }",
                );
            }
        }
        if routing.max_attempts == 0 {
            out.add(
                "routing.max_attempts",
                "must be positive".into(),
                "use e.g. 3 (this node and two peers)",
            );
        }
        if routing.forward_connect_timeout_ms == 0 {
            out.add(
                "routing.forward_connect_timeout_ms",
                "must be positive".into(),
                "use e.g. 1000",
            );
        }
    }
}

/// Creates the directory if needed and proves a file can be written in it.
fn check_writable(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let probe = dir.join(".troupe-write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| e.to_string())?;
    std::fs::remove_file(&probe).map_err(|e| e.to_string())
}
