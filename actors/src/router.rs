//! The router: for each request, the order in which nodes are tried. The dispatcher
//! (crate::dispatch) serves the request on the first node that takes it (this one or a peer
//! over the peer port) and moves down the list when a node answers RESOURCE_EXHAUSTED or
//! UNAVAILABLE.
//!
//! It is a shared structure rather than an actor: it runs on every request, and an actor hop
//! there would cost a mailbox round trip for nothing, since choosing is a few comparisons over
//! the peer table (kept by Health) and counters that only this structure touches.
//!
//! Every strategy puts primaries before backups, and healthy nodes before suspect ones; nodes
//! marked down never appear.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How the nodes of one group are ordered (the router makes the groups: healthy primaries,
/// suspect primaries, healthy backups, suspect backups, tried in that order).
pub trait Strategy: Send + Sync + std::fmt::Debug {
    /// Its name in `routing.strategy`.
    fn name(&self) -> &'static str;

    /// Whether it reads the cluster's members and the request's routing key: only then does
    /// the dispatcher list the one and build the other.
    fn reads_key(&self) -> bool {
        false
    }

    /// A request's turn, taken once per request whatever the number of groups.
    fn turn(&self) -> usize {
        0
    }

    /// The order of one group of a request's candidates, given sorted by node id.
    fn order_group(&self, group: &mut [&Candidate], request: &Request<'_>) -> Vec<u64>;
}

/// What a strategy reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// This node's id.
    pub local: u64,
    /// The request's turn ([`Strategy::turn`]).
    pub turn: usize,
    /// Every node of the cluster, when the strategy reads keys.
    pub members: &'a [u64],
    /// The request's routing key, when the strategy reads keys.
    pub key: &'a [u8],
}

/// The names `routing.strategy` takes.
pub const STRATEGIES: [&str; 4] = [
    "least_outstanding",
    "round_robin",
    "weighted",
    "consistent_hash",
];

/// The strategy `name` names (one of [`STRATEGIES`]); `weights` are `weighted`'s.
pub fn strategy(name: &str, weights: BTreeMap<u64, u32>) -> Option<Box<dyn Strategy>> {
    Some(match name {
        "least_outstanding" => Box::new(LeastOutstanding),
        "round_robin" => Box::<RoundRobin>::default(),
        "weighted" => Box::new(Weighted::new(weights)),
        "consistent_hash" => Box::new(ConsistentHash),
        _ => return None,
    })
}

/// Fewest requests outstanding: this node's in-flight count for itself; for a peer, its last
/// heartbeat's in-flight count plus the requests this node has forwarded to it and not yet
/// had answered. Ties go to this node (no hop), then to the lower node id.
#[derive(Debug, Default)]
pub struct LeastOutstanding;

impl Strategy for LeastOutstanding {
    fn name(&self) -> &'static str {
        "least_outstanding"
    }

    fn order_group(&self, group: &mut [&Candidate], request: &Request<'_>) -> Vec<u64> {
        group.sort_by_key(|c| (c.outstanding, c.node_id != request.local, c.node_id));
        group.iter().map(|c| c.node_id).collect()
    }
}

/// Every candidate in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicU64,
}

impl Strategy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }

    fn turn(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) as usize
    }

    fn order_group(&self, group: &mut [&Candidate], request: &Request<'_>) -> Vec<u64> {
        group.rotate_left(request.turn % group.len());
        group.iter().map(|c| c.node_id).collect()
    }
}

/// Candidates in proportion to their weight (smooth weighted round robin); a node without a
/// configured weight weighs 1, a node of weight 0 is tried only after the others.
#[derive(Debug, Default)]
pub struct Weighted {
    weights: BTreeMap<u64, u32>,
    /// The current weight of each node.
    current: Mutex<HashMap<u64, i64>>,
}

impl Weighted {
    pub fn new(weights: BTreeMap<u64, u32>) -> Self {
        Self {
            weights,
            current: Mutex::default(),
        }
    }
}

/// The request key picks a point on a hash ring of every member; the first candidate
/// clockwise serves it, and the next ones on the ring are the fallbacks.
#[derive(Debug, Default)]
pub struct ConsistentHash;

impl Strategy for ConsistentHash {
    fn name(&self) -> &'static str {
        "consistent_hash"
    }

    fn reads_key(&self) -> bool {
        true
    }

    fn order_group(&self, group: &mut [&Candidate], request: &Request<'_>) -> Vec<u64> {
        ring_order(group, request.members, request.key)
    }
}

