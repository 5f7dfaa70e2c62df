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
    /// Raft log, snapshots and model blobs live here.
    pub data_dir: PathBuf,
    pub raft: RaftSettings,
}

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
    /// Limit for a write or read forwarded to the leader.
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

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: 1,
            api: "127.0.0.1:7700".into(),
            peer: "127.0.0.1:7701".into(),
            metrics: "127.0.0.1:7702".into(),
            data_dir: PathBuf::from("troupe-data"),
            raft: RaftSettings::default(),
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

    /// Applies `TROUPE_ID`, `TROUPE_API`, `TROUPE_PEER`, `TROUPE_METRICS`, `TROUPE_DATA_DIR`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(value) = env("TROUPE_ID") {
            self.id = value
                .parse()
                .map_err(|e: std::num::ParseIntError| ConfigError::Env {
                    name: "TROUPE_ID".into(),
                    value: value.clone(),
                    reason: e.to_string(),
                })?;
        }
        for (name, slot) in [
            ("TROUPE_API", &mut self.api),
            ("TROUPE_PEER", &mut self.peer),
            ("TROUPE_METRICS", &mut self.metrics),
        ] {
            if let Some(value) = env(name) {
                *slot = value;
            }
        }
        if let Some(value) = env("TROUPE_DATA_DIR") {
            self.data_dir = PathBuf::from(value);
        }
        Ok(())
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
        problems
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
            ..NodeConfig::default()
        };
        let problems = config.problems();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["id", "api"]);
        assert!(problems[1].fix.contains("IP:PORT"));
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
    }
}
