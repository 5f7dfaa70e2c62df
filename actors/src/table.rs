//! The serving table: what this node knows about models and tasks (copied from Raft by
//! MetadataSync) and which versions it has loaded. Request handlers read it to pick a
//! batcher and a lane without a round trip through any actor.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use tokio::sync::watch;
use troupe_consensus::metadata::{Change, ChangeValue, ModelState, ModelVersionRecord, TaskRecord};

use crate::batcher::BatcherHandle;
use crate::error::ServeError;

/// A model version, `name@version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelKey {
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Where a version is on this node.
#[derive(Debug, Clone)]
pub enum LocalState {
    Loading,
    Ready(BatcherHandle),
    Failed(String),
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub struct Route {
    pub batcher: BatcherHandle,
    pub version: String,
    pub lane: usize,
    /// The metadata revision the table was at.
    pub revision: u64,
}

/// Task priorities ranked onto lanes: the highest distinct priority takes lane 0. The
/// default task (none named) has priority 0.
#[derive(Debug, Clone, Default)]
pub struct TaskLanes {
    lanes: HashMap<String, usize>,
    default_lane: usize,
}

impl TaskLanes {
    pub fn new(tasks: &BTreeMap<String, TaskRecord>, lane_count: usize) -> Self {
        let lane_count = lane_count.max(1);
        let mut priorities: Vec<i32> = tasks.values().map(|t| t.priority).collect();
        priorities.push(0);
        priorities.sort_unstable_by(|a, b| b.cmp(a));
        priorities.dedup();
        let distinct = priorities.len();
        let lane_of = |priority: i32| {
            let rank = priorities.iter().position(|&p| p == priority).unwrap_or(0);
            if distinct <= lane_count {
                rank
            } else {
                rank * lane_count / distinct
            }
        };
        Self {
            lanes: tasks
                .iter()
                .map(|(name, task)| (name.clone(), lane_of(task.priority)))
                .collect(),
            default_lane: lane_of(0),
        }
    }

    pub fn lane(&self, task: &str) -> Result<usize, ServeError> {
        if task.is_empty() {
            return Ok(self.default_lane);
        }
        self.lanes
            .get(task)
            .copied()
            .ok_or_else(|| ServeError::UnknownTask {
                task: task.to_owned(),
            })
    }
}

#[derive(Debug, Default)]
struct Inner {
    revision: u64,
    models: BTreeMap<String, BTreeMap<String, ModelVersionRecord>>,
    /// The task priorities, and the lanes they rank onto.
    task_records: BTreeMap<String, TaskRecord>,
    tasks: TaskLanes,
    local: HashMap<ModelKey, LocalState>,
    /// Per model, the version requests without a version get: the active one once it is
    /// ready here, until then the one that served before.
    serving: HashMap<String, String>,
}

#[derive(Debug)]
pub struct ServingTable {
    inner: RwLock<Inner>,
    changed: watch::Sender<u64>,
}

impl Default for ServingTable {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl ServingTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Fires whenever the table changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// Replaces the metadata view, as of `revision` (MetadataSync, at its start and when its
    /// watch resyncs). Task priorities are ranked onto `lanes` lanes.
    pub fn set_metadata(
        &self,
        revision: u64,
        models: BTreeMap<String, BTreeMap<String, ModelVersionRecord>>,
        tasks: BTreeMap<String, TaskRecord>,
        lanes: usize,
    ) {
        {
            let mut inner = self.write();
            inner.revision = revision;
            inner.models = models;
            inner.tasks = TaskLanes::new(&tasks, lanes);
            inner.task_records = tasks;
            refresh_serving(&mut inner);
        }
        self.bump();
    }

