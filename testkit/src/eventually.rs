//! Waiting for something to become true, the one way every Chorus test waits.
//!
//! A test that waits for a real server, a child process or a background task polls with
//! [`eventually`]: the check runs at once, then after pauses growing from 10 ms to 250 ms,
//! until it succeeds or `within` has passed. On time-out the test fails naming what it
//! waited for and what the check saw last, which is what one needs to read a failure in CI.
//!
//! Nothing here proves that something did *not* happen: for that, tests run on paused tokio
//! time or check a counter after a point they control.
//!
//! ```
//! # async fn demo(count: std::sync::Arc<std::sync::atomic::AtomicU64>) {
//! use std::time::Duration;
//! use chorus_testkit::eventually;
//!
//! let n = eventually("3 events stored", Duration::from_secs(10), || {
//!     let n = count.load(std::sync::atomic::Ordering::SeqCst);
//!     async move { if n >= 3 { Ok(n) } else { Err(format!("{n} stored")) } }
//! })
//! .await;
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_millis(250);

/// Polls `check` until it returns `Ok`, for up to `within`, and returns its value. `Err`
/// means "not yet" and says what the check saw; on time-out the test panics with `what` and
/// the last such message. Runs on tokio's clock, so paused-time tests advance instantly.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

/// [`eventually`] for a plain condition: `ok` is polled until it is true. Use [`eventually`]
/// when the failure message should show the state seen.
pub async fn eventually_true(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    eventually(what, within, || {
        let result = if ok() { Ok(()) } else { Err("still false".to_string()) };
        async move { result }
    })
    .await
}

/// [`eventually`] for synchronous tests (threads, child processes): sleeps the thread.
pub fn eventually_blocking<T>(what: &str, within: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        let last = match check() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_the_first_success_and_polls_with_growing_pauses() {
        let calls = Arc::new(AtomicU32::new(0));
        let started = tokio::time::Instant::now();
        let value = eventually("the fourth call", Duration::from_secs(5), || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n == 4 {
                    Ok(n)
                } else {
                    Err(format!("call {n}"))
                }
            }
        })
        .await;
        assert_eq!(value, 4);
        // 10 + 20 + 40 ms of paused time between the four calls.
        assert_eq!(started.elapsed(), Duration::from_millis(70));
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "waiting for the impossible; last seen: still no")]
    async fn times_out_naming_what_and_the_last_state() {
        eventually("the impossible", Duration::from_secs(1), || async { Err::<(), _>("still no".to_string()) }).await;
    }
}
