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

/// As [`wait_until`], for a condition that has to await (an RPC): polls it, with the same
/// backoff, until it yields `Some`, or fails after `timeout` naming `what`.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(pause).await;
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

    #[tokio::test]
    async fn the_async_form_waits_for_an_awaited_condition() {
        let mut calls = 0;
        let value = until("three calls", Duration::from_secs(5), || {
            calls += 1;
            let now = calls;
            async move { (now == 3).then_some(now) }
        })
        .await;
        assert_eq!(value, Ok(3));
        let error = until::<(), _, _>("never", Duration::from_millis(20), || async { None })
            .await
            .unwrap_err();
        assert!(error.contains("never"), "{error}");
    }

    #[test]
    fn fails_naming_the_condition_after_the_timeout() {
        let error = wait_until::<()>("never", Duration::from_millis(20), || None).unwrap_err();
        assert!(error.contains("never"), "{error}");
    }
}
