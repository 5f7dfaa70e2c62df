//! The replicated metadata: model versions, task priorities and cluster settings, each key
//! with etcd-style `create_revision` / `mod_revision`, plus the idempotency table.
//!
//! The revision counts changes, as etcd's does: a proposal that changes a key takes the next
//! revision, in Raft log order. A rejected write, a lost compare-and-set, a write of what is
//! already there and an idempotent replay change nothing and take none; they report the
//! current revision (a replay, the outcome of its first application). Entries that carry no
//! proposal (blank, membership) take none either. [`MetadataState::apply`] is a pure function
//! of the state, the revision and the proposal, so every node that applies the same log holds
//! the same state, byte for byte once serialised.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::command::{Command, ModelState, NodeModelState, Outcome, Proposal, Rejection};
use crate::tasks::TaskPriority;

/// Request ids remembered for idempotent retries; the oldest is forgotten first.
pub const IDEMPOTENCY_WINDOW: usize = 100_000;

/// Longest name (model, version, task, setting key) accepted.
pub const MAX_NAME_BYTES: usize = troupe_proto::names::MAX_NAME_BYTES;

/// Largest setting value accepted.
pub const MAX_SETTING_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRevisions {
    pub create_revision: u64,
    pub mod_revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersionRecord {
    pub digest: String,
    pub size_bytes: u64,
    pub format: String,
    /// Directory the version was registered from, if it was (see `Command::RegisterModelVersion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `fp32` or `int8` (see `Command::RegisterModelVersion`); absent: the node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    pub state: ModelState,
    pub traffic_weight: u32,
    pub revisions: KeyRevisions,
    /// Each node's report of where it is with this version, by node id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<u64, NodeReadiness>,
    /// Why the version is `failed`; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When the version was last asked to become active (the proposer's clock, ms since the
    /// Unix epoch): the rollout timeout counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_started_unix_ms: Option<u64>,
}

/// A node's last report on a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReadiness {
    pub state: NodeModelState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The revision of the report.
    pub revision: u64,
}

