//! Health gossip: heartbeats every other member of the Raft membership and keeps the
//! [`PeerTable`] current. Each peer has a task of its own with its own ticker and timeout, so
//! a slow or dead peer never delays the heartbeats to the others; Health spawns the loop
//! and aborts it when it stops (which aborts the per-peer tasks with it).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use troupe_consensus::types::NodeAddr;
use troupe_consensus::Metadata;

use super::measure::{clock_offset_micros, refresh_sync_lags, state_after_miss};
use super::probe::{HeartbeatReply, PeerProbe};
use crate::config::GossipConfig;
use crate::peers::{PeerState, PeerTable, PeerView};

/// What gossip needs to know of Raft: the members to heartbeat and where this node is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftPosition {
    pub leader: Option<u64>,
    pub applied_index: u64,
    /// Every member, this node included.
    pub members: BTreeMap<u64, NodeAddr>,
}

/// Where gossip reads the Raft position from: [`Metadata`] on a node, a fake in tests.
pub trait RaftView: Send + Sync + 'static {
    fn raft_position(&self) -> RaftPosition;
}

impl RaftView for Metadata {
    fn raft_position(&self) -> RaftPosition {
        let status = self.status();
        RaftPosition {
            leader: status.leader,
            applied_index: status.applied_index,
            // A removed node has no peers left to heartbeat: the members refuse it anyway.
            members: if status.removed.is_some() {
                BTreeMap::new()
            } else {
                status.nodes
            },
        }
    }
}

/// What the gossip loop works with.
#[derive(Clone)]
pub struct GossipArgs {
    pub node_id: u64,
    pub raft: Arc<dyn RaftView>,
    pub peers: Arc<PeerTable>,
    pub probe: Arc<dyn PeerProbe>,
    pub config: GossipConfig,
}

/// Runs until aborted: every heartbeat interval it matches the per-peer tasks to the Raft
/// membership (a task for each member but this node) and refreshes the sync lags.
pub async fn run(args: GossipArgs) {
    let mut tasks = JoinSet::new();
    let mut running: HashMap<u64, (String, AbortHandle)> = HashMap::new();
    let mut tick = tokio::time::interval(args.config.heartbeat_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        let status = args.raft.raft_position();
        let members: BTreeMap<u64, NodeAddr> = status
            .members
            .into_iter()
            .filter(|(id, _)| *id != args.node_id)
            .collect();
        let unchanged = running.len() == members.len()
            && members.iter().all(|(id, addr)| {
                running
                    .get(id)
                    .is_some_and(|(peer_addr, _)| *peer_addr == addr.peer_addr)
            });
        if unchanged {
            let lag = args.peers.update(|table| {
                refresh_sync_lags(args.node_id, status.leader, status.applied_index, table)
            });
            args.peers.set_own_sync_lag(lag, status.applied_index);
            continue;
        }
        running.retain(|id, (peer_addr, task)| {
            let keep = members
                .get(id)
                .is_some_and(|addr| addr.peer_addr == *peer_addr);
            if !keep {
                task.abort();
            }
            keep
        });
        let lag = args.peers.update(|table| {
            table.retain(|id, view| {
                members
                    .get(id)
                    .is_some_and(|addr| addr.peer_addr == view.peer_addr)
            });
            for (id, addr) in &members {
                let view = table.entry(*id).or_insert_with(|| {
                    tracing::info!(peer = id, peer_addr = %addr.peer_addr, "heartbeating a new peer");
                    PeerView::new(*id, addr.api_addr.clone(), addr.peer_addr.clone())
                });
                view.api_addr.clone_from(&addr.api_addr);
            }
            refresh_sync_lags(args.node_id, status.leader, status.applied_index, table)
        });
        args.peers.set_own_sync_lag(lag, status.applied_index);
        for (id, addr) in members {
            if running.contains_key(&id) {
                continue;
            }
            let task = tasks.spawn(heartbeat_peer(args.clone(), id, addr.peer_addr.clone()));
            running.insert(id, (addr.peer_addr, task));
        }
    }
}

/// Heartbeats one peer every interval, forever.
async fn heartbeat_peer(args: GossipArgs, peer_id: u64, peer_addr: String) {
    let config = &args.config;
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let call = args
            .probe
            .heartbeat(peer_id, peer_addr.clone(), config.heartbeat_timeout);
        let outcome = match tokio::time::timeout(config.heartbeat_timeout, call).await {
            Ok(Ok(reply)) if reply.node_id != peer_id => Err(format!(
                "the node at {peer_addr} answered as node {}, not {peer_id}",
                reply.node_id
            )),
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {:?}", config.heartbeat_timeout)),
        };
        record(&args, peer_id, outcome, Instant::now());
    }
}

/// What one heartbeat changed about a peer, for logging outside the table's lock.
struct Transition {
    before: PeerState,
    after: PeerState,
    missed: u32,
}

