//! openraft #1706: a follower installs a snapshot slowly while the leader keeps writing,
//! snapshotting and purging its log past the snapshot being sent. When the install ends the
//! follower cannot continue from the leader's log; it must be sent a newer snapshot and end
//! with the same state as everyone else.
//!
//! Its own test binary: the slow install is a process-wide failpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use troupe_consensus::{MetadataConfig, ReadConsistency};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_catches_up_when_the_log_is_purged_during_its_snapshot_install() {
    let dir = TempDir::new().unwrap();
    let compacting = |config: &mut MetadataConfig| {
        config.snapshot_every_entries = 10;
        config.keep_entries_after_snapshot = 0;
    };
    let mut nodes = three_nodes_with(&dir, compacting).await;
    let first = nodes[0]
        .metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let [first, next, late] = [first, first % 3 + 1, (first + 1) % 3 + 1].map(|id| id as usize - 1);
    let peer = |nodes: &[TestNode], i: usize| nodes[i].addr.peer_addr.clone();
    let (first_peer, late_peer) = (peer(&nodes, first), peer(&nodes, late));

    // `late` misses 60 writes; the others compact past them. Then leadership moves to `next`
    // (the first leader stops), so `late` can only catch up from a snapshot.
    stop_node(&mut nodes[late]).await;
    for i in 0..60 {
        propose_retrying(&nodes[first].metadata, priority(&format!("away-{i}"), i)).await;
    }
    {
        let next = nodes[next].metadata.clone();
        troupe_cluster_wait(|| (next.status().purged_index > 50).then_some(())).await;
    }
    stop_node(&mut nodes[first]).await;
    // The one install `late` is sent first takes 1.5 s, far past openraft's per-chunk timeout.
    troupe_failpoints::configure("raft.snapshot.installed=1*sleep(1500)").unwrap();
    nodes[late] = start_node_at(late as u64 + 1, &dir, &late_peer, compacting).await;
    let leader = nodes[next].metadata.clone();
    troupe_cluster_wait(|| (leader.status().role == troupe_consensus::Role::Leader).then_some(()))
        .await;
    nodes[first] = start_node_at(first as u64 + 1, &dir, &first_peer, compacting).await;

    // Writes go on (the leader and the first node are a quorum) while `late` installs.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (leader, writing) = (leader.clone(), writing.clone());
        tokio::spawn(async move {
            let mut written = 0;
            while writing.load(Ordering::Relaxed) {
                propose_retrying(&leader, priority(&format!("during-{written}"), written)).await;
                written += 1;
            }
            written
        })
    };
    let late_metadata = nodes[late].metadata.clone();
    let installed = troupe_cluster_wait(|| {
        let index = late_metadata.status().snapshot_index;
        (index > 0).then_some(index)
    })
    .await;
    let purged = leader.status().purged_index;
    assert!(
        purged > installed,
        "the scenario needs the leader to have purged past the installed snapshot ({installed}), but it purged to {purged}"
    );
    // Some more writes after the install, then quiet: a follower must not need new writes to
    // be sent what it lacks.
    let after = leader.status().applied_index + 5;
    troupe_cluster_wait(|| (leader.status().applied_index >= after).then_some(())).await;
    writing.store(false, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 0);

    leader
        .read(ReadConsistency::Linearizable, |_| ())
        .await
        .unwrap();
    let index = leader.status().applied_index;
    let digests = digests_at(&[&nodes[next], &nodes[late], &nodes[first]], index).await;
    assert_eq!(digests[0], digests[1], "the slow follower diverged");
    assert_eq!(digests[0], digests[2]);
    assert_eq!(
        late_metadata
            .read(ReadConsistency::Stale, |s| s.tasks.len())
            .await
            .unwrap(),
        60 + written as usize
    );
    troupe_failpoints::configure("").unwrap();
    for node in &mut nodes {
        stop_node(node).await;
    }
}