/// A node that can serve the request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node_id: u64,
    /// Requests outstanding there, as this node knows it.
    pub outstanding: u64,
    pub backup: bool,
    /// Missed recent heartbeats (not down yet): tried after the healthy ones.
    pub suspect: bool,
}

/// Points per node on the consistent-hash ring.
const RING_POINTS_PER_NODE: u64 = 64;

/// FNV-1a: a hash every node computes the same, whatever its build or platform.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final mix (splitmix64) so neighbouring keys spread over the ring.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[derive(Debug)]
pub struct Router {
    strategy: Box<dyn Strategy>,
    /// Requests this node forwarded to each peer and has not had answered.
    forwarded: Mutex<HashMap<u64, Arc<AtomicU64>>>,
}

/// Counts a forwarded request until it is answered.
#[derive(Debug)]
pub struct ForwardGuard(Arc<AtomicU64>);

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    pub fn new(strategy: Box<dyn Strategy>) -> Self {
        Self {
            strategy,
            forwarded: Mutex::default(),
        }
    }

    pub fn strategy(&self) -> &dyn Strategy {
        self.strategy.as_ref()
    }

    /// Requests this node has outstanding at `peer`.
    pub fn forwarded_to(&self, peer: u64) -> u64 {
        self.forwarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Counts a request forwarded to `peer` until the guard drops.
    pub fn forwarding(&self, peer: u64) -> ForwardGuard {
        let counter = self
            .forwarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default()
            .clone();
        counter.fetch_add(1, Ordering::Relaxed);
        ForwardGuard(counter)
    }

    /// The order in which to try `candidates`. `local` is this node's id; `members` is every
    /// node of the cluster (the consistent-hash ring is built over all of them, so a node
    /// going down moves only its own keys); `key` is the request's routing key.
    pub fn order(
        &self,
        local: u64,
        candidates: &[Candidate],
        members: &[u64],
        key: &[u8],
    ) -> Vec<u64> {
        // Groups in the order they are tried: healthy primaries, suspect primaries, healthy
        // backups, suspect backups.
        let mut groups: [Vec<&Candidate>; 4] = Default::default();
        for candidate in candidates {
            groups[usize::from(candidate.backup) * 2 + usize::from(candidate.suspect)]
                .push(candidate);
        }
        let request = Request {
            local,
            turn: self.strategy.turn(),
            members,
            key,
        };
        let mut order = Vec::with_capacity(candidates.len());
        for group in groups.iter_mut().filter(|g| !g.is_empty()) {
            group.sort_by_key(|c| c.node_id);
            order.extend(self.strategy.order_group(group, &request));
        }
        order
    }
}

impl Strategy for Weighted {
    fn name(&self) -> &'static str {
        "weighted"
    }

    /// Smooth weighted round robin (as nginx does it): every candidate gains its weight, the
    /// highest is chosen and pays back the total. Over any window the picks are in proportion
    /// to the weights, interleaved rather than in runs. The rest follow by current weight.
    fn order_group(&self, group: &mut [&Candidate], _request: &Request<'_>) -> Vec<u64> {
        let weight = |id: u64| i64::from(self.weights.get(&id).copied().unwrap_or(1));
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let total: i64 = group.iter().map(|c| weight(c.node_id)).sum();
        for candidate in group.iter() {
            *current.entry(candidate.node_id).or_default() += weight(candidate.node_id);
        }
        let mut ranked: Vec<(i64, u64)> = group
            .iter()
            .map(|c| {
                let score = if weight(c.node_id) == 0 {
                    i64::MIN
                } else {
                    current[&c.node_id]
                };
                (score, c.node_id)
            })
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        if let Some(&(score, chosen)) = ranked.first() {
            if score != i64::MIN {
                *current.entry(chosen).or_default() -= total;
            }
        }
        ranked.into_iter().map(|(_, id)| id).collect()
    }
}

