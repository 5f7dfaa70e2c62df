//! Regression cases from openraft's history, against troupe's sled storage under a real
//! openraft core: each drives one node with the AppendEntries and snapshot installs a leader
//! would send, in the order that once broke, and checks the node and its disk afterwards
//! (reopened, where a crash would matter).
//!
//! - #1808: a snapshot installed over a newer, uncommitted membership must replace it.
//! - #511: a purged prev-log-id is not a conflict: committed entries are never truncated.
//! - #559: a snapshot install leaves no conflicting entry behind.
//!
//! #1706 (the leader purging during a long snapshot transfer) needs a cluster: see
//! `slow_snapshot.rs`.

#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::entry::RaftEntry;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::{blank_ent, log_id};
use openraft::{Membership, RaftLogReader, RaftSnapshotBuilder, ServerState};
use tempfile::TempDir;
use troupe_consensus::store::{self, LogStore};
use troupe_consensus::types::{Entry, LogId, NodeAddr, NodeId, TypeConfig, Vote};

type Raft = openraft::Raft<TypeConfig>;

/// A network where every peer is unreachable: the tests play the leader by hand.
struct NoNetwork;

fn unreachable<E: std::error::Error>() -> RPCError<NodeId, NodeAddr, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(
        "the test plays the leader; there is no network",
    )))
}

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoNetwork;
    async fn new_client(&mut self, _target: NodeId, _node: &NodeAddr) -> NoNetwork {
        NoNetwork
    }
}

impl RaftNetwork<TypeConfig> for NoNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeAddr, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        Err(unreachable())
    }
}

/// A node that never times out or stands: it only follows what the test sends.
struct Follower {
    raft: Raft,
    log: LogStore,
    handles: std::sync::Weak<()>,
}

impl Follower {
    /// Stops the node and waits until its storage is closed, so the directory can be
    /// reopened (sled locks it while any handle, or a background deletion, holds it).
    async fn stop(self) {
        self.raft.shutdown().await.expect("shutdown");
        drop(self.raft);
        drop(self.log);
        let handles = self.handles;
        troupe_wait::expect("the storage to close", Duration::from_secs(10), || {
            std::future::ready((handles.strong_count() == 0).then_some(()))
        })
        .await;
    }
}

async fn follower(id: NodeId, dir: &Path) -> Follower {
    let (log, sm) = store::open(dir).expect("open the store");
    let handles = sm.open_handles();
    let config = openraft::Config {
        enable_tick: false,
        enable_heartbeat: false,
        enable_elect: false,
        ..Default::default()
    }
    .validate()
    .expect("config");
    let raft = Raft::new(id, Arc::new(config), NoNetwork, log.clone(), sm)
        .await
        .expect("start raft");
    Follower { raft, log, handles }
}

fn lid(term: u64, index: u64) -> LogId {
    log_id(term, 1, index)
}

fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

fn membership_entry(term: u64, index: u64, voter_ids: &[NodeId], learners: &[NodeId]) -> Entry {
    Entry::new_membership(
        lid(term, index),
        Membership::new(vec![voters(voter_ids)], voters(learners)),
    )
}

async fn append(
    raft: &Raft,
    term: u64,
    prev: Option<LogId>,
    entries: Vec<Entry>,
    commit: Option<LogId>,
) -> AppendEntriesResponse<NodeId> {
    raft.append_entries(AppendEntriesRequest {
        vote: Vote::new_committed(term, 1),
        prev_log_id: prev,
        entries,
        leader_commit: commit,
    })
    .await
    .expect("append entries")
}

/// A snapshot as a leader of `term` would send it: built by a store of its own that applied
/// blanks up to `last` with a membership entry at `membership_index`.
async fn leader_snapshot(
    term: u64,
    membership_index: u64,
    last: u64,
    voter_ids: &[NodeId],
    learners: &[NodeId],
) -> (TempDir, openraft::storage::Snapshot<TypeConfig>) {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm) = store::open(dir.path()).unwrap();
    let entries: Vec<Entry> = (1..=last)
        .map(|index| {
            if index == membership_index {
                membership_entry(term, index, voter_ids, learners)
            } else {
                blank_ent::<TypeConfig>(term, 1, index)
            }
        })
        .collect();
    sm.apply(entries).await.unwrap();
    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    (dir, snapshot)
}

/// Installs on `raft` the snapshot a leader of term 5 sends: up to (5,9), with a membership of
/// `voter_ids` and `learners` at (5,4). Returns the node's metrics once it is applied, its
/// membership checked to be the snapshot's.
async fn install_leader_snapshot(
    raft: &Raft,
    voter_ids: &[NodeId],
    learners: &[NodeId],
) -> openraft::RaftMetrics<NodeId, NodeAddr> {
    let (_leader_dir, snapshot) = leader_snapshot(5, 4, 9, voter_ids, learners).await;
    raft.install_full_snapshot(Vote::new_committed(5, 1), snapshot)
        .await
        .unwrap();
    wait_applied(raft, 9).await;
    let metrics = raft.metrics().borrow().clone();
    assert_eq!(metrics.membership_config.log_id(), &Some(lid(5, 4)));
    metrics
}

async fn wait_applied(raft: &Raft, index: u64) {
    raft.wait(Some(Duration::from_secs(10)))
        .applied_index(Some(index), "the snapshot is installed")
        .await
        .expect("applied");
}

