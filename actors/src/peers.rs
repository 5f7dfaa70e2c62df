//! The peer table: what this node's heartbeats learned about every other node (reachability,
//! RTT, load, served versions, Raft position, clock offset, sync lag). Health writes it; the
//! router, the rollout controller, pulls and `troupe cluster status` read it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
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
    /// Leader positions this node has not reached yet, with when each was first seen: the
    /// oldest gives the lag in time.
    unreached: std::sync::Mutex<std::collections::VecDeque<(u64, Instant)>>,
}

/// Leader positions remembered while behind; past it the oldest ones still give the lag.
const UNREACHED_POSITIONS: usize = 4096;

impl Default for PeerTable {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changed: watch::channel(0).0,
            own_sync_lag: AtomicU64::new(0),
            unreached: Default::default(),
        }
    }
}

impl PeerTable {
    /// Log entries this node has still to apply, as its heartbeats last saw the leader.
    pub fn own_sync_lag(&self) -> u64 {
        self.own_sync_lag.load(Ordering::Relaxed)
    }

    /// Records this node's lag: `lag` entries behind the leader's applied index as last seen,
    /// with `own_applied` applied here.
    pub fn set_own_sync_lag(&self, lag: u64, own_applied: u64) {
        self.set_own_sync_lag_at(lag, own_applied, Instant::now());
    }

    fn set_own_sync_lag_at(&self, lag: u64, own_applied: u64, now: Instant) {
        self.own_sync_lag.store(lag, Ordering::Relaxed);
        let mut unreached = self.unreached.lock().unwrap_or_else(|p| p.into_inner());
        while unreached
            .front()
            .is_some_and(|(index, _)| *index <= own_applied)
        {
            unreached.pop_front();
        }
        let target = own_applied + lag;
        let newer = unreached.back().is_none_or(|(index, _)| *index < target);
        if lag > 0 && newer && unreached.len() < UNREACHED_POSITIONS {
            unreached.push_back((target, now));
        }
    }

    /// How long this node has been behind: the age of the oldest leader position (as
    /// heartbeats saw it) it has not applied yet; zero when it has applied all of them.
    pub fn own_sync_lag_duration(&self) -> Duration {
        self.unreached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .map_or(Duration::ZERO, |(_, since)| since.elapsed())
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

    /// Counts a request until the guard drops; the guard may outlive the caller (a stream).
    pub fn enter_owned(self: &Arc<Self>) -> OwnedInFlightGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        OwnedInFlightGuard(self.clone())
    }
}

pub struct OwnedInFlightGuard(Arc<InFlight>);

impl Drop for OwnedInFlightGuard {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct InFlightGuard<'a>(&'a AtomicU64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_in_time_is_the_age_of_the_oldest_position_not_reached() {
        let table = PeerTable::default();
        let start = Instant::now() - Duration::from_secs(10);
        table.set_own_sync_lag_at(0, 100, start);
        assert_eq!(table.own_sync_lag_duration(), Duration::ZERO);
        // Behind by 5 at t=0, by 8 at t=2: still behind position 105 from t=0.
        table.set_own_sync_lag_at(5, 100, start);
        table.set_own_sync_lag_at(8, 100, start + Duration::from_secs(2));
        assert!(table.own_sync_lag_duration() >= Duration::from_secs(10));
        // Applied 106: position 105 is reached, 108 (seen at t=2) is not.
        table.set_own_sync_lag_at(2, 106, start + Duration::from_secs(3));
        let lag = table.own_sync_lag_duration();
        assert!(
            lag >= Duration::from_secs(8) && lag < Duration::from_secs(10),
            "{lag:?}"
        );
        table.set_own_sync_lag_at(0, 108, start + Duration::from_secs(4));
        assert_eq!(table.own_sync_lag_duration(), Duration::ZERO);
    }
}
