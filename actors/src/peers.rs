//! The peer table: what this node's heartbeats learned about every other node (reachability,
//! RTT, load, served versions, Raft position, clock offset, sync lag). Health writes it; the
//! router, the rollout controller, pulls and `troupe cluster status` read it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::table::ModelKey;

/// Whether a peer answers its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerState {
    /// Not heard from yet (just started, or just joined).
    Unknown,
    /// Answered its last heartbeat.
    Up,
    /// Missed at least `suspect_after` heartbeats in a row.
    Suspect,
    /// Missed at least `down_after` heartbeats in a row: routers skip it, rollouts do not
    /// wait for it.
    Down,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Unknown => "unknown",
            PeerState::Up => "up",
            PeerState::Suspect => "suspect",
            PeerState::Down => "down",
        }
    }
}

/// A version a peer serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedVersion {
    pub key: ModelKey,
    /// Unversioned requests for the model go to this version there.
    pub default_for_model: bool,
}

/// One peer as the last heartbeats saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub node_id: u64,
    pub api_addr: String,
    pub peer_addr: String,
    pub state: PeerState,
    /// Heartbeats missed in a row.
    pub missed: u32,
    pub last_seen: Option<Instant>,
    /// Round trip of the last answered heartbeat.
    pub rtt: Option<Duration>,
    /// The peer's clock minus ours, from the midpoint of the last heartbeat (NTP-style).
    pub clock_offset_micros: i64,
    pub queue_depth: u64,
    pub in_flight: u64,
    pub versions: Vec<ServedVersion>,
    pub raft_role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub applied_index: u64,
    pub applied_revision: u64,
    /// Log entries the peer has still to apply: the leader's applied index (the best view of
    /// its commit index this node has) minus the peer's.
    pub sync_lag: u64,
    /// SERVING on grpc.health.v1.
    pub serving: bool,
    /// Configured as a backup node.
    pub backup: bool,
}

impl PeerView {
    pub fn new(node_id: u64, api_addr: String, peer_addr: String) -> Self {
        Self {
            node_id,
            api_addr,
            peer_addr,
            state: PeerState::Unknown,
            missed: 0,
            last_seen: None,
            rtt: None,
            clock_offset_micros: 0,
            queue_depth: 0,
            in_flight: 0,
            versions: Vec::new(),
            raft_role: String::new(),
            term: 0,
            leader: None,
            applied_index: 0,
            applied_revision: 0,
            sync_lag: 0,
            serving: false,
            backup: false,
        }
    }

    /// Whether the peer serves `model` (unversioned, when `version` is empty) right now.
    pub fn serves(&self, model: &str, version: &str) -> bool {
        self.versions.iter().any(|served| {
            served.key.name == model
                && if version.is_empty() {
                    served.default_for_model
                } else {
                    served.key.version == version
                }
        })
    }
}

/// Every peer by node id, with a change notifier.
#[derive(Debug)]
pub struct PeerTable {
    inner: RwLock<BTreeMap<u64, PeerView>>,
    changed: watch::Sender<u64>,
    /// This node's own sync lag, measured the same way as the peers'.
    own_sync_lag: AtomicU64,
}

impl Default for PeerTable {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changed: watch::channel(0).0,
            own_sync_lag: AtomicU64::new(0),
        }
    }
}

impl PeerTable {
    /// Log entries this node has still to apply, as its heartbeats last saw the leader.
    pub fn own_sync_lag(&self) -> u64 {
        self.own_sync_lag.load(Ordering::Relaxed)
    }

    pub fn set_own_sync_lag(&self, lag: u64) {
        self.own_sync_lag.store(lag, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<PeerView> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, node_id: u64) -> Option<PeerView> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node_id)
            .cloned()
    }

    pub fn state(&self, node_id: u64) -> PeerState {
        self.get(node_id).map_or(PeerState::Unknown, |p| p.state)
    }

    /// Changes the table and tells subscribers.
    pub fn update<R>(&self, change: impl FnOnce(&mut BTreeMap<u64, PeerView>) -> R) -> R {
        let result = change(&mut self.inner.write().unwrap_or_else(|p| p.into_inner()));
        self.changed.send_modify(|n| *n += 1);
        result
    }

    /// Fires whenever the table changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Requests this node is serving now, counted by the inference handlers (local and
/// forwarded-in alike) and reported in heartbeats.
#[derive(Debug, Default)]
pub struct InFlight(AtomicU64);

impl InFlight {
    /// Counts a request until the guard drops.
    pub fn enter(&self) -> InFlightGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(&self.0)
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub struct InFlightGuard<'a>(&'a AtomicU64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
