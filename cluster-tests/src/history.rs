//! A linearizability checker for one register (Wing & Gong search with memoisation).
//!
//! Clients record each operation's invocation and completion times and its outcome. An
//! operation whose outcome is unknown (timeout, crash) may have taken effect at any point
//! after its invocation, or never. The checker looks for one total order that respects
//! real time and the register's semantics; keys are independent, so check each key alone.

use std::collections::HashSet;

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

/// True when `history` (starting from an absent key) is linearizable.
pub fn is_linearizable(history: &[Event]) -> bool {
    let n = history.len();
    let mut done = vec![false; n];
    let mut seen = HashSet::new();
    search(history, &mut done, None, &mut seen)
}

fn search(
    history: &[Event],
    done: &mut [bool],
    state: Option<u64>,
    seen: &mut HashSet<(Vec<bool>, Option<u64>)>,
) -> bool {
    // Finished when every operation that completed has been placed; the unknown ones may
    // never have happened.
    if history
        .iter()
        .zip(done.iter())
        .all(|(event, &placed)| placed || event.completed.is_none())
    {
        return true;
    }
    if !seen.insert((done.to_vec(), state)) {
        return false;
    }
    // An operation can go next only if it was invoked before every pending completed
    // operation finished.
    let horizon = history
        .iter()
        .zip(done.iter())
        .filter(|(_, &placed)| !placed)
        .filter_map(|(event, _)| event.completed)
        .min()
        .unwrap_or(u64::MAX);
    for index in 0..history.len() {
        let event = &history[index];
        if done[index] || event.invoked > horizon {
            continue;
        }
        if let Some(next) = step(state, &event.op, event.completed.is_some()) {
            done[index] = true;
            if search(history, done, next, seen) {
                return true;
            }
            done[index] = false;
        }
    }
    false
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
        assert!(!is_linearizable(&history));
    }

    #[test]
    fn two_successful_cas_from_the_same_value_are_a_lost_update() {
        let history = [
            ev(Op::Write { value: 0 }, 0, Some(1)),
            ev(
                Op::Cas {
                    expected: Some(0),
                    new: 1,
                    succeeded: true,
                },
                2,
                Some(5),
            ),
            ev(
                Op::Cas {
                    expected: Some(0),
                    new: 2,
                    succeeded: true,
                },
                3,
                Some(6),
            ),
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
    }

    #[test]
    fn a_read_cannot_see_a_write_invoked_after_it_completed() {
        let history = [
            ev(Op::Read { value: Some(3) }, 0, Some(1)),
            ev(Op::Write { value: 3 }, 2, Some(3)),
        ];
        assert!(!is_linearizable(&history));
    }
}