    /// Applies the changes of one revision, as the metadata watch delivered them
    /// (MetadataSync), all under one lock: a model version's or a task's new record. A setting
    /// only advances the revision.
    pub fn apply(&self, changes: Vec<Change>, lanes: usize) {
        {
            let mut inner = self.write();
            let mut tasks_changed = false;
            for change in changes {
                inner.revision = inner.revision.max(change.revision);
                match change.value {
                    ChangeValue::ModelVersion {
                        name,
                        version,
                        record,
                    } => {
                        inner
                            .models
                            .entry(name)
                            .or_default()
                            .insert(version, *record);
                    }
                    ChangeValue::Task { name, record } => {
                        inner.task_records.insert(name, record);
                        tasks_changed = true;
                    }
                    ChangeValue::Setting { .. } => {}
                }
            }
            if tasks_changed {
                inner.tasks = TaskLanes::new(&inner.task_records, lanes);
            }
            refresh_serving(&mut inner);
        }
        self.bump();
    }

    pub fn set_local(&self, key: ModelKey, state: LocalState) {
        {
            let mut inner = self.write();
            inner.local.insert(key, state);
            refresh_serving(&mut inner);
        }
        self.bump();
    }

    pub fn remove_local(&self, key: &ModelKey) -> Option<LocalState> {
        let removed = {
            let mut inner = self.write();
            let removed = inner.local.remove(key);
            refresh_serving(&mut inner);
            removed
        };
        self.bump();
        removed
    }

    /// Forgets versions that were loading (their loader reported to a MetadataSync that has
    /// since been restarted), so they are loaded again.
    pub fn clear_loading(&self) {
        {
            let mut inner = self.write();
            inner
                .local
                .retain(|_, state| !matches!(state, LocalState::Loading));
        }
        self.bump();
    }

    pub fn local(&self, key: &ModelKey) -> Option<LocalState> {
        self.read().local.get(key).cloned()
    }

    pub fn local_keys(&self) -> Vec<ModelKey> {
        self.read().local.keys().cloned().collect()
    }

    /// Versions this node must have loaded: the active ones and the ones being rolled out
    /// (wanted), which load and warm up beside the active version until the rollout
    /// completes.
    pub fn wanted(&self) -> Vec<(ModelKey, ModelVersionRecord)> {
        let inner = self.read();
        versions_in(&inner.models, &[ModelState::Active, ModelState::Wanted])
            .map(|(key, record)| (key, record.clone()))
            .collect()
    }

    /// Every registered version with its record.
    pub fn versions(&self) -> Vec<(ModelKey, ModelVersionRecord)> {
        let inner = self.read();
        inner
            .models
            .iter()
            .flat_map(|(name, versions)| {
                versions.iter().map(move |(version, record)| {
                    (
                        ModelKey {
                            name: name.clone(),
                            version: version.clone(),
                        },
                        record.clone(),
                    )
                })
            })
            .collect()
    }

    /// Whether `model` is registered (any version): only those name metric series.
    pub fn knows_model(&self, model: &str) -> bool {
        self.read().models.contains_key(model)
    }

    /// Whether `task` has a priority set.
    pub fn knows_task(&self, task: &str) -> bool {
        self.read().tasks.lanes.contains_key(task)
    }

    /// The version each model's unversioned requests go to.
    pub fn serving_version(&self, model: &str) -> Option<String> {
        self.read().serving.get(model).cloned()
    }

