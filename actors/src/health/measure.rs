//! What heartbeats measure, as pure functions: the clock offset from an NTP-style
//! exchange, the suspect/down state machine, and sync lag against the leader.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::peers::{PeerState, PeerView};

/// The peer's clock minus ours, NTP-style: the mean of the two one-way differences
/// `((t1 - t0) + (t2 - t3)) / 2`, which cancels the network delay when it is the same both
/// ways (an asymmetric path errs by half the asymmetry).
pub fn clock_offset_micros(sent: u64, received: u64, replied: u64, returned: u64) -> i64 {
    let (t0, t1, t2, t3) = (
        i128::from(sent),
        i128::from(received),
        i128::from(replied),
        i128::from(returned),
    );
    let offset = ((t1 - t0) + (t2 - t3)) / 2;
    offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// A peer's state after `missed` heartbeats in a row went unanswered. Below `suspect_after`
/// the state does not change (an unknown peer stays unknown, an up one stays up).
pub fn state_after_miss(
    current: PeerState,
    missed: u32,
    suspect_after: u32,
    down_after: u32,
) -> PeerState {
    if missed >= down_after {
        PeerState::Down
    } else if missed >= suspect_after {
        PeerState::Suspect
    } else {
        current
    }
}

/// The applied index of the leader as this node sees it: its own when it leads, else the one
/// the leader last reported in a heartbeat. Without a known leader it has heard from, the
/// highest applied index known (its own or a peer's) stands in for it.
pub fn leader_applied_index(
    own_id: u64,
    leader: Option<u64>,
    own_applied: u64,
    peers: &BTreeMap<u64, PeerView>,
) -> u64 {
    match leader {
        Some(leader) if leader == own_id => own_applied,
        Some(leader) => match peers.get(&leader) {
            Some(view) if view.last_seen.is_some() => view.applied_index,
            _ => highest_applied(own_applied, peers),
        },
        None => highest_applied(own_applied, peers),
    }
}

fn highest_applied(own_applied: u64, peers: &BTreeMap<u64, PeerView>) -> u64 {
    peers
        .values()
        .filter(|view| view.last_seen.is_some())
        .map(|view| view.applied_index)
        .fold(own_applied, u64::max)
}

/// Sets every heard-from peer's `sync_lag`, and returns this node's own.
pub(crate) fn refresh_sync_lags(
    own_id: u64,
    leader: Option<u64>,
    own_applied: u64,
    peers: &mut BTreeMap<u64, PeerView>,
) -> u64 {
    let reference = leader_applied_index(own_id, leader, own_applied, peers);
    for view in peers.values_mut() {
        if view.last_seen.is_some() {
            view.sync_lag = reference.saturating_sub(view.applied_index);
        }
    }
    reference.saturating_sub(own_applied)
}

/// How long ago a peer last answered, if it ever did.
pub fn since_last_seen(view: &PeerView, now: Instant) -> Option<Duration> {
    view.last_seen
        .map(|seen| now.saturating_duration_since(seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_mean_of_both_one_way_differences() {
        // Peer 5 ms ahead, 1 ms each way, 0.2 ms to answer.
        let (t0, delay, ahead, work) = (1_000_000u64, 1_000u64, 5_000u64, 200u64);
        let t1 = t0 + delay + ahead;
        let t2 = t1 + work;
        let t3 = t2 - ahead + delay;
        assert_eq!(clock_offset_micros(t0, t1, t2, t3), 5_000);
        // Peer 5 ms behind.
        let t1 = t0 + delay - ahead;
        let t2 = t1 + work;
        let t3 = t2 + ahead + delay;
        assert_eq!(clock_offset_micros(t0, t1, t2, t3), -5_000);
        // Same clock: zero, whatever the delay.
        assert_eq!(clock_offset_micros(10, 110, 120, 220), 0);
        // An asymmetric path (3 ms there, 1 ms back) errs by half the asymmetry.
        assert_eq!(clock_offset_micros(0, 3_000, 3_000, 4_000), 1_000);
        // Extremes do not overflow.
        assert_eq!(clock_offset_micros(u64::MAX, 0, 0, u64::MAX), i64::MIN);
        assert_eq!(clock_offset_micros(0, u64::MAX, u64::MAX, 0), i64::MAX);
    }

    #[test]
    fn a_peer_turns_suspect_then_down_as_heartbeats_go_unanswered() {
        let (suspect, down) = (3, 10);
        let mut state = PeerState::Up;
        let mut seen = Vec::new();
        for missed in 1..=11 {
            state = state_after_miss(state, missed, suspect, down);
            seen.push(state);
        }
        let up_until = suspect as usize - 1;
        assert!(seen[..up_until].iter().all(|s| *s == PeerState::Up));
        assert!(seen[up_until..down as usize - 1]
            .iter()
            .all(|s| *s == PeerState::Suspect));
        assert!(seen[down as usize - 1..]
            .iter()
            .all(|s| *s == PeerState::Down));
        // A peer never heard from stays unknown until it is suspect.
        assert_eq!(
            state_after_miss(PeerState::Unknown, 1, suspect, down),
            PeerState::Unknown
        );
        assert_eq!(
            state_after_miss(PeerState::Unknown, 3, suspect, down),
            PeerState::Suspect
        );
        // suspect_after 1: the first miss makes it suspect.
        assert_eq!(state_after_miss(PeerState::Up, 1, 1, 2), PeerState::Suspect);
    }

    fn heard(id: u64, applied: u64) -> (u64, PeerView) {
        let mut view = PeerView::new(id, String::new(), String::new());
        view.last_seen = Some(Instant::now());
        view.applied_index = applied;
        (id, view)
    }

    #[test]
    fn sync_lag_is_measured_against_the_leader_and_never_negative() {
        let mut peers: BTreeMap<u64, PeerView> = [heard(2, 40), heard(3, 55)].into();
        peers.insert(4, PeerView::new(4, String::new(), String::new()));
        // This node (1) leads at 50: peer 2 is 10 behind, peer 3 (ahead of our last look at
        // ourselves) is not behind, peer 4 was never heard from and keeps 0.
        let own = refresh_sync_lags(1, Some(1), 50, &mut peers);
        assert_eq!(own, 0);
        let lags: Vec<u64> = peers.values().map(|v| v.sync_lag).collect();
        assert_eq!(lags, [10, 0, 0]);
        // Peer 3 leads: its last reported index is the reference, for us too.
        let own = refresh_sync_lags(1, Some(3), 50, &mut peers);
        assert_eq!((own, peers[&2].sync_lag, peers[&3].sync_lag), (5, 15, 0));
        // No leader (or one never heard from): the highest known index stands in.
        assert_eq!(leader_applied_index(1, None, 50, &peers), 55);
        assert_eq!(leader_applied_index(1, Some(4), 50, &peers), 55);
    }
}
