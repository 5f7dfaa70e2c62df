//! A linearizability checker for one register: Wing & Gong's search with Lowe's memoisation,
//! as Porcupine runs it (iteratively, over a linked list of call and return events).
//!
//! Clients record each operation's invocation and completion times and its outcome. An
//! operation whose outcome is unknown (a timeout, a crash) may have taken effect at any point
//! after its invocation, or never: its completion is taken to be +infinity. The checker looks
//! for one total order that respects real time and the register's semantics; keys are
//! independent, so check each key alone.

use std::collections::HashMap;

/// What a client asked and what it was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write {
        value: u64,
    },
    /// The value read; `None` for an absent key.
    Read {
        value: Option<u64>,
    },
    /// Compare-and-set: `succeeded` tells whether the client saw success.
    Cas {
        expected: Option<u64>,
        new: u64,
        succeeded: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub op: Op,
    pub invoked: u64,
    /// `None`: the outcome is unknown (the client timed out or crashed).
    pub completed: Option<u64>,
}

/// Applies `op` to `state`; `None` if the recorded outcome is impossible in that state.
fn step(state: Option<u64>, op: &Op, known: bool) -> Option<Option<u64>> {
    match op {
        Op::Write { value } => Some(Some(*value)),
        Op::Read { value } => (!known || *value == state).then_some(state),
        Op::Cas {
            expected,
            new,
            succeeded,
        } => {
            let matches = state == *expected;
            if !known {
                // Unknown outcome: it took effect only if the comparison held.
                return Some(if matches { Some(*new) } else { state });
            }
            match (succeeded, matches) {
                (true, true) => Some(Some(*new)),
                (false, false) => Some(state),
                _ => None,
            }
        }
    }
}

/// Why a history is not shown linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Operations placed in the longest order found that respects real time and the register.
    pub placed: usize,
    /// The completed operation that no such order could place next (index into the history).
    pub stuck_at: usize,
    /// True when the search gave up after [`SEARCH_BUDGET`] steps without deciding: the
    /// history may be linearizable.
    pub undecided: bool,
}

/// Search steps before the checker gives up and says it could not decide.
pub const SEARCH_BUDGET: u64 = 200_000_000;

/// True when `history` (starting from an absent key) is linearizable.
pub fn is_linearizable(history: &[Event]) -> bool {
    check(history).is_ok()
}

/// A set of operation indexes, compact enough to memoise thousands of states.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    fn is_subset_of(&self, other: &Bits) -> bool {
        self.0.iter().zip(&other.0).all(|(a, b)| a & !b == 0)
    }
}

/// The search states already explored (and failed), for Lowe's memoisation. Operations with
/// an unknown outcome are kept apart: a state that has placed a superset of the unknown
/// operations of a failed state (with the same known ones and the same value) fails too, since
/// an unknown operation can always be placed last, where nothing observes it.
#[derive(Default)]
struct Explored(HashMap<(Bits, Option<u64>), Vec<Bits>>);

impl Explored {
    /// False when this state (or one that dominates it) was explored already.
    fn insert(&mut self, known: &Bits, unknown: &Bits, value: Option<u64>) -> bool {
        let seen = self.0.entry((known.clone(), value)).or_default();
        if seen.iter().any(|s| s.is_subset_of(unknown)) {
            return false;
        }
        seen.retain(|s| !unknown.is_subset_of(s));
        seen.push(unknown.clone());
        true
    }
}