    /// Picks the batcher and lane for a request, or says why it cannot be served here.
    pub fn route(&self, model: &str, version: &str, task: &str) -> Result<Route, ServeError> {
        let inner = self.read();
        let lane = inner.tasks.lane(task)?;
        let Some(versions) = inner.models.get(model) else {
            return Err(ServeError::UnknownModel {
                model: model.to_owned(),
            });
        };
        let version = if version.is_empty() {
            inner
                .serving
                .get(model)
                .cloned()
                .or_else(|| {
                    versions
                        .iter()
                        .find(|(_, r)| r.state == ModelState::Active)
                        .map(|(v, _)| v.clone())
                })
                .ok_or_else(|| {
                    match versions.iter().find(|(_, r)| r.state == ModelState::Wanted) {
                        Some((wanted, _)) => ServeError::RollingOut {
                            model: model.to_owned(),
                            version: wanted.clone(),
                        },
                        None => ServeError::NoActiveVersion {
                            model: model.to_owned(),
                        },
                    }
                })?
        } else {
            version.to_owned()
        };
        let Some(record) = versions.get(&version) else {
            return Err(ServeError::UnknownVersion {
                model: model.to_owned(),
                version,
            });
        };
        let key = ModelKey {
            name: model.to_owned(),
            version: version.clone(),
        };
        match inner.local.get(&key) {
            Some(LocalState::Ready(batcher)) => Ok(Route {
                batcher: batcher.clone(),
                version,
                lane,
                revision: inner.revision,
            }),
            Some(LocalState::Loading) => Err(ServeError::Loading {
                model: model.to_owned(),
                version,
            }),
            Some(LocalState::Failed(reason)) => Err(ServeError::LoadFailed {
                model: model.to_owned(),
                version,
                reason: reason.clone(),
            }),
            None if matches!(record.state, ModelState::Active | ModelState::Wanted) => {
                Err(ServeError::Loading {
                    model: model.to_owned(),
                    version,
                })
            }
            None => Err(ServeError::VersionNotServed {
                model: model.to_owned(),
                version,
                state: record.state.as_str().to_owned(),
            }),
        }
    }

    /// Why the node cannot serve everything it should, empty when it can.
    pub fn unready_reasons(&self) -> Vec<String> {
        let inner = self.read();
        versions_in(&inner.models, &[ModelState::Active])
            .filter_map(|(key, _)| match inner.local.get(&key) {
                Some(LocalState::Ready(_)) => None,
                Some(LocalState::Failed(reason)) => Some(format!("{key} failed to load: {reason}")),
                _ => Some(format!("{key} is not loaded yet")),
            })
            .collect()
    }
}

fn versions_in<'a>(
    models: &'a BTreeMap<String, BTreeMap<String, ModelVersionRecord>>,
    states: &'a [ModelState],
) -> impl Iterator<Item = (ModelKey, &'a ModelVersionRecord)> {
    models.iter().flat_map(move |(name, versions)| {
        versions
            .iter()
            .filter(move |(_, record)| states.contains(&record.state))
            .map(move |(version, record)| {
                (
                    ModelKey {
                        name: name.clone(),
                        version: version.clone(),
                    },
                    record,
                )
            })
    })
}

/// The active version serves once it is ready here; until then the version that served
/// before keeps serving, if it is still loaded.
fn refresh_serving(inner: &mut Inner) {
    let ready = |inner: &Inner, name: &str, version: &str| {
        matches!(
            inner.local.get(&ModelKey {
                name: name.to_owned(),
                version: version.to_owned()
            }),
            Some(LocalState::Ready(_))
        )
    };
    let mut serving = HashMap::new();
    for (name, versions) in &inner.models {
        let active = versions
            .iter()
            .find(|(_, r)| r.state == ModelState::Active)
            .map(|(v, _)| v.clone());
        let choice = match active {
            None => None,
            Some(active) if ready(inner, name, &active) => Some(active),
            Some(_) => inner
                .serving
                .get(name)
                .filter(|previous| ready(inner, name, previous))
                .cloned(),
        };
        if let Some(version) = choice {
            serving.insert(name.clone(), version);
        }
    }
    inner.serving = serving;
}

