//! Unit tests of the state machine's rules.

use super::*;

const DIGEST_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const DIGEST_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn register(version: &str, digest: &str) -> Proposal {
    Proposal::new(Command::RegisterModelVersion {
        name: "minilm".into(),
        version: version.into(),
        digest: digest.into(),
        size_bytes: 10,
        format: "safetensors".into(),
        source: None,
        precision: None,
    })
}

fn priority(name: &str, priority: i32) -> Proposal {
    Proposal::new(Command::SetTaskPriority {
        name: name.into(),
        priority,
    })
}

fn set_state(version: &str, state: ModelState) -> Proposal {
    Proposal::new(Command::SetModelState {
        name: "minilm".into(),
        version: version.into(),
        state,
        traffic_weight: None,
        reason: None,
        requested_at_unix_ms: None,
    })
}

#[test]
fn registering_the_same_bytes_again_is_a_no_op_and_other_bytes_are_refused() {
    let mut state = MetadataState::default();
    assert_eq!(
        state.apply(1, &register("1", DIGEST_A)),
        Outcome::Applied { revision: 1 }
    );
    // Nothing changes, so no revision is taken: the current one is reported.
    assert_eq!(
        state.apply(2, &register("1", DIGEST_A)),
        Outcome::Unchanged { revision: 1 }
    );
    let outcome = state.apply(3, &register("1", DIGEST_B));
    assert!(matches!(
        outcome,
        Outcome::Rejected {
            reason: Rejection::VersionExists { .. }
        }
    ));
    let record = &state.models["minilm"]["1"];
    assert_eq!(
        (
            record.revisions.create_revision,
            record.revisions.mod_revision
        ),
        (1, 1)
    );
    assert_eq!(record.state, ModelState::Loading);
    // Neither the no-op nor the refused write moved the revision.
    assert_eq!(state.revision, 1);
}

#[test]
fn a_stale_expected_revision_loses_and_names_the_current_one() {
    let mut state = MetadataState::default();
    let mut create = priority("search", 5);
    create.expected_revision = Some(0);
    assert_eq!(state.apply(4, &create), Outcome::Applied { revision: 4 });
    let mut stale = priority("search", 9);
    stale.expected_revision = Some(0);
    assert_eq!(
        state.apply(5, &stale),
        Outcome::Conflict {
            key: "tasks/search".into(),
            current_revision: 4,
            current_value: Some("5".into()),
        }
    );
    let mut fresh = priority("search", 9);
    fresh.expected_revision = Some(4);
    // The lost compare-and-set took no revision.
    assert_eq!(state.revision, 4);
    assert_eq!(state.apply(6, &fresh), Outcome::Applied { revision: 6 });
    assert_eq!(state.tasks["search"].priority, 9);
    assert_eq!(state.tasks["search"].revisions.create_revision, 4);
}

#[test]
fn a_retried_request_id_applies_once_and_returns_the_first_outcome() {
    let mut state = MetadataState::default();
    let mut first = priority("chat", 1);
    first.request_id = Some("req-1".into());
    assert_eq!(state.apply(1, &first), Outcome::Applied { revision: 1 });
    state.apply(2, &priority("chat", 7));
    // The retry arrives after another write: it must not overwrite it.
    assert_eq!(state.apply(3, &first), Outcome::Applied { revision: 1 });
    assert_eq!(state.tasks["chat"].priority, 7);
    // The replay took no revision either.
    assert_eq!(state.revision, 2);
    assert_eq!(state.tasks["chat"].revisions.mod_revision, 2);
}

#[test]
fn activating_a_version_retires_the_previously_active_one() {
    let mut state = MetadataState::default();
    state.apply(1, &register("1", DIGEST_A));
    state.apply(2, &register("2", DIGEST_B));
    state.apply(3, &set_state("1", ModelState::Active));
    state.apply(4, &set_state("2", ModelState::Active));
    assert_eq!(state.models["minilm"]["1"].state, ModelState::Retired);
    assert_eq!(state.models["minilm"]["2"].state, ModelState::Active);
    let unknown = state.apply(5, &set_state("3", ModelState::Ready));
    assert!(matches!(
        unknown,
        Outcome::Rejected {
            reason: Rejection::UnknownModelVersion { .. }
        }
    ));
}