/// Writes a heartbeat's outcome into the table and refreshes the sync lags.
fn record(args: &GossipArgs, peer_id: u64, outcome: Result<HeartbeatReply, String>, now: Instant) {
    let status = args.raft.raft_position();
    let config = &args.config;
    let error = outcome.as_ref().err().cloned();
    let (transition, own_lag) = args.peers.update(|table| {
        let transition = table.get_mut(&peer_id).map(|view| {
            let before = view.state;
            match outcome {
                Ok(reply) => apply_reply(view, reply, now),
                Err(_) => {
                    view.missed = view.missed.saturating_add(1);
                    view.state = state_after_miss(
                        view.state,
                        view.missed,
                        config.suspect_after,
                        config.down_after,
                    );
                }
            }
            Transition {
                before,
                after: view.state,
                missed: view.missed,
            }
        });
        let lag = refresh_sync_lags(args.node_id, status.leader, status.applied_index, table);
        (transition, lag)
    });
    args.peers.set_own_sync_lag(own_lag, status.applied_index);
    let Some(Transition {
        before,
        after,
        missed,
    }) = transition
    else {
        // The peer left the membership while its heartbeat was out.
        return;
    };
    let reason = error.as_deref().unwrap_or("");
    if before == after {
        if !reason.is_empty() {
            tracing::debug!(peer = peer_id, missed, %reason, "heartbeat missed");
        }
        return;
    }
    match after {
        PeerState::Suspect => {
            tracing::warn!(peer = peer_id, missed, %reason, "peer is suspect: heartbeats unanswered")
        }
        PeerState::Down => {
            tracing::warn!(peer = peer_id, missed, %reason, "peer is down: heartbeats unanswered")
        }
        PeerState::Up if before == PeerState::Unknown => {
            tracing::info!(peer = peer_id, "peer is up")
        }
        PeerState::Up => tracing::info!(peer = peer_id, was = before.as_str(), "peer recovered"),
        PeerState::Unknown => {}
    }
}

