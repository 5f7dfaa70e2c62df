//! A leader reports its own appends stored before its flush ends, so openraft replicates them
//! while they are flushed (docs/consensus.md, "Replicating while persisting"). openraft then
//! counts the leader's copy before it is on disk; nothing may become visible until it is.
//! On one node the leader's disk is the whole quorum: while its flush is held up, openraft
//! has the entry committed, and still nothing is applied, read or acknowledged.
//!
//! Its own test binary: the slow flush is a process-wide failpoint.

use std::collections::BTreeMap;
use std::time::Duration;

use tempfile::TempDir;
use troupe_consensus::metadata::Outcome;
use troupe_consensus::ReadConsistency;

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_is_applied_only_once_the_leaders_flush_covers_it() {
    let dir = TempDir::new().unwrap();
    let node = start_node(1, &dir).await;
    let metadata = node.metadata.clone();
    metadata
        .initialize(BTreeMap::from([(1, node.addr.clone())]))
        .await
        .unwrap();
    metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    propose_retrying(&metadata, priority("before", 1)).await;
    let before = metadata.status();

    // The next flush of the log takes 1.5 s: the write below is in the log (in memory) and
    // committed by openraft long before it is on disk.
    troupe_failpoints::configure("raft.log.flush=1*sleep(1500)").unwrap();
    let write = tokio::spawn({
        let metadata = metadata.clone();
        async move { metadata.propose(priority("held", 2)).await }
    });
    let committed = troupe_cluster_wait(|| {
        let status = metadata.status();
        (status.last_log_index > before.last_log_index
            && status.committed_index >= Some(status.last_log_index))
        .then_some(status)
    })
    .await;
    // openraft counts the entry committed; the flush has not ended, so it is not applied,
    // not readable, and its writer has no answer.
    assert!(
        committed.applied_index < committed.last_log_index,
        "applied before the flush ended: {committed:?}"
    );
    let seen = metadata
        .read(ReadConsistency::Stale, |s| s.tasks.contains_key("held"))
        .await
        .unwrap();
    assert!(!seen, "a read saw a write that is not on disk yet");
    assert!(
        !write.is_finished(),
        "the write was acknowledged before its flush ended"
    );

    let outcome = write.await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    troupe_failpoints::configure("").unwrap();
    let after = metadata.status();
    assert!(after.applied_index >= committed.last_log_index, "{after:?}");
    assert!(metadata
        .read(ReadConsistency::Linearizable, |s| s
            .tasks
            .contains_key("held"))
        .await
        .unwrap());
    let mut node = node;
    stop_node(&mut node).await;
}
