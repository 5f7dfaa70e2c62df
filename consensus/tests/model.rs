//! Model test: random command sequences applied through the sled state machine, with a
//! snapshot built and installed into a fresh store at random points, must give exactly the
//! outcomes and the final state of a small reference model written independently here.
//! Writes are packed into log entries of random size (as the proposer batches them), with
//! blank entries in between: a revision counts changes, not writes or entries (a rejected
//! write, a lost compare-and-set, a no-op and a replay take none).

use std::collections::BTreeMap;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftSnapshotBuilder};
use proptest::prelude::*;
use troupe_consensus::metadata::{Command, ModelState, Outcome, Proposal, ProposalBatch};
use troupe_consensus::store::{self, StateMachineStore};
use troupe_consensus::types::Entry;

/// One step of a generated history.
#[derive(Debug, Clone)]
enum Step {
    Write {
        command: Command,
        expected_revision: Option<u64>,
        request_id: Option<u8>,
    },
    /// Closes the current log entry (a blank entry if no write is pending).
    EndEntry,
    SnapshotAndRestore,
}

fn digest(i: u8) -> String {
    format!("{:064x}", i)
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (0..3u8, -3..3i32).prop_map(|(n, p)| Command::SetTaskPriority {
            name: format!("t{n}"),
            priority: p
        }),
        (0..2u8, 0..3u8).prop_map(|(k, v)| Command::SetSetting {
            key: format!("s{k}"),
            value: format!("v{v}")
        }),
        (0..3u8, 0..2u8).prop_map(|(v, d)| Command::RegisterModelVersion {
            name: "m".into(),
            version: format!("{v}"),
            digest: digest(d),
            size_bytes: u64::from(d),
            format: "safetensors".into(),
            source: None,
            precision: None,
        }),
        (0..3u8, 0..6u8).prop_map(|(v, s)| Command::SetModelState {
            name: "m".into(),
            version: format!("{v}"),
            state: [
                ModelState::Loading,
                ModelState::Ready,
                ModelState::Active,
                ModelState::Retired,
                ModelState::Wanted,
                ModelState::Failed
            ][s as usize],
            traffic_weight: None,
            reason: (s == 5).then(|| "node 2: load failed".to_owned()),
            requested_at_unix_ms: (s == 4).then_some(1_000),
        }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (command(), proptest::option::of(0..12u64), proptest::option::of(0..4u8)).prop_map(
            |(command, expected_revision, request_id)| Step::Write { command, expected_revision, request_id }
        ),
        3 => Just(Step::EndEntry),
        1 => Just(Step::SnapshotAndRestore),
    ]
}

/// The reference: plain maps of (value, create_revision, mod_revision), rules restated.
#[derive(Default, Debug, PartialEq)]
struct Reference {
    tasks: BTreeMap<String, (i32, u64, u64)>,
    settings: BTreeMap<String, (String, u64, u64)>,
    /// version -> (digest, state, create, mod)
    versions: BTreeMap<String, (String, ModelState, u64, u64)>,
    seen: BTreeMap<u8, Outcome>,
}

impl Reference {
    fn current(&self, command: &Command) -> u64 {
        match command {
            Command::SetTaskPriority { name, .. } => self.tasks.get(name).map_or(0, |t| t.2),
            Command::SetSetting { key, .. } => self.settings.get(key).map_or(0, |s| s.2),
            Command::RegisterModelVersion { version, .. }
            | Command::SetModelState { version, .. }
            | Command::ReportModelReadiness { version, .. } => {
                self.versions.get(version).map_or(0, |v| v.3)
            }
        }
    }

    /// The key's value as a lost CAS reports it.
    fn current_value(&self, command: &Command) -> Option<String> {
        match command {
            Command::SetTaskPriority { name, .. } => self.tasks.get(name).map(|t| t.0.to_string()),
            Command::SetSetting { key, .. } => self.settings.get(key).map(|s| s.0.clone()),
            Command::RegisterModelVersion { version, .. }
            | Command::SetModelState { version, .. }
            | Command::ReportModelReadiness { version, .. } => {
                self.versions.get(version).map(|v| v.1.as_str().to_owned())
            }
        }
    }