/// Longest failure reason a readiness report keeps.
pub const MAX_REASON_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub priority: i32,
    pub revisions: KeyRevisions,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingRecord {
    pub value: String,
    pub revisions: KeyRevisions,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataState {
    /// Revision of the last proposal that changed the state.
    pub revision: u64,
    /// model name -> version -> record.
    pub models: BTreeMap<String, BTreeMap<String, ModelVersionRecord>>,
    pub tasks: BTreeMap<String, TaskRecord>,
    pub settings: BTreeMap<String, SettingRecord>,
    /// request id -> the outcome of its first application.
    idempotency: BTreeMap<String, Outcome>,
    /// Request ids in the order they were first applied, for deterministic eviction.
    idempotency_order: VecDeque<String>,
}

fn check_name(field: &str, value: &str) -> Result<(), Rejection> {
    match troupe_proto::names::name_problem(value) {
        Some(reason) => Err(Rejection::Invalid {
            field: field.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_reason(reason: &str) -> Result<(), Rejection> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(Rejection::Invalid {
            field: "reason".into(),
            reason: format!("{} bytes, the limit is {MAX_REASON_BYTES}", reason.len()),
        });
    }
    Ok(())
}

/// The precisions a model version may ask for.
pub const PRECISIONS: [&str; 2] = ["fp32", "int8"];

/// A version's precision must be one troupe runs, and int8 only for an encoder.
fn check_precision(format: &str, precision: Option<&str>) -> Result<(), Rejection> {
    let Some(precision) = precision else {
        return Ok(());
    };
    if !PRECISIONS.contains(&precision) {
        let shown: String = precision.chars().take(32).collect();
        return Err(Rejection::Invalid {
            field: "precision".into(),
            reason: format!(
                "{shown:?} is not a precision: use one of {}",
                PRECISIONS.join(", ")
            ),
        });
    }
    if precision == "int8" && format.eq_ignore_ascii_case("gguf") {
        return Err(Rejection::Invalid {
            field: "precision".into(),
            reason: "int8 applies to encoders (safetensors); a gguf decoder keeps the quantisation of its file: register it without a precision, or with fp32".into(),
        });
    }
    Ok(())
}

/// Whether `command` is well formed. The state machine applies only commands that pass, and
/// the facade checks before proposing, so an invalid command never reaches the log.
pub fn check_command(command: &Command) -> Result<(), Rejection> {
    match command {
        Command::RegisterModelVersion {
            name,
            version,
            digest,
            format,
            precision,
            ..
        } => {
            check_name("model name", name)?;
            check_name("version", version)?;
            check_name("format", format)?;
            check_precision(format, precision.as_deref())?;
            let hex =
                digest.len() == 64 && digest.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
            if !hex {
                return Err(Rejection::Invalid {
                    field: "digest".into(),
                    reason: "must be a sha256 as 64 lowercase hex characters".into(),
                });
            }
            Ok(())
        }
        Command::SetModelState {
            name,
            version,
            traffic_weight,
            reason,
            ..
        } => {
            check_name("model name", name)?;
            check_name("version", version)?;
            if traffic_weight.is_some_and(|w| w > 100) {
                return Err(Rejection::Invalid {
                    field: "traffic_weight".into(),
                    reason: "must be 0..=100".into(),
                });
            }
            check_reason(reason.as_deref().unwrap_or_default())
        }
        Command::SetTaskPriority { name, .. } => check_name("task name", name),
        Command::ReportModelReadiness {
            name,
            version,
            node_id,
            reason,
            ..
        } => {
            check_name("model name", name)?;
            check_name("version", version)?;
            if *node_id == 0 {
                return Err(Rejection::Invalid {
                    field: "node_id".into(),
                    reason: "must be positive".into(),
                });
            }
            check_reason(reason)
        }
        Command::SetSetting { key, value } => {
            check_name("setting key", key)?;
            if value.len() > MAX_SETTING_BYTES {
                return Err(Rejection::Invalid {
                    field: "setting value".into(),
                    reason: format!("{} bytes, the limit is {MAX_SETTING_BYTES}", value.len()),
                });
            }
            Ok(())
        }
    }
}

impl MetadataState {
    /// The key `command` writes, as it stands: its `mod_revision` and its value as the API
    /// shows it (a setting's value, a task's priority, a model version's state). `None` when
    /// the key does not exist.
    pub fn key_current(&self, command: &Command) -> Option<(u64, String)> {
        match command {
            Command::RegisterModelVersion { name, version, .. }
            | Command::SetModelState { name, version, .. }
            | Command::ReportModelReadiness { name, version, .. } => self
                .models
                .get(name)
                .and_then(|versions| versions.get(version))
                .map(|r| (r.revisions.mod_revision, r.state.as_str().to_owned())),
            Command::SetTaskPriority { name, .. } => self
                .tasks
                .get(name)
                .map(|t| (t.revisions.mod_revision, t.priority.to_string())),
            Command::SetSetting { key, .. } => self
                .settings
                .get(key)
                .map(|s| (s.revisions.mod_revision, s.value.clone())),
        }
    }

    /// Applies the next proposal in log order; returns the state's revision after it (the next
    /// one if the proposal changed the state, the current one if not) and the outcome.
    pub fn apply_next(&mut self, proposal: &Proposal) -> (u64, Outcome) {
        let outcome = self.apply(self.revision + 1, proposal);
        (self.revision, outcome)
    }

    /// The keys alone (models, tasks, settings) at this state's revision, without the
    /// idempotency records: what a client reads, and what a past state is rebuilt from.
    pub fn keys_only(&self) -> MetadataState {
        MetadataState {
            revision: self.revision,
            models: self.models.clone(),
            tasks: self.tasks.clone(),
            settings: self.settings.clone(),
            ..MetadataState::default()
        }
    }

    /// Applies a proposal at `revision` (above the current one). Only a proposal that changes
    /// the state moves the state's revision to `revision`; every other outcome reports the
    /// current revision and leaves it.
    pub fn apply(&mut self, revision: u64, proposal: &Proposal) -> Outcome {
        if let Some(id) = &proposal.request_id {
            if let Some(first) = self.idempotency.get(id) {
                return first.clone();
            }
        }
        let outcome = self.apply_new(revision, proposal);
        if matches!(outcome, Outcome::Applied { .. }) {
            self.revision = self.revision.max(revision);
        }
        if let Some(id) = &proposal.request_id {
            self.remember(id.clone(), outcome.clone());
        }
        outcome
    }

    fn remember(&mut self, id: String, outcome: Outcome) {
        self.idempotency.insert(id.clone(), outcome);
        self.idempotency_order.push_back(id);
        while self.idempotency_order.len() > IDEMPOTENCY_WINDOW {
            if let Some(oldest) = self.idempotency_order.pop_front() {
                self.idempotency.remove(&oldest);
            }
        }
    }

    fn apply_new(&mut self, revision: u64, proposal: &Proposal) -> Outcome {
        // What a write that changes nothing reports: the revision as it stands.
        let current_revision = self.revision;
        let command = &proposal.command;
        if let Err(reason) = check_command(command) {
            return Outcome::Rejected { reason };
        }
        if let Some(expected) = proposal.expected_revision {
            let current = self.key_current(command);
            let revision = current.as_ref().map_or(0, |(revision, _)| *revision);
            if revision != expected {
                return Outcome::Conflict {
                    key: command.key(),
                    current_revision: revision,
                    current_value: current.map(|(_, value)| value),
                };
            }
        }
        match command {
            Command::RegisterModelVersion {
                name,
                version,
                digest,
                size_bytes,
                format,
                source,
                precision,
            } => {
                let versions = self.models.entry(name.clone()).or_default();
                if let Some(existing) = versions.get(version) {
                    if existing.digest == *digest
                        && existing.size_bytes == *size_bytes
                        && existing.format == *format
                        && existing.precision == *precision
                    {
                        return Outcome::Unchanged {
                            revision: current_revision,
                        };
                    }
                    return Outcome::Rejected {
                        reason: Rejection::VersionExists {
                            name: name.clone(),
                            version: version.clone(),
                            existing_digest: existing.digest.clone(),
                        },
                    };
                }
                versions.insert(
                    version.clone(),
                    ModelVersionRecord {
                        digest: digest.clone(),
                        size_bytes: *size_bytes,
                        format: format.clone(),
                        source: source.clone(),
                        precision: precision.clone(),
                        state: ModelState::Loading,
                        traffic_weight: 100,
                        revisions: KeyRevisions {
                            create_revision: revision,
                            mod_revision: revision,
                        },
                        nodes: BTreeMap::new(),
                        reason: String::new(),
                        rollout_started_unix_ms: None,
                    },
                );
                Outcome::Applied { revision }
            }
            Command::SetModelState {
                name,
                version,
                state,
                traffic_weight,
                reason,
                requested_at_unix_ms,
            } => {
                let Some(versions) = self.models.get_mut(name) else {
                    return unknown_version(name, version);
                };
                let Some(record) = versions.get(version) else {
                    return unknown_version(name, version);
                };
                let weight = traffic_weight.unwrap_or(record.traffic_weight);
                let reason = match state {
                    ModelState::Failed => reason.clone().unwrap_or_default(),
                    _ => String::new(),
                };
                // Asking for the active version again changes nothing; so does any write
                // that leaves the record as it is.
                let already = record.state == *state
                    || (*state == ModelState::Wanted && record.state == ModelState::Active);
                if already && record.traffic_weight == weight && record.reason == reason {
                    return Outcome::Unchanged {
                        revision: current_revision,
                    };
                }
                for (other, record) in versions.iter_mut() {
                    if other == version {
                        continue;
                    }
                    // One active version per model: activating a version retires the previous
                    // one. One rollout per model: a newer request supersedes an unfinished one.
                    let superseded = matches!(state, ModelState::Active | ModelState::Wanted)
                        && record.state == *state;
                    if superseded {
                        record.state = ModelState::Retired;
                        record.revisions.mod_revision = revision;
                    }
                }
                if let Some(record) = versions.get_mut(version) {
                    record.state = *state;
                    record.traffic_weight = weight;
                    record.reason = reason;
                    record.rollout_started_unix_ms = match state {
                        ModelState::Wanted => *requested_at_unix_ms,
                        ModelState::Retired => None,
                        _ => record.rollout_started_unix_ms,
                    };
                    record.revisions.mod_revision = revision;
                }
                Outcome::Applied { revision }
            }
            Command::ReportModelReadiness {
                name,
                version,
                node_id,
                state,
                reason,
            } => {
                let Some(record) = self
                    .models
                    .get_mut(name)
                    .and_then(|versions| versions.get_mut(version))
                else {
                    return unknown_version(name, version);
                };
                let same = record
                    .nodes
                    .get(node_id)
                    .is_some_and(|r| r.state == *state && r.reason == *reason);
                if same {
                    return Outcome::Unchanged {
                        revision: current_revision,
                    };
                }
                record.nodes.insert(
                    *node_id,
                    NodeReadiness {
                        state: *state,
                        reason: reason.clone(),
                        revision,
                    },
                );
                Outcome::Applied { revision }
            }
            Command::SetTaskPriority { name, priority } => {
                match self.tasks.get_mut(name) {
                    Some(task) if task.priority == *priority => {
                        return Outcome::Unchanged {
                            revision: current_revision,
                        }
                    }
                    Some(task) => {
                        task.priority = *priority;
                        task.revisions.mod_revision = revision;
                    }
                    None => {
                        self.tasks.insert(
                            name.clone(),
                            TaskRecord {
                                priority: *priority,
                                revisions: KeyRevisions {
                                    create_revision: revision,
                                    mod_revision: revision,
                                },
                            },
                        );
                    }
                }
                Outcome::Applied { revision }
            }
            Command::SetSetting { key, value } => {
                match self.settings.get_mut(key) {
                    Some(setting) if setting.value == *value => {
                        return Outcome::Unchanged {
                            revision: current_revision,
                        }
                    }
                    Some(setting) => {
                        setting.value = value.clone();
                        setting.revisions.mod_revision = revision;
                    }
                    None => {
                        self.settings.insert(
                            key.clone(),
                            SettingRecord {
                                value: value.clone(),
                                revisions: KeyRevisions {
                                    create_revision: revision,
                                    mod_revision: revision,
                                },
                            },
                        );
                    }
                }
                Outcome::Applied { revision }
            }
        }
    }

    /// Tasks in scheduling order.
    pub fn task_order(&self) -> Vec<TaskPriority> {
        crate::tasks::scheduling_order(
            self.tasks
                .iter()
                .map(|(name, task)| TaskPriority {
                    name: name.clone(),
                    priority: task.priority,
                    mod_revision: task.revisions.mod_revision,
                })
                .collect(),
        )
    }
}

fn unknown_version(name: &str, version: &str) -> Outcome {
    Outcome::Rejected {
        reason: Rejection::UnknownModelVersion {
            name: name.to_owned(),
            version: version.to_owned(),
        },
    }
}