/// openraft #1808: a node appended an uncommitted membership (4,8) that made it a voter; a
/// newer leader then sends a snapshot up to (5,9) whose membership is older by index (5,4)
/// and makes it a learner. The install purges the entry behind the newer membership, so the
/// snapshot's must win, in memory and after a reopen. Kept, the stale one would let this node
/// win elections in a configuration that no longer exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_replaces_a_newer_uncommitted_membership() {
    let dir = TempDir::new().unwrap();
    {
        let node = follower(3, dir.path()).await;
        let raft = &node.raft;
        // openraft's first log index is 0.
        let first = vec![membership_entry(1, 0, &[1, 2], &[3])];
        assert!(append(raft, 1, None, first, Some(lid(1, 0)))
            .await
            .is_success());
        let mut later: Vec<Entry> = (1..8).map(|i| blank_ent::<TypeConfig>(4, 1, i)).collect();
        later.push(membership_entry(4, 8, &[1, 2, 3], &[]));
        assert!(append(raft, 4, Some(lid(1, 0)), later, Some(lid(1, 0)))
            .await
            .is_success());
        raft.wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.membership_config.log_id() == &Some(lid(4, 8)),
                "precondition: the uncommitted membership is in effect",
            )
            .await
            .unwrap();

        let metrics = install_leader_snapshot(raft, &[1, 2], &[3]).await;
        assert_eq!(
            metrics
                .membership_config
                .membership()
                .voter_ids()
                .collect::<BTreeSet<_>>(),
            voters(&[1, 2])
        );
        assert_eq!(
            metrics.state,
            ServerState::Learner,
            "node 3 is a learner now"
        );
        node.stop().await;
    }
    // After a restart the node still holds the snapshot's membership, in the state machine
    // and as openraft rebuilds it from storage.
    let (mut log, mut sm) = store::open(dir.path()).unwrap();
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(lid(5, 9)));
    assert_eq!(membership.log_id(), &Some(lid(5, 4)));
    let state = openraft::storage::StorageHelper::new(&mut log, &mut sm)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(
        state.membership_state.effective().log_id(),
        &Some(lid(5, 4))
    );
    assert_eq!(
        state.membership_state.committed().log_id(),
        &Some(lid(5, 4))
    );
}

/// openraft #511: after a restart, a leader's AppendEntries names a prev-log-id the node has
/// purged (its recorded commit point is stale: troupe does not flush it). That is not a
/// conflict: the entries after the purge point are committed and must stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_prev_log_id_never_truncates_committed_entries() {
    let dir = TempDir::new().unwrap();
    {
        let node = follower(2, dir.path()).await;
        let raft = &node.raft;
        let mut entries = vec![membership_entry(1, 0, &[1, 2], &[])];
        entries.extend((1..=4).map(|i| blank_ent::<TypeConfig>(1, 1, i)));
        assert!(append(raft, 1, None, entries, Some(lid(1, 4)))
            .await
            .is_success());
        wait_applied(raft, 4).await;
        raft.trigger().snapshot().await.unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .snapshot(lid(1, 4), "snapshot built")
            .await
            .unwrap();
        raft.trigger().purge_log(3).await.unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .purged(Some(lid(1, 3)), "purged")
            .await
            .unwrap();
        node.stop().await;
    }
    {
        // The commit point on disk falls behind the purge point, as after a crash.
        let (mut log, _sm) = store::open(dir.path()).unwrap();
        log.save_committed(Some(lid(1, 1))).await.unwrap();
    }
    let mut node = follower(2, dir.path()).await;
    let raft = &node.raft;
    for prev in [lid(1, 2), lid(1, 3)] {
        let response = append(raft, 1, Some(prev), Vec::new(), None).await;
        assert!(
            response.is_success(),
            "prev-log-id {prev} is purged, not conflicting: {response:?}"
        );
    }
    let state = node.log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(lid(1, 4)));
    assert_eq!(
        node.log.try_get_log_entries(4..5).await.unwrap()[0].log_id,
        lid(1, 4),
        "the committed entry after the purge point is still there"
    );
    node.stop().await;
}

/// openraft #559: a node holds entries of term 1 up to 11 that conflict with a leader of term
/// 5, committed only to 2; the leader sends a snapshot up to (5,9). After the install no
/// entry of term 1 above the commit point remains, on disk or after a reopen, and the log
/// state reports the snapshot's last id right away (troupe deletes purged entries in the
/// background; the reported state must not wait for that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_install_leaves_no_conflicting_entries() {
    // The purged entries' deletion is slowed, so the log state is read while they are still
    // on disk, which is when a store that reports its last entry would report (1,2).
    troupe_failpoints::configure("raft.log.purge.delete=sleep(300)").unwrap();
    let dir = TempDir::new().unwrap();
    {
        let mut node = follower(3, dir.path()).await;
        let raft = &node.raft;
        let entries: Vec<Entry> = (0..=11)
            .map(|i| match i {
                2 => membership_entry(1, 2, &[2, 3], &[]),
                11 => membership_entry(1, 11, &[3, 4], &[]),
                _ => blank_ent::<TypeConfig>(1, 1, i),
            })
            .collect();
        assert!(append(raft, 1, None, entries, Some(lid(1, 2)))
            .await
            .is_success());

        install_leader_snapshot(raft, &[1, 2, 3], &[]).await;
        let state = node.log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(lid(5, 9)));
        assert_eq!(state.last_log_id, Some(lid(5, 9)));
        node.stop().await;
    }
    let (mut log, mut sm) = store::open(dir.path()).unwrap();
    let left = log.try_get_log_entries(3..).await.unwrap();
    assert!(
        left.iter().all(|e| e.log_id.leader_id.term == 5),
        "conflicting entries survived the install: {:?}",
        left.iter().map(|e| e.log_id).collect::<Vec<_>>()
    );
    let state = openraft::storage::StorageHelper::new(&mut log, &mut sm)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(state.committed, Some(lid(5, 9)));
    assert_eq!(
        state.membership_state.effective().log_id(),
        &Some(lid(5, 4))
    );
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(lid(5, 9))
    );
    troupe_failpoints::configure("").unwrap();
}
