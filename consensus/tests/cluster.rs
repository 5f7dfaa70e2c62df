//! Three real nodes in one process, talking Raft over gRPC on 127.0.0.1: forming the
//! cluster, writes from any node, CAS races, idempotent retries, linearizable reads and
//! leader failover with no acknowledged write lost.

use std::time::Duration;

use tempfile::TempDir;
use troupe_consensus::metadata::ChangeValue;
use troupe_consensus::metadata::{Command, Outcome, Proposal};
use troupe_consensus::{
    MetadataConfig, MetadataError, ReadConsistency, Role, WatchError, WatchEvent,
};

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_from_any_node_are_read_back_linearizably_everywhere() {
    let dir = TempDir::new().unwrap();
    let nodes = three_nodes(&dir).await;
    for (i, node) in nodes.iter().enumerate() {
        let outcome =
            propose_retrying(&node.metadata, priority(&format!("task{i}"), i as i32)).await;
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    for node in &nodes {
        let tasks = node
            .metadata
            .read(ReadConsistency::Linearizable, |state| state.tasks.len())
            .await
            .unwrap();
        assert_eq!(tasks, 3, "node {}", node.metadata.node_id());
    }
    let status = nodes[1].metadata.status();
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert!(status.leader.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_cas_writes_with_one_expected_revision_exactly_one_wins() {
    let dir = TempDir::new().unwrap();
    let nodes = three_nodes(&dir).await;
    let created = propose_retrying(&nodes[0].metadata, priority("contended", 0)).await;
    let Outcome::Applied { revision } = created else {
        panic!("{created:?}")
    };
    let mut handles = Vec::new();
    for attempt in 0..12 {
        let metadata = nodes[attempt % 3].metadata.clone();
        handles.push(tokio::spawn(async move {
            let mut proposal = priority("contended", attempt as i32 + 1);
            proposal.expected_revision = Some(revision);
            propose_retrying(&metadata, proposal).await
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for handle in handles {
        match handle.await.unwrap() {
            Outcome::Applied { revision } => winners.push(revision),
            Outcome::Conflict {
                current_revision, ..
            } => losers.push(current_revision),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners {winners:?}");
    assert!(
        losers.iter().all(|&r| r == winners[0]),
        "losers saw {losers:?}, winner wrote {}",
        winners[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_leader_loses_no_acknowledged_write_and_retries_apply_once() {
    let dir = TempDir::new().unwrap();
    let mut nodes = three_nodes(&dir).await;
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let name = format!("before-{i}");
        propose_retrying(&nodes[2].metadata, priority(&name, i)).await;
        acknowledged.push(name);
    }
    let leader = nodes[0]
        .metadata
        .wait_for_leader(Duration::from_secs(5))
        .await
        .unwrap();
    let leader_index = (leader - 1) as usize;
    // Kill the leader: stop serving its peer port and shut its Raft down.
    let dead = &mut nodes[leader_index];
    if let Some(stop) = dead.stop_server.take() {
        let _ = stop.send(());
    }
    dead.metadata.shutdown().await.unwrap();

    let survivor = nodes
        .iter()
        .find(|n| n.metadata.node_id() != leader)
        .unwrap();
    let mut retry = priority("after-failover", 99);
    retry.request_id = Some("retry-once".into());
    let first = propose_retrying(&survivor.metadata, retry.clone()).await;
    // Later writes land between the two attempts; the retry must not apply again.
    propose_retrying(&survivor.metadata, priority("after-failover", 7)).await;
    let second = propose_retrying(&survivor.metadata, retry).await;
    assert_eq!(first, second);

    let new_leader = survivor
        .metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(new_leader, leader);
    let (priority_now, missing) = survivor
        .metadata
        .read(ReadConsistency::Linearizable, |state| {
            let missing: Vec<String> = acknowledged
                .iter()
                .filter(|name| !state.tasks.contains_key(*name))
                .cloned()
                .collect();
            (state.tasks["after-failover"].priority, missing)
        })
        .await
        .unwrap();
    assert!(missing.is_empty(), "lost acknowledged writes: {missing:?}");
    assert_eq!(priority_now, 7);
    assert!(matches!(
        survivor.metadata.status().role,
        Role::Leader | Role::Follower
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_changes_go_to_the_leader_and_a_follower_says_who_leads() {
    let dir = TempDir::new().unwrap();
    let nodes = three_nodes(&dir).await;
    let leader = nodes[0]
        .metadata
        .wait_for_leader(Duration::from_secs(5))
        .await
        .unwrap();
    let follower = nodes
        .iter()
        .find(|n| n.metadata.node_id() != leader)
        .unwrap();
    follower
        .metadata
        .wait_for_leader(Duration::from_secs(5))
        .await
        .unwrap();
    let fourth = start_node(4, &dir).await;
    let error = follower
        .metadata
        .add_learner(4, fourth.addr.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(error, MetadataError::NotLeader { leader: Some(l), .. } if l == leader),
        "{error}"
    );
    let leader_node = &nodes[(leader - 1) as usize];
    leader_node
        .metadata
        .add_learner(4, fourth.addr.clone())
        .await
        .unwrap();
    propose_retrying(&leader_node.metadata, priority("seen-by-learner", 1)).await;
    let target = leader_node.metadata.status().applied_revision;
    fourth
        .metadata
        .wait_applied(target, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(fourth.metadata.status().learners, vec![4]);
    leader_node.metadata.promote(4).await.unwrap();
    assert_eq!(leader_node.metadata.status().voters, vec![1, 2, 3, 4]);
    leader_node.metadata.remove(4).await.unwrap();
    assert_eq!(leader_node.metadata.status().voters, vec![1, 2, 3]);
}

async fn next_change(watch: &mut troupe_consensus::Watch) -> troupe_consensus::metadata::Change {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a change within 10 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_sees_every_change_in_order_on_every_node() {
    let dir = TempDir::new().unwrap();
    let nodes = three_nodes(&dir).await;
    let mut watches: Vec<_> = nodes.iter().map(|n| n.metadata.watch(1).unwrap()).collect();
    for i in 0..10 {
        propose_retrying(&nodes[i % 3].metadata, priority(&format!("w{i}"), i as i32)).await;
    }
    for (node, watch) in nodes.iter().zip(&mut watches) {
        let mut last = 0;
        for i in 0..10 {
            let change = next_change(watch).await;
            assert!(
                change.revision > last,
                "node {}: revisions out of order",
                node.metadata.node_id()
            );
            last = change.revision;
            assert_eq!(change.key, format!("tasks/w{i}"));
            assert!(
                matches!(change.value, ChangeValue::Task { ref record, .. } if record.priority == i)
            );
        }
    }
    // A watch started later from an old revision replays the same sequence.
    let mut late = nodes[1].metadata.watch(1).unwrap();
    assert_eq!(next_change(&mut late).await.key, "tasks/w0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_from_a_compacted_revision_resyncs_without_caller_help() {
    let dir = TempDir::new().unwrap();
    let nodes = three_nodes_with(&dir, |config| config.watch_history = 4).await;
    for i in 0..12 {
        propose_retrying(&nodes[0].metadata, priority(&format!("c{i}"), i)).await;
    }
    let follower = &nodes[2].metadata;
    // A linearizable read waits until this node has applied every acknowledged write.
    let target = follower
        .read(ReadConsistency::Linearizable, |s| s.revision)
        .await
        .unwrap();
    match follower.watch(1) {
        Err(WatchError::Compacted {
            snapshot_revision, ..
        }) => assert!(snapshot_revision > 1),
        Ok(_) => panic!("revision 1 should be compacted with a history of 4"),
        Err(other) => panic!("{other}"),
    }
    let mut watch = follower.watch_resyncing(1);
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    let WatchEvent::Resync { state, revision } = first else {
        panic!("expected a resync first, got {first:?}")
    };
    assert_eq!(
        state.tasks.len(),
        12,
        "tasks {:?} revision {revision} target {target}",
        state.tasks.keys().collect::<Vec<_>>()
    );
    assert!(revision >= target);
    propose_retrying(&nodes[1].metadata, priority("after-resync", 1)).await;
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(next, WatchEvent::Change(ref c) if c.key == "tasks/after-resync" && c.revision > revision),
        "{next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conflicting_writers_leave_every_node_with_identical_state() {
    let dir = TempDir::new().unwrap();
    let nodes = three_nodes(&dir).await;
    let mut writers = Vec::new();
    for client in 0..8u32 {
        let metadata = nodes[client as usize % 3].metadata.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..15u32 {
                // Everybody fights over the same few tasks, settings and model versions.
                let command = match i % 3 {
                    0 => Command::SetTaskPriority {
                        name: format!("task{}", i % 4),
                        priority: (client * 100 + i) as i32,
                    },
                    1 => Command::SetSetting {
                        key: format!("setting{}", i % 2),
                        value: format!("{client}-{i}"),
                    },
                    _ => Command::RegisterModelVersion {
                        name: "minilm".into(),
                        version: format!("v{}", i % 5),
                        digest: format!("{:064x}", client),
                        size_bytes: u64::from(client),
                        format: "safetensors".into(),
                        source: None,
                        precision: None,
                    },
                };
                propose_retrying(&metadata, Proposal::new(command)).await;
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    // A linearizable read applies the leader's commit point here first.
    nodes[0]
        .metadata
        .read(ReadConsistency::Linearizable, |_| ())
        .await
        .unwrap();
    let index = nodes[0].metadata.status().applied_index;
    let digests = digests_at(&nodes.iter().collect::<Vec<_>>(), index).await;
    assert!(digests.iter().all(|d| d == &digests[0]), "{digests:?}");
    let mut orders = Vec::new();
    for node in &nodes {
        orders.push(
            node.metadata
                .read(ReadConsistency::Stale, |s| s.task_order())
                .await
                .unwrap(),
        );
    }
    assert!(orders.iter().all(|o| o == &orders[0]));
    assert_eq!(orders[0].len(), 4);
}

/// openraft's leader never purges entries a down follower still needs, so a restarted
/// follower would catch up from the log. A snapshot is needed once leadership moves to a node
/// that compacted its own log while the follower was away: that is what this test builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_that_missed_a_compaction_catches_up_by_snapshot() {
    let dir = TempDir::new().unwrap();
    let small_log = |config: &mut MetadataConfig| {
        config.snapshot_every_entries = 10;
        config.keep_entries_after_snapshot = 2;
    };
    let mut nodes = three_nodes_with(&dir, small_log).await;
    let leader = nodes[0]
        .metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let leader_index = (leader - 1) as usize;
    let away = (leader_index + 1) % 3;
    let other = (leader_index + 2) % 3;
    let away_id = nodes[away].metadata.node_id();
    let away_peer = nodes[away].addr.peer_addr.clone();
    let applied_when_stopped = nodes[away].metadata.status().applied_index;
    stop_node(&mut nodes[away]).await;

    let writer = nodes[leader_index].metadata.clone();
    for i in 0..60 {
        propose_retrying(&writer, priority(&format!("while-away-{i}"), i)).await;
    }
    // The other follower snapshots and purges its own log as it applies.
    let purged = {
        let other = nodes[other].metadata.clone();
        troupe_cluster_wait(|| {
            let status = other.status();
            (status.purged_index > applied_when_stopped + 1).then_some(status.purged_index)
        })
        .await
    };
    // Leadership moves to that follower: stop the leader, bring the stale node back.
    stop_node(&mut nodes[leader_index]).await;
    nodes[away] = start_node_at(away_id, &dir, &away_peer, small_log).await;

    let new_leader = nodes[other].metadata.clone();
    loop {
        match new_leader.read(ReadConsistency::Linearizable, |_| ()).await {
            Ok(()) => break,
            Err(error)
                if error.is_retryable() || matches!(error, MetadataError::Timeout { .. }) => {}
            Err(error) => panic!("{error}"),
        }
    }
    let index = new_leader.status().applied_index;
    let digests = digests_at(&[&nodes[away], &nodes[other]], index).await;
    assert_eq!(digests[0], digests[1]);
    let back = &nodes[away].metadata;
    assert!(
        back.status().snapshot_index >= purged,
        "the returning node must hold a snapshot covering the purged entries"
    );
    assert_eq!(
        back.read(ReadConsistency::Stale, |s| s.tasks.len())
            .await
            .unwrap(),
        60
    );
}
