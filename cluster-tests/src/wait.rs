//! Waiting on conditions, never on fixed sleeps.

use std::time::{Duration, Instant};

/// Polls `condition` until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = condition() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::park_timeout(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value_the_condition_yields() {
        let mut calls = 0;
        let value = wait_until("three calls", Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(value, Ok(3));
    }

    #[test]
    fn fails_naming_the_condition_after_the_timeout() {
        let error = wait_until::<()>("never", Duration::from_millis(20), || None).unwrap_err();
        assert!(error.contains("never"), "{error}");
    }
}
