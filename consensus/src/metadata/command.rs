//! The writes the metadata state machine accepts, and what each one returns.

use serde::{Deserialize, Serialize};

/// Where a model version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Registered; nodes may fetch and load it.
    Loading,
    /// Loaded and warmed on the nodes that must serve it.
    Ready,
    /// Served.
    Active,
    /// No longer served; nodes unload it.
    Retired,
    /// Asked to become active: every serving node loads and warms it while the active version
    /// keeps serving; the leader's rollout controller makes it active once every live serving
    /// node reports it ready, or failed.
    Wanted,
    /// A rollout that did not complete (a node failed to load it, or the rollout timed out);
    /// the record's `reason` says why. The previous active version stayed active.
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Active => "active",
            ModelState::Retired => "retired",
            ModelState::Wanted => "wanted",
            ModelState::Failed => "failed",
        }
    }
}

/// Where a model version is on one node, as that node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeModelState {
    Loading,
    /// Loaded, warmed up and taking requests.
    Ready,
    Failed,
    Unloaded,
}

impl NodeModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeModelState::Loading => "loading",
            NodeModelState::Ready => "ready",
            NodeModelState::Failed => "failed",
            NodeModelState::Unloaded => "unloaded",
        }
    }
}

/// One metadata write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Command {
    RegisterModelVersion {
        name: String,
        version: String,
        /// sha256 of the artifact manifest, lowercase hex.
        digest: String,
        size_bytes: u64,
        format: String,
        /// Where the registering client found the files (a directory on the node's machine).
        /// Nodes without a verified copy import it from there; the digest still decides.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
        /// Arithmetic of an encoder's linear layers, `fp32` or `int8`; absent (entries from
        /// before precisions existed, or not given) means the serving node's
        /// `serving.precision`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        precision: Option<String>,
    },
    SetModelState {
        name: String,
        version: String,
        state: ModelState,
        /// Share of traffic this version gets while active (0..=100).
        traffic_weight: Option<u32>,
        /// Why, for `failed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// For `wanted`: the proposer's wall clock, from which the rollout timeout counts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        requested_at_unix_ms: Option<u64>,
    },
    SetTaskPriority {
        name: String,
        priority: i32,
    },
    SetSetting {
        key: String,
        value: String,
    },
    /// A node's report of where it is with a version. It is status, not intent: it does not
    /// move the version's `mod_revision`, so it never makes an operator's CAS fail.
    ReportModelReadiness {
        name: String,
        version: String,
        node_id: u64,
        state: NodeModelState,
        /// Why, for `failed`; empty otherwise.
        #[serde(default)]
        reason: String,
    },
}

impl Command {
    /// The key a CAS compares against, as `kind/name[/version]`.
    pub fn key(&self) -> String {
        match self {
            Command::RegisterModelVersion { name, version, .. }
            | Command::SetModelState { name, version, .. }
            | Command::ReportModelReadiness { name, version, .. } => {
                format!("models/{name}/{version}")
            }
            Command::SetTaskPriority { name, .. } => format!("tasks/{name}"),
            Command::SetSetting { key, .. } => format!("settings/{key}"),
        }
    }
}

/// A command as proposed: optionally a compare-and-set, optionally idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub command: Command,
    /// Apply only if the key's `mod_revision` equals this (0: the key must not exist).
    pub expected_revision: Option<u64>,
    /// A retry with the same id applies at most once and returns the first outcome.
    pub request_id: Option<String>,
}

impl Proposal {
    pub fn new(command: Command) -> Self {
        Self {
            command,
            expected_revision: None,
            request_id: None,
        }
    }
}

/// The proposals one log entry carries. Concurrent writes are gathered into one entry so they
/// share one Raft round and one flush; each still gets its own revision, in batch order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProposalBatch(pub Vec<Proposal>);

/// What applying a proposal did. Every node computes the same outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Written at `revision`.
    Applied { revision: u64 },
    /// The write was valid but changed nothing (same value again); state is at `revision`.
    Unchanged { revision: u64 },
    /// The CAS lost: the key is at `current_revision`, holding `current_value` (a setting's
    /// value, a task's priority, a model version's state; none when the key does not exist),
    /// so the loser can retry without reading it back, as etcd's Txn answers.
    Conflict {
        key: String,
        current_revision: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current_value: Option<String>,
    },
    /// The command is not valid in the current state.
    Rejected { reason: Rejection },
}

/// Why a command was refused by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "rejection")]
pub enum Rejection {
    #[error("model '{name}' version '{version}' is not registered")]
    UnknownModelVersion { name: String, version: String },
    #[error(
        "model '{name}' version '{version}' is already registered with digest {existing_digest}"
    )]
    VersionExists {
        name: String,
        version: String,
        existing_digest: String,
    },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
}
