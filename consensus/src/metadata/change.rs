//! What a watcher sees: one [`Change`] per key a write modified, in revision order.

use serde::{Deserialize, Serialize};

use super::command::Command;
use super::state::{MetadataState, ModelVersionRecord, SettingRecord, TaskRecord};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ChangeValue {
    ModelVersion {
        name: String,
        version: String,
        /// Boxed: a model record is several times the size of the other values.
        record: Box<ModelVersionRecord>,
    },
    Task {
        name: String,
        record: TaskRecord,
    },
    Setting {
        key: String,
        record: SettingRecord,
    },
}

/// A key's new value, written at `revision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub revision: u64,
    pub key: String,
    pub value: ChangeValue,
}

impl MetadataState {
    /// The keys `command` modified at `revision` (empty if it changed nothing). Activating a
    /// version also retires the previous one, so a model command may change several keys.
    pub fn changes_at(&self, revision: u64, command: &Command) -> Vec<Change> {
        match command {
            Command::RegisterModelVersion { name, .. } | Command::SetModelState { name, .. } => {
                self.models
                    .get(name)
                    .into_iter()
                    .flat_map(|versions| versions.iter())
                    .filter(|(_, record)| record.revisions.mod_revision == revision)
                    .map(|(version, record)| Change {
                        revision,
                        key: format!("models/{name}/{version}"),
                        value: ChangeValue::ModelVersion {
                            name: name.clone(),
                            version: version.clone(),
                            record: Box::new(record.clone()),
                        },
                    })
                    .collect()
            }
            // Status reports leave mod_revision alone; the report itself carries the revision.
            Command::ReportModelReadiness {
                name,
                version,
                node_id,
                ..
            } => self
                .models
                .get(name)
                .and_then(|versions| versions.get(version))
                .filter(|record| {
                    record
                        .nodes
                        .get(node_id)
                        .is_some_and(|r| r.revision == revision)
                })
                .map(|record| Change {
                    revision,
                    key: command.key(),
                    value: ChangeValue::ModelVersion {
                        name: name.clone(),
                        version: version.clone(),
                        record: Box::new(record.clone()),
                    },
                })
                .into_iter()
                .collect(),
            Command::SetTaskPriority { name, .. } => self
                .tasks
                .get(name)
                .filter(|task| task.revisions.mod_revision == revision)
                .map(|record| Change {
                    revision,
                    key: command.key(),
                    value: ChangeValue::Task {
                        name: name.clone(),
                        record: record.clone(),
                    },
                })
                .into_iter()
                .collect(),
            Command::SetSetting { key, .. } => self
                .settings
                .get(key)
                .filter(|setting| setting.revisions.mod_revision == revision)
                .map(|record| Change {
                    revision,
                    key: command.key(),
                    value: ChangeValue::Setting {
                        key: key.clone(),
                        record: record.clone(),
                    },
                })
                .into_iter()
                .collect(),
        }
    }
}

impl MetadataState {
    /// Writes `change`'s value under its key and moves the revision to it: replaying the
    /// changes after a state, in order, gives the state at each later revision.
    pub fn put_change(&mut self, change: &Change) {
        match &change.value {
            ChangeValue::ModelVersion {
                name,
                version,
                record,
            } => {
                self.models
                    .entry(name.clone())
                    .or_default()
                    .insert(version.clone(), (**record).clone());
            }
            ChangeValue::Task { name, record } => {
                self.tasks.insert(name.clone(), record.clone());
            }
            ChangeValue::Setting { key, record } => {
                self.settings.insert(key.clone(), record.clone());
            }
        }
        self.revision = self.revision.max(change.revision);
    }
}