/// Checks `history` (starting from an absent key); on failure, says how far it got.
pub fn check(history: &[Event]) -> Result<(), Violation> {
    let n = history.len();
    if n == 0 {
        return Ok(());
    }
    // Events: 2i is operation i's call, 2i + 1 its return. Sorted by time; a call before a
    // return at the same instant (the two then overlap, the lenient reading).
    let mut order: Vec<usize> = (0..2 * n).collect();
    let time = |e: usize| {
        let event = &history[e / 2];
        if e.is_multiple_of(2) {
            (event.invoked, 0u8)
        } else {
            (event.completed.unwrap_or(u64::MAX), 1u8)
        }
    };
    order.sort_by_key(|&e| (time(e), e));
    // A doubly linked list over `order` positions; NIL ends it.
    const NIL: usize = usize::MAX;
    let mut next: Vec<usize> = (1..=2 * n)
        .map(|i| if i == 2 * n { NIL } else { i })
        .collect();
    let mut prev: Vec<usize> = (0..2 * n).map(|i| i.wrapping_sub(1)).collect();
    prev[0] = NIL;
    let mut position = vec![0usize; 2 * n];
    for (pos, &e) in order.iter().enumerate() {
        position[e] = pos;
    }
    let mut head = 0usize;
    let (ops, free) = canonical(history);

    let unlink = |pos: usize, head: &mut usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, q) = (prev[pos], next[pos]);
        if p == NIL {
            *head = q;
        } else {
            next[p] = q;
        }
        if q != NIL {
            prev[q] = p;
        }
    };
    let relink = |pos: usize, head: &mut usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, q) = (prev[pos], next[pos]);
        if p == NIL {
            *head = pos;
        } else {
            next[p] = pos;
        }
        if q != NIL {
            prev[q] = pos;
        }
    };

    let mut state: Option<u64> = None;
    let mut placed = Bits::new(n);
    let mut placed_unknown = Bits::new(n);
    let mut explored = Explored::default();
    let mut steps = 0u64;
    // (call position, state before it) of each placed operation, in placement order.
    // (call position, state before it, `passed_free` before it) of each placed operation.
    let mut stack: Vec<(usize, Option<u64>, bool)> = Vec::new();
    // Whether this walk down the list passed a free operation without placing it: every later
    // free one is then skipped, being interchangeable with it.
    let mut passed_free = false;
    let mut best = (0usize, 0usize);
    let mut cursor = head;
    while head != NIL {
        steps += 1;
        if steps > SEARCH_BUDGET {
            return Err(Violation {
                placed: best.0,
                stuck_at: best.1,
                undecided: true,
            });
        }
        if cursor == NIL {
            // Unreachable: the list always ends with returns.
            break;
        }
        let event = order[cursor];
        let op = event / 2;
        if event.is_multiple_of(2) {
            if free[op] && passed_free {
                cursor = next[cursor];
                continue;
            }
            let known = history[op].completed.is_some();
            if let Some(after) = step(state, &ops[op], known) {
                let (mut with, mut with_unknown) = (placed.clone(), placed_unknown.clone());
                if known {
                    with.set(op);
                } else {
                    with_unknown.set(op);
                }
                if explored.insert(&with, &with_unknown, after) {
                    stack.push((cursor, state, passed_free));
                    passed_free = false;
                    placed = with;
                    placed_unknown = with_unknown;
                    state = after;
                    let ret = position[2 * op + 1];
                    unlink(cursor, &mut head, &mut next, &mut prev);
                    unlink(ret, &mut head, &mut next, &mut prev);
                    cursor = head;
                    continue;
                }
            }
            passed_free |= free[op];
            cursor = next[cursor];
        } else if history[op].completed.is_none() {
            // Only the returns of unknown operations (at +infinity) are left: every completed
            // operation is placed, and the unknown ones still here never took effect.
            return Ok(());
        } else {
            // An operation returned before any order could place it: undo the last placement
            // and try the next candidate after it.
            if stack.len() >= best.0 {
                best = (stack.len(), op);
            }
            let Some((call, before, passed_before)) = stack.pop() else {
                return Err(Violation {
                    placed: best.0,
                    stuck_at: best.1,
                    undecided: false,
                });
            };
            let undone = order[call] / 2;
            relink(position[2 * undone + 1], &mut head, &mut next, &mut prev);
            relink(call, &mut head, &mut next, &mut prev);
            placed.clear(undone);
            placed_unknown.clear(undone);
            state = before;
            passed_free = passed_before || free[undone];
            cursor = next[call];
        }
    }
    debug_assert_eq!(placed.count() + placed_unknown.count(), n);
    Ok(())
}