    fn apply(
        &mut self,
        rev: u64,
        command: &Command,
        expected: Option<u64>,
        id: Option<u8>,
    ) -> Outcome {
        if let Some(first) = id.and_then(|id| self.seen.get(&id)) {
            return first.clone();
        }
        let outcome = self.apply_new(rev, command, expected);
        if let Some(id) = id {
            self.seen.insert(id, outcome.clone());
        }
        outcome
    }

    /// `rev` is the revision a change takes, one past the current one; anything that changes
    /// nothing reports the current one, `rev - 1`.
    fn apply_new(&mut self, rev: u64, command: &Command, expected: Option<u64>) -> Outcome {
        if let Some(expected) = expected {
            let current = self.current(command);
            if current != expected {
                return Outcome::Conflict {
                    key: command.key(),
                    current_revision: current,
                    current_value: self.current_value(command),
                };
            }
        }
        match command {
            Command::SetTaskPriority { name, priority } => match self.tasks.get_mut(name) {
                Some(t) if t.0 == *priority => Outcome::Unchanged { revision: rev - 1 },
                Some(t) => {
                    t.0 = *priority;
                    t.2 = rev;
                    Outcome::Applied { revision: rev }
                }
                None => {
                    self.tasks.insert(name.clone(), (*priority, rev, rev));
                    Outcome::Applied { revision: rev }
                }
            },
            Command::SetSetting { key, value } => match self.settings.get_mut(key) {
                Some(s) if s.0 == *value => Outcome::Unchanged { revision: rev - 1 },
                Some(s) => {
                    s.0 = value.clone();
                    s.2 = rev;
                    Outcome::Applied { revision: rev }
                }
                None => {
                    self.settings.insert(key.clone(), (value.clone(), rev, rev));
                    Outcome::Applied { revision: rev }
                }
            },
            Command::RegisterModelVersion {
                version, digest, ..
            } => match self.versions.get(version) {
                Some(v) if v.0 == *digest => Outcome::Unchanged { revision: rev - 1 },
                Some(_) => Outcome::Rejected {
                    reason: rejected_exists(version, &self.versions[version].0),
                },
                None => {
                    self.versions.insert(
                        version.clone(),
                        (digest.clone(), ModelState::Loading, rev, rev),
                    );
                    Outcome::Applied { revision: rev }
                }
            },
            Command::SetModelState { version, state, .. } => {
                let Some(current) = self.versions.get(version).map(|v| v.1) else {
                    return Outcome::Rejected {
                        reason: troupe_consensus::metadata::Rejection::UnknownModelVersion {
                            name: "m".into(),
                            version: version.clone(),
                        },
                    };
                };
                if current == *state
                    || (*state == ModelState::Wanted && current == ModelState::Active)
                {
                    return Outcome::Unchanged { revision: rev - 1 };
                }
                // One active version and one rollout per model.
                if matches!(state, ModelState::Active | ModelState::Wanted) {
                    for (other, v) in self.versions.iter_mut() {
                        if other != version && v.1 == *state {
                            v.1 = ModelState::Retired;
                            v.3 = rev;
                        }
                    }
                }
                let v = self.versions.get_mut(version).expect("checked above");
                v.1 = *state;
                v.3 = rev;
                Outcome::Applied { revision: rev }
            }
            Command::ReportModelReadiness { .. } => {
                unreachable!("the generated commands include no readiness reports")
            }
        }
    }
}

fn rejected_exists(version: &str, digest: &str) -> troupe_consensus::metadata::Rejection {
    troupe_consensus::metadata::Rejection::VersionExists {
        name: "m".into(),
        version: version.into(),
        existing_digest: digest.into(),
    }
}

