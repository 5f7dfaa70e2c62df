//! openraft's own storage test suite against the sled store, plus troupe's durability checks:
//! what was acknowledged survives a reopen.

#![allow(clippy::result_large_err)]

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use tempfile::TempDir;
use troupe_consensus::metadata::{Command, Outcome, Proposal, ProposalBatch};
use troupe_consensus::store::{self, LogStore, StateMachineStore};
use troupe_consensus::types::{Entry, StorageError, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = store::open(dir.path())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)
}

fn entry(index: u64, command: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(ProposalBatch(vec![Proposal::new(command)])),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_state_and_snapshots_survive_a_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let (_log, mut sm) = store::open(dir.path()).unwrap();
        let outcomes = sm
            .apply(vec![
                entry(
                    1,
                    Command::SetTaskPriority {
                        name: "search".into(),
                        priority: 5,
                    },
                ),
                entry(
                    2,
                    Command::SetSetting {
                        key: "max_batch".into(),
                        value: "32".into(),
                    },
                ),
            ])
            .await
            .unwrap();
        assert_eq!(outcomes[1], vec![Outcome::Applied { revision: 2 }]);
        use openraft::RaftSnapshotBuilder;
        let mut builder = sm.get_snapshot_builder().await;
        builder.build_snapshot().await.unwrap();
    }
    let (_log, mut sm) = store::open(dir.path()).unwrap();
    let (last_applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(last_applied.map(|l| l.index), Some(2));
    let applied = sm.applied();
    let state = applied.read().await;
    assert_eq!(state.metadata.tasks["search"].priority, 5);
    assert_eq!(state.metadata.settings["max_batch"].value, "32");
    assert_eq!(state.metadata.revision, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_vote_survives_a_reopen() {
    let dir = TempDir::new().unwrap();
    let vote = openraft::Vote::new(7, 3);
    {
        let (mut log, _sm) = store::open(dir.path()).unwrap();
        log.save_vote(&vote).await.unwrap();
    }
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
}

/// A store is closed when no handle is left and sled's file lock is free: what
/// `Metadata::shutdown` waits for, so that a node restarted in place reopens its directory.
/// Dropping sled's last handle alone is not enough: writes still running on sled's thread pool
/// hold the lock for a moment (a CI run once failed so, restarting a node in place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_reported_closed_reopens_at_once() {
    let dir = TempDir::new().unwrap();
    for round in 1..=50 {
        let (mut log, mut sm) = store::open(dir.path()).unwrap();
        assert!(
            !store::lock_is_free(dir.path()),
            "an open store holds the lock"
        );
        log.save_vote(&openraft::Vote::new(round, 1)).await.unwrap();
        // Unflushed writes, so that closing sled has work to do.
        let entries = (0..20).map(|i| {
            entry(
                round * 20 + i + 1,
                Command::SetSetting {
                    key: format!("k{i}"),
                    value: "v".repeat(4000),
                },
            )
        });
        sm.apply(entries.collect::<Vec<_>>()).await.unwrap();
        let handles = sm.open_handles();
        drop((log, sm));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while handles.strong_count() > 0 || !store::lock_is_free(dir.path()) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: never closed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // sled itself, with no waiting of troupe's: the lock must be free.
        drop(
            store::open_db(dir.path())
                .unwrap_or_else(|e| panic!("round {round}: the store reported closed is not: {e}")),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_in_an_entry_gets_its_own_revision_and_a_lost_cas_or_blank_entry_none() {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm) = store::open(dir.path()).unwrap();
    let setting = |value: &str| {
        Proposal::new(Command::SetSetting {
            key: "k".into(),
            value: value.into(),
        })
    };
    let mut stale_cas = setting("c");
    stale_cas.expected_revision = Some(1);
    let batch = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(ProposalBatch(vec![setting("a"), setting("b"), stale_cas])),
    };
    let blank = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
        payload: EntryPayload::Blank,
    };
    let outcomes = sm.apply(vec![batch, blank]).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            vec![
                Outcome::Applied { revision: 1 },
                Outcome::Applied { revision: 2 },
                Outcome::Conflict {
                    key: "settings/k".into(),
                    current_revision: 2,
                    current_value: Some("b".into()),
                },
            ],
            vec![],
        ]
    );
    let applied = sm.applied();
    let state = applied.read().await;
    // The lost compare-and-set took no revision, as in etcd.
    assert_eq!(state.metadata.revision, 2);
    assert_eq!(state.metadata.settings["k"].value, "b");
    assert_eq!(state.metadata.settings["k"].revisions.mod_revision, 2);
    assert_eq!(state.last_applied.map(|l| l.index), Some(2));
}

/// openraft 0.9 issues the purge that follows a snapshot install at the same time as the
/// install, so the purge can reach the store first. A purge point that no stored snapshot
/// covers is therefore kept in memory, not written: after a crash the store reports its log
/// purged no further than its snapshot, which openraft checks at startup with a panic (the
/// crash tier once found a node that could never start again: purged to 2204, snapshot at
/// 2154). Once a snapshot covers it, the purge point is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_past_the_stored_snapshot_reaches_disk_only_with_its_snapshot() {
    use openraft::RaftSnapshotBuilder;
    let dir = TempDir::new().unwrap();
    let at = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
    let priority = |index: u64| {
        entry(
            index,
            Command::SetTaskPriority {
                name: format!("t{index}"),
                priority: index as i32,
            },
        )
    };
    {
        let (mut log, _sm) = store::open(dir.path()).unwrap();
        log.purge(at(5)).await.unwrap();
        // Reported at once, as openraft's contract wants.
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(at(5)));
    }
    // The node "crashed" before any snapshot covered index 5.
    let (mut log, mut sm) = store::open(dir.path()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(
        state.last_purged_log_id, None,
        "a purge point no stored snapshot covers reached disk"
    );
    sm.apply((1..=5).map(priority).collect::<Vec<_>>())
        .await
        .unwrap();
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    log.purge(at(5)).await.unwrap();
    drop((log, sm));
    let (mut log, _sm) = store::open(dir.path()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(
        state.last_purged_log_id,
        Some(at(5)),
        "a covered purge point is written"
    );
}