#[test]
fn a_rollout_leaves_the_active_version_alone_until_it_completes_or_fails() {
    let mut state = MetadataState::default();
    state.apply(1, &register("1", DIGEST_A));
    state.apply(2, &register("2", DIGEST_B));
    state.apply(3, &set_state("1", ModelState::Active));
    let mut wanted = set_state("2", ModelState::Wanted);
    if let Command::SetModelState {
        requested_at_unix_ms,
        ..
    } = &mut wanted.command
    {
        *requested_at_unix_ms = Some(42);
    }
    assert_eq!(state.apply(4, &wanted), Outcome::Applied { revision: 4 });
    assert_eq!(state.models["minilm"]["1"].state, ModelState::Active);
    assert_eq!(state.models["minilm"]["2"].state, ModelState::Wanted);
    assert_eq!(
        state.models["minilm"]["2"].rollout_started_unix_ms,
        Some(42)
    );
    // Asking for the active version again is a no-op, not a second rollout.
    assert_eq!(
        state.apply(5, &set_state("1", ModelState::Wanted)),
        Outcome::Unchanged { revision: 4 }
    );
    let mut failed = set_state("2", ModelState::Failed);
    if let Command::SetModelState { reason, .. } = &mut failed.command {
        *reason = Some("node 3: out of memory".into());
    }
    state.apply(6, &failed);
    assert_eq!(state.models["minilm"]["1"].state, ModelState::Active);
    assert_eq!(state.models["minilm"]["2"].state, ModelState::Failed);
    assert_eq!(state.models["minilm"]["2"].reason, "node 3: out of memory");
    // A new rollout clears the reason; completing it retires the old version.
    state.apply(7, &set_state("2", ModelState::Wanted));
    assert_eq!(state.models["minilm"]["2"].reason, "");
    state.apply(8, &set_state("2", ModelState::Active));
    assert_eq!(state.models["minilm"]["1"].state, ModelState::Retired);
    assert_eq!(state.models["minilm"]["2"].state, ModelState::Active);
    // A newer rollout supersedes an unfinished one.
    state.apply(9, &register("3", DIGEST_A));
    state.apply(10, &set_state("1", ModelState::Wanted));
    state.apply(11, &set_state("3", ModelState::Wanted));
    assert_eq!(state.models["minilm"]["1"].state, ModelState::Retired);
    assert_eq!(state.models["minilm"]["3"].state, ModelState::Wanted);
}

#[test]
fn malformed_commands_are_rejected_without_touching_state() {
    let mut state = MetadataState::default();
    let before = state.clone();
    for proposal in [
        register("1", "not-a-digest"),
        register("with space", DIGEST_A),
        priority("", 1),
        priority("a/b", 1),
        Proposal::new(Command::SetModelState {
            name: "minilm".into(),
            version: "1".into(),
            state: ModelState::Ready,
            traffic_weight: Some(101),
            reason: None,
            requested_at_unix_ms: None,
        }),
    ] {
        assert!(
            matches!(state.apply(1, &proposal), Outcome::Rejected { .. }),
            "{proposal:?}"
        );
    }
    assert_eq!(state.models, before.models);
    assert_eq!(state.tasks, before.tasks);
}

#[test]
fn task_order_breaks_ties_by_older_write_then_name() {
    let mut state = MetadataState::default();
    state.apply(1, &priority("b", 5));
    state.apply(2, &priority("a", 5));
    state.apply(3, &priority("c", 9));
    let names: Vec<String> = state.task_order().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["c", "b", "a"]);
}

