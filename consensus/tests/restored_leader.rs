//! A leader killed and restarted before anyone else stands comes back as leader of the same
//! term (openraft 0.9 restores it from its saved vote), with the commit point that was on
//! disk, which can lag what it acknowledged. Its linearizable reads must still see every
//! acknowledged write. The crash tier found this: a read two revisions stale.
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
        config.election_timeout_min = Duration::from_secs(3);
        config.election_timeout_max = Duration::from_secs(4);
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
    let status = nodes[l].metadata.status();
    assert_eq!(
        (status.role, status.term),
        (Role::Leader, term),
        "precondition: the node is restored as leader of its term"
    );

    let tasks = nodes[l]
        .metadata
        .read(ReadConsistency::Linearizable, |s| s.tasks.len())
        .await
        .unwrap();
    assert_eq!(tasks, 21, "a linearizable read missed acknowledged writes");
    for node in &mut nodes {
        stop_node(node).await;
    }
}
