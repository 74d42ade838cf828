//! Exponential backoff between retries: the one rule every retrying part of Chorus uses (the
//! JetStream engine's API calls, the outbox forwarder, the replicator's copiers, SIEM sinks,
//! the provisioner), configured the same way everywhere.
//!
//! [`Backoff`] is the policy (a value in configuration files); [`Retry`] is one run of
//! attempts under it, which sleeps the next delay unless a [`Shutdown`] comes first.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::service::Shutdown;

/// Exponential backoff: `initial`, then times `multiplier` per failed attempt, at most `max`.
///
/// ```
/// use std::time::Duration;
/// use chorus_runtime::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 2.0);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(3), Duration::from_millis(400));
/// assert_eq!(b.delay(10), Duration::from_secs(1));
/// ```
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// The pause after the first failure.
    #[serde(default = "default_initial", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub initial: Duration,
    /// The longest pause.
    #[serde(default = "default_max", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max: Duration,
    /// Growth of the pause per further failure (1 keeps it flat).
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
}

fn default_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_max() -> Duration {
    Duration::from_secs(30)
}
fn default_multiplier() -> f64 {
    2.0
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: default_initial(), max: default_max(), multiplier: default_multiplier() }
    }
}

impl Backoff {
    /// A backoff from `initial` growing by `multiplier` up to `max`.
    pub const fn new(initial: Duration, max: Duration, multiplier: f64) -> Self {
        Backoff { initial, max, multiplier }
    }

    /// Doubling from `initial` up to `max`: what the network clients use.
    pub const fn doubling(initial: Duration, max: Duration) -> Self {
        Backoff::new(initial, max, 2.0)
    }

    /// The pause after `failures` consecutive failures (1 = the first; 0 counts as 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self.multiplier.powi(failures.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::try_from_secs_f64(secs).unwrap_or(self.max).min(self.max)
    }

    /// A fresh run of attempts under this policy.
    pub fn retry(&self) -> Retry {
        Retry { backoff: *self, failures: 0 }
    }

    /// Rejects a backoff that would spin or never grow. `field` is where it sits in its
    /// configuration file (`backoff`, `sinks[0].backoff`), and the error names it.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.initial.is_zero() {
            return Err(ConfigError::invalid(format!("{field}.initial"), "must be > 0"));
        }
        if self.max < self.initial {
            return Err(ConfigError::invalid(format!("{field}.max"), "must be >= initial"));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(ConfigError::invalid(format!("{field}.multiplier"), "must be a number >= 1"));
        }
        Ok(())
    }
}

/// One run of attempts: counts failures and sleeps the growing delay between them.
#[derive(Clone, Debug)]
pub struct Retry {
    backoff: Backoff,
    failures: u32,
}

impl Retry {
    /// Records a failure and returns how long to pause before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures)
    }

    /// Records a success: the next failure pauses `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure and sleeps the delay. Returns `false`, at once, when `shutdown` is
    /// requested before or during the pause: the caller should stop retrying.
    pub async fn wait(&mut self, shutdown: &Shutdown) -> bool {
        let delay = self.next_delay();
        if shutdown.is_requested() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => !shutdown.is_requested(),
            _ = shutdown.requested() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_cap_and_a_multiplier_of_one_stays_flat() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10), 2.0);
        let delays: Vec<u64> = (1..=6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
        let flat = Backoff { multiplier: 1.0, ..b };
        assert_eq!(flat.delay(5), Duration::from_secs(1));
    }

    #[test]
    fn validation_names_the_field() {
        let zero = Backoff { initial: Duration::ZERO, ..Backoff::default() };
        assert_eq!(zero.validate("sinks[0].backoff").unwrap_err().to_string(), "sinks[0].backoff.initial: must be > 0");
        let shrinking = Backoff { multiplier: 0.5, ..Backoff::default() };
        assert!(shrinking.validate("backoff").unwrap_err().to_string().starts_with("backoff.multiplier"));
        assert!(Backoff::default().validate("backoff").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_sleeps_the_growing_delay_and_resets_on_success() {
        let shutdown = Shutdown::new();
        let mut retry = Backoff::doubling(Duration::from_millis(50), Duration::from_millis(300)).retry();
        let started = tokio::time::Instant::now();
        for _ in 0..4 {
            assert!(retry.wait(&shutdown).await);
        }
        // 50 + 100 + 200 + 300 (capped), on paused time: exact.
        assert_eq!(started.elapsed(), Duration::from_millis(650));
        retry.reset();
        assert_eq!(retry.next_delay(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_ends_the_pause_at_once() {
        let shutdown = Shutdown::new();
        let mut retry = Backoff::doubling(Duration::from_secs(3600), Duration::from_secs(3600)).retry();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stopper.request();
        });
        let started = tokio::time::Instant::now();
        assert!(!retry.wait(&shutdown).await);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert!(!retry.wait(&shutdown).await, "an already requested shutdown does not sleep");
    }
}
