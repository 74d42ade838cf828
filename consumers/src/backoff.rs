//! Exponential backoff between retries, shared by every consumer that retries (SIEM sinks,
//! the provisioner): one rule, configured the same way everywhere.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exponential backoff: `initial`, then times `multiplier` per failed attempt, at most `max`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "default_initial", with = "humantime_serde")]
    pub initial: Duration,
    #[serde(default = "default_max", with = "humantime_serde")]
    pub max: Duration,
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
    /// The pause after `failures` consecutive failures (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self.multiplier.powi(failures.saturating_sub(1).min(64) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::try_from_secs_f64(secs).unwrap_or(self.max).min(self.max)
    }

    /// Rejects a backoff that would spin or never grow; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("backoff.initial must be > 0".into());
        }
        if self.max < self.initial {
            return Err("backoff.max must be >= backoff.initial".into());
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err("backoff.multiplier must be a number >= 1".into());
        }
        Ok(())
    }
}
