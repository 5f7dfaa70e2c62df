//! Crash durability: nodes killed over and over while the clients write, at random moments
//! (SIGKILL) and at failpoints inside the Raft storage (an abort just before or after a log
//! flush, a vote save, a truncation, a purge, a snapshot write or install). After each crash
//! the dead node's data dir is read as it lies on disk, and compared with what it held after
//! its previous crash: what a node made durable must never go backwards.
//!
//! The cluster-wide half of "no acknowledged write lost" is the runner's usual checks
//! (linearizability, every acknowledged write in every node's watch stream).

use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use serde::Serialize;

/// Where a crash can happen: "kill" is a SIGKILL at whatever moment the step comes; the rest
/// are failpoints set to abort once.
pub const POINTS: [&str; 11] = [
    "kill",
    "raft.log.append",
    "raft.log.flush",
    "raft.log.flushed",
    "raft.meta.write",
    "raft.meta.written",
    "raft.log.truncate",
    "raft.log.purge",
    "raft.snapshot.write",
    "raft.snapshot.written",
    "raft.snapshot.installed",
];

/// The Raft state a stopped node holds on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiskState {
    /// (term, the node voted for, committed).
    pub vote: Option<(u64, u64, bool)>,
    pub last_log: Option<u64>,
    pub purged: Option<u64>,
    pub committed: Option<u64>,
    pub snapshot: Option<u64>,
}

/// Reads the Raft state under `data_dir/raft` of a node that is not running (sled locks the
/// directory while a node has it open).
pub async fn read_disk(data_dir: &Path) -> Result<DiskState, String> {
    let raft_dir = data_dir.join("raft");
    if !raft_dir.is_dir() {
        return Err(format!("{} holds no Raft state", raft_dir.display()));
    }
    let (mut log, mut sm) = troupe_consensus::store::open(&raft_dir)
        .map_err(|e| format!("opening {}: {e}", raft_dir.display()))?;
    let fail =
        |what: &str, e: &dyn std::fmt::Display| format!("{}: {what}: {e}", raft_dir.display());
    let vote = log.saved_vote().await.map_err(|e| fail("vote", &e))?;
    let state = log
        .get_log_state()
        .await
        .map_err(|e| fail("log state", &e))?;
    let committed = log
        .read_committed()
        .await
        .map_err(|e| fail("committed", &e))?;
    let snapshot = sm
        .get_current_snapshot()
        .await
        .map_err(|e| fail("snapshot", &e))?;
    Ok(DiskState {
        vote: vote.map(|v| {
            (
                v.leader_id.term,
                v.leader_id.voted_for().unwrap_or(0),
                v.committed,
            )
        }),
        last_log: state.last_log_id.map(|l| l.index),
        purged: state.last_purged_log_id.map(|l| l.index),
        committed: committed.map(|l| l.index),
        snapshot: snapshot.and_then(|s| s.meta.last_log_id).map(|l| l.index),
    })
}

/// What went backwards between two crashes of one node. Durable state only moves forward:
/// the restarted node began from `before` and every write since was flushed before it was
/// acknowledged. The log's end may move back (uncommitted entries truncated), but never
/// below what was committed.
pub fn regressions(node: usize, before: &DiskState, after: &DiskState) -> Vec<String> {
    let mut found = Vec::new();
    let mut back = |what: &str, b: &dyn std::fmt::Debug, a: &dyn std::fmt::Debug| {
        found.push(format!(
            "node {node}: {what} went back on disk: {b:?} -> {a:?}"
        ));
    };
    if let (Some((bt, bn, bc)), Some((at, an, ac))) = (before.vote, after.vote) {
        if at < bt {
            back("the term", &bt, &at);
        } else if at == bt && (an != bn || (bc && !ac)) {
            back("the vote within a term", &before.vote, &after.vote);
        }
    } else if before.vote.is_some() {
        back("the vote", &before.vote, &after.vote);
    }
    for (what, b, a) in [
        ("the purge point", before.purged, after.purged),
        ("the commit point", before.committed, after.committed),
        ("the snapshot", before.snapshot, after.snapshot),
    ] {
        if a < b {
            back(what, &b, &a);
        }
    }
    if after.last_log < before.committed {
        back(
            "the log below the commit point",
            &before.committed,
            &after.last_log,
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_state_that_goes_back_is_caught() {
        let before = DiskState {
            vote: Some((3, 2, true)),
            last_log: Some(40),
            purged: Some(20),
            committed: Some(38),
            snapshot: Some(30),
        };
        let later = DiskState {
            vote: Some((4, 1, false)),
            last_log: Some(39),
            ..before
        };
        assert!(
            regressions(1, &before, &later).is_empty(),
            "a new term and a truncated uncommitted tail are fine"
        );
        for (after, says) in [
            (
                DiskState {
                    vote: Some((2, 2, true)),
                    ..before
                },
                "term",
            ),
            (
                DiskState {
                    vote: Some((3, 1, true)),
                    ..before
                },
                "vote within a term",
            ),
            (
                DiskState {
                    vote: Some((3, 2, false)),
                    ..before
                },
                "vote within a term",
            ),
            (
                DiskState {
                    vote: None,
                    ..before
                },
                "the vote",
            ),
            (
                DiskState {
                    purged: Some(10),
                    ..before
                },
                "purge point",
            ),
            (
                DiskState {
                    committed: Some(30),
                    ..before
                },
                "commit point",
            ),
            (
                DiskState {
                    snapshot: None,
                    ..before
                },
                "snapshot",
            ),
            (
                DiskState {
                    last_log: Some(37),
                    ..before
                },
                "below the commit point",
            ),
        ] {
            let found = regressions(1, &before, &after);
            assert!(found.iter().any(|f| f.contains(says)), "{says}: {found:?}");
        }
    }

    #[tokio::test]
    async fn a_dir_without_raft_state_is_named() {
        let dir = tempfile::TempDir::new().unwrap();
        let error = read_disk(dir.path()).await.unwrap_err();
        assert!(error.contains("holds no Raft state"), "{error}");
    }
}
