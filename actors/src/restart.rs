//! Restart intensity: at most N restarts in T seconds across the node's tree. Past that a
//! supervisor escalates (the node reports NOT_SERVING and says why) instead of restarting
//! again, so a child that fails at once on every start cannot crash-loop.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RestartBudget {
    max_restarts: usize,
    window: Duration,
    inner: Mutex<BudgetState>,
}

#[derive(Debug, Default)]
struct BudgetState {
    recent: VecDeque<Instant>,
    total: u64,
    escalated: Option<String>,
}

impl RestartBudget {
    pub fn new(max_restarts: usize, window: Duration) -> Self {
        Self {
            max_restarts,
            window,
            inner: Mutex::new(BudgetState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a restart of `what` at `now`. `Err` carries the escalation reason when the
    /// intensity is exceeded; the budget then stays escalated.
    pub fn try_restart(&self, what: &str, now: Instant) -> Result<(), String> {
        let mut state = self.state();
        if let Some(reason) = &state.escalated {
            return Err(reason.clone());
        }
        while state
            .recent
            .front()
            .is_some_and(|&at| now.duration_since(at) > self.window)
        {
            state.recent.pop_front();
        }
        if state.recent.len() >= self.max_restarts {
            let reason = format!(
                "restart intensity exceeded: {} restarts within {:?} (max {}), last failure in {what}; fix the cause and restart the node",
                state.recent.len() + 1,
                self.window,
                self.max_restarts
            );
            state.escalated = Some(reason.clone());
            return Err(reason);
        }
        state.recent.push_back(now);
        state.total += 1;
        Ok(())
    }

    pub fn escalation(&self) -> Option<String> {
        self.state().escalated.clone()
    }

    pub fn total_restarts(&self) -> u64 {
        self.state().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_past_the_intensity_escalate_and_stay_escalated() {
        let budget = RestartBudget::new(3, Duration::from_secs(10));
        let start = Instant::now();
        for i in 0..3 {
            budget
                .try_restart("worker", start + Duration::from_secs(i))
                .unwrap();
        }
        let reason = budget
            .try_restart("worker", start + Duration::from_secs(4))
            .unwrap_err();
        assert!(reason.contains("restart intensity exceeded"), "{reason}");
        // Even once the window has passed, an escalated budget does not restart again.
        assert!(budget
            .try_restart("worker", start + Duration::from_secs(60))
            .is_err());
        assert_eq!(budget.total_restarts(), 3);
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let budget = RestartBudget::new(2, Duration::from_secs(10));
        let start = Instant::now();
        budget.try_restart("a", start).unwrap();
        budget
            .try_restart("a", start + Duration::from_secs(1))
            .unwrap();
        budget
            .try_restart("a", start + Duration::from_secs(12))
            .unwrap();
        assert!(budget.escalation().is_none());
    }
}
