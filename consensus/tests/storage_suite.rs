//! openraft's own storage test suite against the sled store, plus troupe's durability checks:
//! what was acknowledged survives a reopen.

#![allow(clippy::result_large_err)]

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use tempfile::TempDir;
use troupe_consensus::metadata::{Command, Outcome, Proposal};
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
        payload: EntryPayload::Normal(Proposal::new(command)),
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
        assert_eq!(outcomes[1], Outcome::Applied { revision: 2 });
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
