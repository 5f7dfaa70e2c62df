//! A leader stopped and restarted before anyone else stands must come back as a follower, not
//! as leader of its old term: openraft 0.9 would restore it from its saved vote, with its log
//! and commit point as they were on disk, which can lag what it sent and acknowledged (the
//! crash tier found a read two revisions stale, and state machines that differed). Here its
//! commit point lags on disk; its linearizable reads must still see every acknowledged write.
//!
//! Its own test binary: the lagging commit point is a process-wide failpoint.

use std::time::Duration;

use tempfile::TempDir;
use troupe_consensus::{ReadConsistency, Role};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_restarted_at_once_reads_every_acknowledged_write() {
    let dir = TempDir::new().unwrap();
    // The followers wait seconds before they stand, so the restarted leader is back first.
    let patient = |config: &mut troupe_consensus::MetadataConfig| {
        config.election_timeout_min = Duration::from_secs(1);
        config.election_timeout_max = Duration::from_millis(1500);
        config.forward_timeout = Duration::from_secs(15);
    };
    let mut nodes = three_nodes_with(&dir, patient).await;
    let leader = nodes[0]
        .metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let l = leader as usize - 1;
    let peer = nodes[l].addr.peer_addr.clone();
    propose_retrying(&nodes[l].metadata, priority("before", 0)).await;
    let term = nodes[l].metadata.status().term;

    // From here the leader's commit point is not recorded, as when it is killed before the
    // flush that would carry it.
    troupe_failpoints::configure("raft.committed.save=error").unwrap();
    for i in 1..=20 {
        propose_retrying(&nodes[l].metadata, priority(&format!("acked-{i}"), i)).await;
    }
    stop_node(&mut nodes[l]).await;
    nodes[l] = start_node_at(leader, &dir, &peer, patient).await;
    troupe_failpoints::configure("").unwrap();
    // The status reads openraft's metrics, which show the restored vote and log a moment
    // after the node starts: wait for them, not for an election.
    let restarted = &nodes[l].metadata;
    let status = troupe_cluster_wait(|| {
        let status = restarted.status();
        (status.term >= term && status.last_log_index > 0).then_some(status)
    })
    .await;
    assert!(
        status.role != Role::Leader && status.term == term,
        "the restarted node must be back as a follower of term {term}, before any election: {status:?}"
    );

    let tasks = nodes[l]
        .metadata
        .read(ReadConsistency::Linearizable, |s| s.tasks.len())
        .await
        .unwrap();
    assert_eq!(tasks, 21, "a linearizable read missed acknowledged writes");
    let status = nodes[l].metadata.status();
    assert!(status.term > term, "a new term has a leader: {status:?}");
    for node in &mut nodes {
        stop_node(node).await;
    }
}