/// The operations as the search sees them, and which are "free".
///
/// A value that no completed read returned and no compare-and-set expects is unobservable: an
/// operation with an unknown outcome that writes one (a timed-out write, say) can only make the
/// register hold something nobody sees. All such values become one placeholder, and the
/// unknown writes of it are interchangeable ("free"): the search tries only the first one not
/// yet placed at each point, instead of every subset of them.
fn canonical(history: &[Event]) -> (Vec<Op>, Vec<bool>) {
    let mut observed = std::collections::HashSet::new();
    let mut used = std::collections::HashSet::new();
    for event in history {
        match event.op {
            Op::Read { value: Some(v) } if event.completed.is_some() => {
                observed.insert(v);
            }
            Op::Cas {
                expected: Some(e), ..
            } => {
                observed.insert(e);
            }
            _ => {}
        }
        match event.op {
            Op::Write { value } => used.insert(value),
            Op::Read { value } => used.insert(value.unwrap_or(0)),
            Op::Cas { expected, new, .. } => {
                used.insert(expected.unwrap_or(0));
                used.insert(new)
            }
        };
    }
    let unseen = (0..=u64::MAX)
        .rev()
        .find(|v| !used.contains(v))
        .unwrap_or(u64::MAX);
    let mut free = vec![false; history.len()];
    let ops = history
        .iter()
        .enumerate()
        .map(|(i, event)| {
            if event.completed.is_some() {
                return event.op.clone();
            }
            match event.op {
                Op::Write { value } if !observed.contains(&value) => {
                    free[i] = true;
                    Op::Write { value: unseen }
                }
                Op::Cas {
                    expected,
                    new,
                    succeeded,
                } if !observed.contains(&new) => Op::Cas {
                    expected,
                    new: unseen,
                    succeeded,
                },
                ref op => op.clone(),
            }
        })
        .collect();
    (ops, free)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: Op, invoked: u64, completed: Option<u64>) -> Event {
        Event {
            op,
            invoked,
            completed,
        }
    }

    fn cas(expected: Option<u64>, new: u64, succeeded: bool) -> Op {
        Op::Cas {
            expected,
            new,
            succeeded,
        }
    }

    #[test]
    fn concurrent_writes_may_be_seen_in_either_order() {
        let history = [
            ev(Op::Write { value: 1 }, 0, Some(10)),
            ev(Op::Write { value: 2 }, 1, Some(9)),
            ev(Op::Read { value: Some(1) }, 11, Some(12)),
        ];
        assert!(is_linearizable(&history));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_caught() {
        let history = [
            ev(Op::Write { value: 1 }, 0, Some(1)),
            ev(Op::Write { value: 2 }, 2, Some(3)),
            ev(Op::Read { value: Some(1) }, 4, Some(5)),
        ];
        let violation = check(&history).unwrap_err();
        assert_eq!(violation.stuck_at, 2, "{violation:?}");
    }

    #[test]
    fn a_lost_write_is_caught() {
        // An acknowledged write that a later read does not see, and no other write since.
        let history = [
            ev(Op::Write { value: 1 }, 0, Some(1)),
            ev(Op::Write { value: 2 }, 2, Some(3)),
            ev(Op::Read { value: Some(2) }, 4, Some(5)),
            ev(Op::Read { value: None }, 6, Some(7)),
        ];
        assert!(!is_linearizable(&history));
    }

    #[test]
    fn two_successful_cas_from_the_same_value_are_a_lost_update() {
        let history = [
            ev(Op::Write { value: 0 }, 0, Some(1)),
            ev(cas(Some(0), 1, true), 2, Some(5)),
            ev(cas(Some(0), 2, true), 3, Some(6)),
        ];
        assert!(!is_linearizable(&history));
    }

    #[test]
    fn an_unknown_outcome_may_or_may_not_have_applied() {
        let applied = [
            ev(Op::Write { value: 7 }, 0, None),
            ev(Op::Read { value: Some(7) }, 5, Some(6)),
        ];
        let not_applied = [
            ev(Op::Write { value: 7 }, 0, None),
            ev(Op::Read { value: None }, 5, Some(6)),
        ];
        assert!(is_linearizable(&applied));
        assert!(is_linearizable(&not_applied));
        // ...but not before it was invoked.
        let too_early = [
            ev(Op::Read { value: Some(7) }, 0, Some(1)),
            ev(Op::Write { value: 7 }, 2, None),
        ];
        assert!(!is_linearizable(&too_early));
    }

    #[test]
    fn a_read_cannot_see_a_write_invoked_after_it_completed() {
        let history = [
            ev(Op::Read { value: Some(3) }, 0, Some(1)),
            ev(Op::Write { value: 3 }, 2, Some(3)),
        ];
        assert!(!is_linearizable(&history));
    }

    #[test]
    fn a_value_that_flips_back_is_caught() {
        // 1 then 2 are written in order; reads see 2, then 1 again.
        let history = [
            ev(Op::Write { value: 1 }, 0, Some(1)),
            ev(Op::Write { value: 2 }, 2, Some(10)),
            ev(Op::Read { value: Some(2) }, 3, Some(4)),
            ev(Op::Read { value: Some(1) }, 5, Some(6)),
        ];
        assert!(!is_linearizable(&history));
    }

    /// A long, concurrent history of a correct register with a few unknown outcomes:
    /// linearizable, and checked without blowing up (memoisation) or overflowing the stack
    /// (no recursion).
    #[test]
    fn a_long_correct_history_passes_and_a_planted_stale_read_fails() {
        let mut history = Vec::new();
        let mut value: Option<u64> = None;
        let mut t = 0u64;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..5000u64 {
            // Each operation overlaps the next few; it takes effect at its own time `t`.
            let invoked = t.saturating_sub(next() % 25);
            let completed = t + next() % 25;
            let op = match next() % 3 {
                0 => {
                    value = Some(i);
                    Op::Write { value: i }
                }
                1 => Op::Read { value },
                _ => {
                    let expected = if next() % 2 == 0 {
                        value
                    } else {
                        Some(u64::MAX)
                    };
                    let succeeded = expected == value;
                    if succeeded {
                        value = Some(i);
                    }
                    cas(expected, i, succeeded)
                }
            };
            // Some outcomes unknown, as timeouts during faults leave them.
            let completed = (next() % 50 != 0).then_some(completed);
            history.push(ev(op, invoked, completed));
            t += 10;
        }
        assert_eq!(check(&history), Ok(()));
        // A read well after a write that sees the value before it.
        history.push(ev(Op::Write { value: 90_001 }, t, Some(t + 1)));
        history.push(ev(Op::Write { value: 90_002 }, t + 2, Some(t + 3)));
        history.push(ev(
            Op::Read {
                value: Some(90_001),
            },
            t + 4,
            Some(t + 5),
        ));
        assert!(check(&history).is_err());
    }
}