fn apply_reply(view: &mut PeerView, reply: HeartbeatReply, now: Instant) {
    view.state = PeerState::Up;
    view.missed = 0;
    view.last_seen = Some(now);
    view.rtt = Some(reply.round_trip);
    view.clock_offset_micros = clock_offset_micros(
        reply.sent_unix_micros,
        reply.received_unix_micros,
        reply.replied_unix_micros,
        reply.returned_unix_micros,
    );
    view.queue_depth = reply.queue_depth;
    view.in_flight = reply.in_flight;
    view.versions = reply.versions;
    view.raft_role = reply.raft_role;
    view.term = reply.term;
    view.leader = reply.leader;
    view.applied_index = reply.applied_index;
    view.applied_revision = reply.applied_revision;
    view.serving = reply.serving;
    view.backup = reply.backup;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Membership and position as a test sets them.
    #[derive(Default)]
    struct FakeRaft(std::sync::Mutex<RaftPosition>);

    impl RaftView for FakeRaft {
        fn raft_position(&self) -> RaftPosition {
            self.0.lock().unwrap().clone()
        }
    }

    /// How a fake peer behaves.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Answers at once.
        Quick,
        /// Never answers.
        Silent,
        /// Answers its `n`-th heartbeat (from 1) only after `delay`, the others at once.
        SlowOnce(usize, Duration),
    }

    /// Peers that behave as told, recording when each heartbeat started (paused time).
    struct FakeProbe {
        behaviour: HashMap<u64, Behaviour>,
        calls: std::sync::Mutex<HashMap<u64, Vec<tokio::time::Instant>>>,
    }

    impl FakeProbe {
        fn calls(&self, peer: u64) -> Vec<tokio::time::Instant> {
            self.calls
                .lock()
                .unwrap()
                .get(&peer)
                .cloned()
                .unwrap_or_default()
        }
    }

    impl PeerProbe for FakeProbe {
        fn heartbeat(
            &self,
            peer_id: u64,
            _peer_addr: String,
            _timeout: Duration,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<HeartbeatReply, String>> + Send>,
        > {
            let count = {
                let mut calls = self.calls.lock().unwrap();
                let calls = calls.entry(peer_id).or_default();
                calls.push(tokio::time::Instant::now());
                calls.len()
            };
            let behaviour = self.behaviour[&peer_id];
            Box::pin(async move {
                match behaviour {
                    Behaviour::Silent => std::future::pending::<()>().await,
                    Behaviour::SlowOnce(n, delay) if n == count => tokio::time::sleep(delay).await,
                    _ => {}
                }
                Ok(HeartbeatReply {
                    node_id: peer_id,
                    sent_unix_micros: 10,
                    received_unix_micros: 20,
                    replied_unix_micros: 30,
                    returned_unix_micros: 40,
                    round_trip: Duration::from_micros(30),
                    queue_depth: 0,
                    in_flight: 0,
                    versions: Vec::new(),
                    raft_role: "follower".into(),
                    term: 1,
                    leader: Some(1),
                    applied_index: 7,
                    applied_revision: 3,
                    serving: true,
                    backup: false,
                })
            })
        }
    }

    fn member(id: u64) -> (u64, NodeAddr) {
        (
            id,
            NodeAddr {
                api_addr: format!("api-{id}"),
                peer_addr: format!("peer-{id}"),
            },
        )
    }

    fn gossip_with(behaviour: &[(u64, Behaviour)]) -> (GossipArgs, Arc<FakeProbe>, Arc<FakeRaft>) {
        let raft = Arc::new(FakeRaft::default());
        *raft.0.lock().unwrap() = RaftPosition {
            leader: Some(1),
            applied_index: 9,
            members: std::iter::once(member(1))
                .chain(behaviour.iter().map(|(id, _)| member(*id)))
                .collect(),
        };
        let probe = Arc::new(FakeProbe {
            behaviour: behaviour.iter().copied().collect(),
            calls: Default::default(),
        });
        let args = GossipArgs {
            node_id: 1,
            raft: raft.clone(),
            peers: Arc::new(PeerTable::default()),
            probe: probe.clone(),
            config: GossipConfig {
                heartbeat_interval: Duration::from_millis(100),
                // Longer than the interval: a silent peer holds its own task that long.
                heartbeat_timeout: Duration::from_millis(300),
                suspect_after: 2,
                down_after: 4,
                backup: false,
            },
        };
        (args, probe, raft)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_neither_delays_the_others_nor_escapes_being_marked_down() {
        let (args, probe, _raft) = gossip_with(&[(2, Behaviour::Quick), (3, Behaviour::Silent)]);
        let peers = args.peers.clone();
        let gossip = tokio::spawn(run(args));
        tokio::time::sleep(Duration::from_millis(2_050)).await;

        // Peer 2 was heartbeaten every 100 ms throughout, whatever peer 3 did.
        let quick = probe.calls(2);
        assert!(
            (20..=21).contains(&quick.len()),
            "{} heartbeats",
            quick.len()
        );
        for pair in quick.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(100));
        }
        let two = peers.get(2).unwrap();
        assert_eq!((two.state, two.missed), (PeerState::Up, 0));
        assert_eq!(two.rtt, Some(Duration::from_micros(30)));
        assert_eq!(two.clock_offset_micros, 0);
        // Leader (this node) at 9, peer 2 at 7.
        assert_eq!((two.applied_index, two.sync_lag), (7, 2));

        // Peer 3's heartbeats each time out after 300 ms: down after 4 of them.
        let silent = probe.calls(3);
        assert!(
            (6..=7).contains(&silent.len()),
            "{} heartbeats",
            silent.len()
        );
        let three = peers.get(3).unwrap();
        assert_eq!(three.state, PeerState::Down);
        assert!(three.missed >= 4 && three.last_seen.is_none());
        gossip.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_delays_the_next_heartbeat_instead_of_bursting() {
        let slow = Duration::from_millis(250);
        let (args, probe, _raft) = gossip_with(&[(2, Behaviour::SlowOnce(3, slow))]);
        let peers = args.peers.clone();
        let gossip = tokio::spawn(run(args));
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let calls = probe.calls(2);
        let gaps: Vec<Duration> = calls.windows(2).map(|p| p[1] - p[0]).collect();
        // The third heartbeat (at 200 ms) took 250 ms, so the ticks due at 300 and 400 ms
        // were missed: one heartbeat goes as soon as it is back (450 ms), and the next ones
        // a full interval apart from there, rather than the missed ticks firing in a burst.
        assert_eq!(gaps[2], slow, "{gaps:?}");
        assert!(
            gaps.iter().all(|gap| *gap >= Duration::from_millis(100)),
            "{gaps:?}"
        );
        assert!(
            gaps[3..]
                .iter()
                .all(|gap| *gap == Duration::from_millis(100)),
            "{gaps:?}"
        );
        // A slow answer within the timeout is an answer.
        assert_eq!(peers.get(2).unwrap().state, PeerState::Up);
        gossip.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn peers_follow_the_membership() {
        let (args, probe, raft) = gossip_with(&[(2, Behaviour::Quick), (3, Behaviour::Quick)]);
        let peers = args.peers.clone();
        let gossip = tokio::spawn(run(args));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let ids: Vec<u64> = peers.snapshot().iter().map(|v| v.node_id).collect();
        assert_eq!(ids, [2, 3]);

        // Node 3 leaves: its row goes, and it is not heartbeaten any more.
        raft.0.lock().unwrap().members.remove(&3);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let ids: Vec<u64> = peers.snapshot().iter().map(|v| v.node_id).collect();
        assert_eq!(ids, [2]);
        let calls_after_leaving = probe.calls(3).len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(probe.calls(3).len(), calls_after_leaving);
        assert!(probe.calls(2).len() >= 8);
        gossip.abort();
    }
}