/// A version's record as the tests of this crate want one: `state`, last modified at
/// `mod_revision`, no node reports.
#[cfg(test)]
pub(crate) fn version_record(state: ModelState, mod_revision: u64) -> ModelVersionRecord {
    ModelVersionRecord {
        digest: "a".repeat(64),
        size_bytes: 1,
        format: "safetensors".into(),
        source: None,
        precision: None,
        state,
        traffic_weight: 100,
        revisions: troupe_consensus::metadata::KeyRevisions {
            create_revision: 1,
            mod_revision,
        },
        nodes: BTreeMap::new(),
        reason: String::new(),
        rollout_started_unix_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use troupe_consensus::metadata::KeyRevisions;

    fn task(priority: i32) -> TaskRecord {
        TaskRecord {
            priority,
            revisions: KeyRevisions {
                create_revision: 1,
                mod_revision: 1,
            },
        }
    }

    #[test]
    fn priorities_rank_onto_lanes_highest_first() {
        let tasks: BTreeMap<String, TaskRecord> = [
            ("search".to_owned(), task(10)),
            ("index".to_owned(), task(-5)),
            ("chat".to_owned(), task(10)),
        ]
        .into();
        let lanes = TaskLanes::new(&tasks, 4);
        assert_eq!(lanes.lane("search").unwrap(), 0);
        assert_eq!(lanes.lane("chat").unwrap(), 0);
        assert_eq!(lanes.lane("").unwrap(), 1);
        assert_eq!(lanes.lane("index").unwrap(), 2);
        assert!(matches!(
            lanes.lane("nope"),
            Err(ServeError::UnknownTask { .. })
        ));
        // More distinct priorities than lanes: spread, order kept.
        let many: BTreeMap<String, TaskRecord> =
            (0..8).map(|p| (format!("t{p}"), task(p))).collect();
        let lanes = TaskLanes::new(&many, 2);
        assert_eq!(lanes.lane("t7").unwrap(), 0);
        assert_eq!(lanes.lane("t0").unwrap(), 1);
    }

    #[test]
    fn watched_changes_apply_from_their_own_payload() {
        let table = ServingTable::default();
        table.set_metadata(3, BTreeMap::new(), BTreeMap::new(), 4);
        let mut changed = table.subscribe();
        changed.mark_unchanged();
        // A new version, wanted: the model is known, and rolling out.
        table.apply(
            vec![Change {
                revision: 4,
                key: "models/m/v1".into(),
                value: ChangeValue::ModelVersion {
                    name: "m".into(),
                    version: "v1".into(),
                    record: Box::new(version_record(ModelState::Wanted, 4)),
                },
            }],
            4,
        );
        assert!(changed.has_changed().unwrap());
        assert_eq!(table.revision(), 4);
        assert!(table.knows_model("m"));
        assert!(matches!(
            table.route("m", "", ""),
            Err(ServeError::RollingOut { .. })
        ));
        // A task's priority: its lane follows.
        table.apply(
            vec![Change {
                revision: 5,
                key: "tasks/search".into(),
                value: ChangeValue::Task {
                    name: "search".into(),
                    record: task(10),
                },
            }],
            4,
        );
        assert!(table.knows_task("search"));
        assert_eq!(table.read().tasks.lane("search").unwrap(), 0);
        assert_eq!(table.read().tasks.lane("").unwrap(), 1);
        // A setting only moves the revision.
        table.apply(
            vec![Change {
                revision: 6,
                key: "settings/app".into(),
                value: ChangeValue::Setting {
                    key: "app".into(),
                    record: troupe_consensus::metadata::SettingRecord {
                        value: "1".into(),
                        revisions: KeyRevisions {
                            create_revision: 6,
                            mod_revision: 6,
                        },
                    },
                },
            }],
            4,
        );
        assert_eq!(table.revision(), 6);
        // The version's next record (active) replaces the first.
        table.apply(
            vec![Change {
                revision: 7,
                key: "models/m/v1".into(),
                value: ChangeValue::ModelVersion {
                    name: "m".into(),
                    version: "v1".into(),
                    record: Box::new(version_record(ModelState::Active, 7)),
                },
            }],
            4,
        );
        assert_eq!(table.wanted().len(), 1);
        assert!(matches!(
            table.route("m", "", ""),
            Err(ServeError::Loading { .. })
        ));
    }
}