fn entry(index: u64, proposals: Vec<Proposal>) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: if proposals.is_empty() {
            EntryPayload::Blank
        } else {
            EntryPayload::Normal(ProposalBatch(proposals))
        },
    }
}

/// Writes waiting to go into the next log entry, with the outcomes the reference gave them.
#[derive(Default)]
struct Pending {
    proposals: Vec<Proposal>,
    expected: Vec<Outcome>,
}

async fn end_entry(
    machine: &mut StateMachineStore,
    index: &mut u64,
    pending: &mut Pending,
) -> Result<(), TestCaseError> {
    *index += 1;
    let pending = std::mem::take(pending);
    let mut got = machine
        .apply(vec![entry(*index, pending.proposals)])
        .await
        .unwrap();
    prop_assert_eq!(got.len(), 1);
    prop_assert_eq!(got.remove(0), pending.expected, "entry at index {}", *index);
    Ok(())
}

async fn run(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut dirs = vec![tempfile::tempdir().unwrap()];
    let (_, mut machine): (_, StateMachineStore) = store::open(dirs[0].path()).unwrap();
    let mut reference = Reference::default();
    let mut index = 0;
    let mut revision = 0;
    let mut pending = Pending::default();
    for step in steps {
        match step {
            Step::Write {
                command,
                expected_revision,
                request_id,
            } => {
                pending.proposals.push(Proposal {
                    command: command.clone(),
                    expected_revision,
                    request_id: request_id.map(|id| format!("req-{id}")),
                });
                let outcome =
                    reference.apply(revision + 1, &command, expected_revision, request_id);
                // Only a change takes a revision (a replay of one reports its first).
                if outcome
                    == (Outcome::Applied {
                        revision: revision + 1,
                    })
                {
                    revision += 1;
                }
                pending.expected.push(outcome);
            }
            Step::EndEntry => end_entry(&mut machine, &mut index, &mut pending).await?,
            Step::SnapshotAndRestore => {
                if !pending.proposals.is_empty() {
                    end_entry(&mut machine, &mut index, &mut pending).await?;
                }
                let mut builder = machine.get_snapshot_builder().await;
                let snapshot = builder.build_snapshot().await.unwrap();
                dirs.push(tempfile::tempdir().unwrap());
                let (_, mut fresh) = store::open(dirs.last().unwrap().path()).unwrap();
                fresh
                    .install_snapshot(&snapshot.meta, snapshot.snapshot)
                    .await
                    .unwrap();
                machine = fresh;
            }
        }
    }
    if !pending.proposals.is_empty() {
        end_entry(&mut machine, &mut index, &mut pending).await?;
    }
    let applied = machine.applied();
    let state = applied.read().await;
    let tasks: BTreeMap<String, (i32, u64, u64)> = state
        .metadata
        .tasks
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                (
                    t.priority,
                    t.revisions.create_revision,
                    t.revisions.mod_revision,
                ),
            )
        })
        .collect();
    let settings: BTreeMap<String, (String, u64, u64)> = state
        .metadata
        .settings
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                (
                    s.value.clone(),
                    s.revisions.create_revision,
                    s.revisions.mod_revision,
                ),
            )
        })
        .collect();
    let versions: BTreeMap<String, (String, ModelState, u64, u64)> = state
        .metadata
        .models
        .get("m")
        .map(|versions| {
            versions
                .iter()
                .map(|(v, r)| {
                    (
                        v.clone(),
                        (
                            r.digest.clone(),
                            r.state,
                            r.revisions.create_revision,
                            r.revisions.mod_revision,
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    prop_assert_eq!(tasks, reference.tasks.clone());
    prop_assert_eq!(settings, reference.settings.clone());
    prop_assert_eq!(versions, reference.versions.clone());
    prop_assert_eq!(state.metadata.revision, revision);
    prop_assert_eq!(
        state.last_applied.map(|l| l.index),
        (index > 0).then_some(index)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn the_state_machine_matches_the_reference_model(steps in proptest::collection::vec(step(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(run(steps))?;
    }
}
