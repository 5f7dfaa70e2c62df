//! Waiting on conditions, never on fixed sleeps: the one poll-until helper that troupe's
//! tests (consensus, node) and its fault runner (cluster-tests) share.

use std::time::{Duration, Instant};

/// Polls `condition` (which may await, say an RPC) until it yields `Some`, backing off from
/// 1 ms to 50 ms between polls, or fails after `timeout` naming `what`.
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

/// [`until`] for a test: panics with the message instead of returning it.
pub async fn expect<T, F, Fut>(what: &str, timeout: Duration, condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    until(what, timeout, condition)
        .await
        .unwrap_or_else(|message| panic!("{message}"))
}

/// [`expect`] for a synchronous test: polls `condition` on this thread with the same backoff,
/// panicking with `what` after `timeout`.
pub fn expect_blocking<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_blocking_form_returns_the_first_value_and_names_a_timeout() {
        let mut calls = 0;
        let value = expect_blocking("three calls", Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(value, 3);
        let panic = std::panic::catch_unwind(|| {
            expect_blocking::<()>("never", Duration::from_millis(20), || None)
        })
        .unwrap_err();
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("never"), "{message}");
    }
}