fn report(version: &str, node_id: u64, state: NodeModelState, reason: &str) -> Proposal {
    Proposal::new(Command::ReportModelReadiness {
        name: "minilm".into(),
        version: version.into(),
        node_id,
        state,
        reason: reason.into(),
    })
}

#[test]
fn readiness_reports_are_status_they_keep_the_versions_mod_revision() {
    let mut state = MetadataState::default();
    assert!(matches!(
        state.apply(1, &report("1", 1, NodeModelState::Ready, "")),
        Outcome::Rejected {
            reason: Rejection::UnknownModelVersion { .. }
        }
    ));
    state.apply(2, &register("1", DIGEST_A));
    let mut cas = set_state("1", ModelState::Active);
    cas.expected_revision = Some(2);
    assert_eq!(
        state.apply(3, &report("1", 2, NodeModelState::Loading, "")),
        Outcome::Applied { revision: 3 }
    );
    let command = report("1", 2, NodeModelState::Failed, "out of memory");
    assert_eq!(state.apply(4, &command), Outcome::Applied { revision: 4 });
    assert_eq!(
        state.apply(5, &report("1", 2, NodeModelState::Failed, "out of memory")),
        Outcome::Unchanged { revision: 4 }
    );
    let record = &state.models["minilm"]["1"];
    assert_eq!(record.revisions.mod_revision, 2);
    assert_eq!(record.nodes[&2].state, NodeModelState::Failed);
    assert_eq!(record.nodes[&2].reason, "out of memory");
    // A watcher sees the report; an operator's CAS on the version still holds.
    let changes = state.changes_at(4, &command.command);
    assert_eq!(changes.len(), 1);
    assert_eq!(state.apply(6, &cas), Outcome::Applied { revision: 6 });
    assert!(matches!(
        state.apply(7, &report("1", 0, NodeModelState::Ready, "")),
        Outcome::Rejected {
            reason: Rejection::Invalid { .. }
        }
    ));
}

fn register_with(format: &str, precision: Option<&str>) -> Command {
    Command::RegisterModelVersion {
        name: "minilm".into(),
        version: "1".into(),
        digest: DIGEST_A.into(),
        size_bytes: 10,
        format: format.into(),
        source: None,
        precision: precision.map(str::to_owned),
    }
}

#[test]
fn a_version_precision_is_fp32_or_int8_and_int8_only_for_an_encoder() {
    for precision in [None, Some("fp32"), Some("int8")] {
        assert_eq!(
            state::check_command(&register_with("safetensors", precision)),
            Ok(())
        );
    }
    assert_eq!(
        state::check_command(&register_with("gguf", Some("fp32"))),
        Ok(())
    );
    match state::check_command(&register_with("safetensors", Some("int4"))) {
        Err(Rejection::Invalid { field, reason }) => {
            assert_eq!(field, "precision");
            assert!(
                reason.contains("int4") && reason.contains("fp32, int8"),
                "{reason}"
            );
        }
        other => panic!("int4 accepted: {other:?}"),
    }
    match state::check_command(&register_with("gguf", Some("int8"))) {
        Err(Rejection::Invalid { field, reason }) => {
            assert_eq!(field, "precision");
            assert!(reason.contains("gguf"), "{reason}");
        }
        other => panic!("int8 gguf accepted: {other:?}"),
    }
}

#[test]
fn entries_from_before_precisions_still_decode_and_encode_the_same() {
    let old = r#"{"kind":"register_model_version","name":"minilm","version":"1","digest":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size_bytes":10,"format":"safetensors"}"#;
    let command: Command = serde_json::from_str(old).unwrap();
    assert_eq!(command, register_with("safetensors", None));
    assert_eq!(serde_json::to_string(&command).unwrap(), old);
    let mut state = MetadataState::default();
    state.apply(
        1,
        &Proposal::new(register_with("safetensors", Some("int8"))),
    );
    assert_eq!(
        state.models["minilm"]["1"].precision.as_deref(),
        Some("int8")
    );
}