/// Candidates in ring order from the key's point: the owner first, then the next distinct
/// nodes clockwise. Ring points belong to every member, so keys stay where they are when
/// other nodes come and go.
fn ring_order(group: &[&Candidate], members: &[u64], key: &[u8]) -> Vec<u64> {
    let mut ring: Vec<(u64, u64)> = members
        .iter()
        .chain(group.iter().map(|c| &c.node_id))
        .flat_map(|&node| {
            (0..RING_POINTS_PER_NODE)
                .map(move |point| (stable_hash(format!("{node}/{point}").as_bytes()), node))
        })
        .collect();
    ring.sort_unstable();
    ring.dedup();
    let start = ring.partition_point(|(point, _)| *point < stable_hash(key));
    let mut order = Vec::with_capacity(group.len());
    for (_, node) in ring[start..].iter().chain(&ring[..start]) {
        if !order.contains(node) && group.iter().any(|c| c.node_id == *node) {
            order.push(*node);
            if order.len() == group.len() {
                break;
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(node_id: u64, outstanding: u64) -> Candidate {
        Candidate {
            node_id,
            outstanding,
            backup: false,
            suspect: false,
        }
    }

    fn first_counts(router: &Router, candidates: &[Candidate], n: usize) -> BTreeMap<u64, usize> {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            let order = router.order(1, candidates, &[1, 2, 3], format!("k{i}").as_bytes());
            *counts.entry(order[0]).or_default() += 1;
        }
        counts
    }

    #[test]
    fn least_outstanding_prefers_the_idle_node_then_this_one() {
        let router = Router::new(Box::new(LeastOutstanding));
        let busy_here = [candidate(1, 5), candidate(2, 0), candidate(3, 2)];
        assert_eq!(router.order(1, &busy_here, &[1, 2, 3], b""), vec![2, 3, 1]);
        let idle = [candidate(1, 0), candidate(2, 0), candidate(3, 0)];
        assert_eq!(router.order(1, &idle, &[1, 2, 3], b""), vec![1, 2, 3]);
    }

    #[test]
    fn round_robin_takes_turns() {
        let router = Router::new(Box::<RoundRobin>::default());
        let all = [candidate(1, 0), candidate(2, 0), candidate(3, 0)];
        let counts = first_counts(&router, &all, 300);
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn weighted_follows_the_weights() {
        let weights = [(1, 3), (2, 1), (3, 0)].into();
        let router = Router::new(Box::new(Weighted::new(weights)));
        let all = [candidate(1, 0), candidate(2, 0), candidate(3, 0)];
        let counts = first_counts(&router, &all, 400);
        assert_eq!(counts.get(&1), Some(&300));
        assert_eq!(counts.get(&2), Some(&100));
        assert_eq!(counts.get(&3), None);
        // Weight 0 is still a fallback.
        assert_eq!(*router.order(1, &all, &[1, 2, 3], b"").last().unwrap(), 3);
    }

    #[test]
    fn consistent_hash_pins_keys_and_falls_back_along_the_ring() {
        let router = Router::new(Box::new(ConsistentHash));
        let all = [candidate(1, 0), candidate(2, 0), candidate(3, 0)];
        let mut owners = BTreeMap::new();
        for i in 0..300 {
            let key = format!("user-{i}");
            let order = router.order(1, &all, &[1, 2, 3], key.as_bytes());
            assert_eq!(order, router.order(2, &all, &[1, 2, 3], key.as_bytes()));
            assert_eq!(order.len(), 3);
            *owners.entry(order[0]).or_insert(0) += 1;
            // Without the owner, the key moves to the next node on the ring, and only it.
            let rest: Vec<Candidate> = all
                .iter()
                .filter(|c| c.node_id != order[0])
                .cloned()
                .collect();
            assert_eq!(
                router.order(1, &rest, &[1, 2, 3], key.as_bytes()),
                order[1..]
            );
        }
        // Every node owns a fair share (64 points each).
        assert!(owners.values().all(|&n| n > 50), "{owners:?}");
    }

    #[test]
    fn round_robin_takes_turns_among_primaries_when_there_is_a_backup() {
        let router = Router::new(Box::<RoundRobin>::default());
        let mut backup = candidate(3, 0);
        backup.backup = true;
        let nodes = [candidate(1, 0), candidate(2, 0), backup];
        let counts = first_counts(&router, &nodes, 100);
        assert_eq!(counts, [(1, 50), (2, 50)].into());
    }

    #[test]
    fn backups_and_suspects_come_last() {
        let router = Router::new(Box::new(LeastOutstanding));
        let mut backup = candidate(1, 0);
        backup.backup = true;
        let mut suspect = candidate(2, 0);
        suspect.suspect = true;
        let nodes = [backup, suspect, candidate(3, 9)];
        assert_eq!(router.order(1, &nodes, &[1, 2, 3], b""), vec![3, 2, 1]);
    }

    #[test]
    fn forwarded_requests_are_counted_until_answered() {
        let router = Router::new(Box::new(LeastOutstanding));
        let first = router.forwarding(2);
        let second = router.forwarding(2);
        assert_eq!(router.forwarded_to(2), 2);
        drop(first);
        drop(second);
        assert_eq!(router.forwarded_to(2), 0);
    }
}
