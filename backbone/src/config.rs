//! Typed configuration of streams and consumers, shared by both engines.
//!
//! The same `StreamConfig` provisions a JetStream stream or an embedded one, so a deployment
//! can move between engines without rewriting its configuration.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{BackboneError, Result};

/// A stream: the subjects it captures and how much it keeps.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name: letters, digits, `-` and `_` (JetStream forbids `.`, `*`, `>` and spaces).
    pub name: String,
    /// Subject filters captured by the stream; streams of one backbone must not overlap.
    pub subjects: Vec<String>,
    /// Keep at most this many messages (oldest removed first); 0 = unlimited.
    #[serde(default)]
    pub max_messages: u64,
    /// Keep at most this many payload bytes (oldest removed first); 0 = unlimited.
    #[serde(default)]
    pub max_bytes: u64,
    /// Remove messages older than this; unset = keep forever.
    #[serde(default, with = "humantime_serde::option")]
    #[schemars(with = "Option<String>")]
    pub max_age: Option<Duration>,
    /// How long an event id is remembered for dedupe. Retries and replicated copies arriving
    /// within this window are stored once.
    #[serde(default = "default_dedupe_window", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub dedupe_window: Duration,
    /// Copies kept by a JetStream cluster (1, 3 or 5); the embedded engine keeps one.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

fn default_dedupe_window() -> Duration {
    Duration::from_secs(120)
}

fn default_replicas() -> usize {
    1
}

impl StreamConfig {
    /// A stream with default limits (unlimited size, 2 minute dedupe window, one replica).
    pub fn new(name: impl Into<String>, subjects: Vec<String>) -> Self {
        StreamConfig {
            name: name.into(),
            subjects,
            max_messages: 0,
            max_bytes: 0,
            max_age: None,
            dedupe_window: default_dedupe_window(),
            replicas: default_replicas(),
        }
    }

    /// Rejects a configuration either engine would refuse or misread, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.subjects.is_empty() {
            return Err(BackboneError::invalid_config(format!("stream {}: subjects must not be empty", self.name)));
        }
        self.validate_copy()
    }

    /// [`StreamConfig::validate`] for a stream that only copies another (a JetStream mirror
    /// or a stream of native sources), which may capture no subjects of its own.
    pub fn validate_copy(&self) -> Result<()> {
        validate_name("stream name", &self.name)?;
        for s in &self.subjects {
            crate::subject::validate_filter(s)
                .map_err(|e| BackboneError::invalid_config(format!("stream {}: subjects: {e}", self.name)))?;
        }
        if self.dedupe_window.is_zero() {
            return Err(BackboneError::invalid_config(format!("stream {}: dedupe_window must be > 0", self.name)));
        }
        if let Some(age) = self.max_age {
            if age < self.dedupe_window {
                return Err(BackboneError::invalid_config(format!(
                    "stream {}: max_age ({age:?}) must not be shorter than dedupe_window ({:?})",
                    self.name, self.dedupe_window
                )));
            }
        }
        if !matches!(self.replicas, 1 | 3 | 5) {
            return Err(BackboneError::invalid_config(format!(
                "stream {}: replicas must be 1, 3 or 5, got {}",
                self.name, self.replicas
            )));
        }
        Ok(())
    }
}

/// Where a consumer or a replay starts.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "from", content = "at")]
pub enum StartPosition {
    /// The oldest message still stored.
    #[default]
    First,
    /// Only messages published after the consumer is created.
    New,
    /// The first message with a sequence at or above this one.
    Sequence(u64),
    /// The first message stored at or after this time.
    Time(DateTime<Utc>),
}

/// A durable, named consumer: the backbone remembers what it acknowledged, so a restarted
/// process resumes where it stopped and unacknowledged messages are redelivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Durable name: letters, digits, `-` and `_`.
    pub name: String,
    /// Only messages on subjects matching one of these (empty = all of the stream).
    #[serde(default)]
    pub filter_subjects: Vec<String>,
    /// Where the consumer starts when it is first created; ignored when it already exists.
    #[serde(default)]
    pub start: StartPosition,
    /// How long a delivered message may stay unacknowledged before it is redelivered.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Give up redelivering a message after this many deliveries; 0 = never give up.
    #[serde(default)]
    pub max_deliver: u32,
    /// At most this many delivered-but-unacknowledged messages at once (flow control).
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: usize,
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_max_ack_pending() -> usize {
    20_000
}

impl ConsumerConfig {
    /// A consumer of the whole stream from its first message with default limits.
    pub fn new(name: impl Into<String>) -> Self {
        ConsumerConfig {
            name: name.into(),
            filter_subjects: Vec::new(),
            start: StartPosition::First,
            ack_wait: default_ack_wait(),
            max_deliver: 0,
            max_ack_pending: default_max_ack_pending(),
        }
    }

    /// Adds a subject filter; with filters, only messages matching one of them are delivered.
    pub fn with_filter(mut self, filter: impl Into<String>) -> Self {
        self.filter_subjects.push(filter.into());
        self
    }

    /// Sets where the consumer starts when it is first created.
    pub fn with_start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Sets how long a delivery may stay unacknowledged before it is redelivered.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Rejects a configuration either engine would refuse, naming the field.
    pub fn validate(&self) -> Result<()> {
        validate_name("consumer name", &self.name)?;
        for s in &self.filter_subjects {
            crate::subject::validate_filter(s)
                .map_err(|e| BackboneError::invalid_config(format!("consumer {}: filter_subjects: {e}", self.name)))?;
        }
        if self.ack_wait < Duration::from_millis(100) {
            return Err(BackboneError::invalid_config(format!("consumer {}: ack_wait must be >= 100ms", self.name)));
        }
        if self.max_ack_pending == 0 {
            return Err(BackboneError::invalid_config(format!("consumer {}: max_ack_pending must be > 0", self.name)));
        }
        Ok(())
    }
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(BackboneError::invalid_config(format!(
            "{what} {name:?} must be 1..=200 characters of letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_config_reads_from_yaml_like_json_with_defaults() {
        let c: StreamConfig =
            serde_json::from_str(r#"{"name":"CHORUS_LIFECYCLE","subjects":["choria.lifecycle.>"],"max_age":"24h"}"#)
                .unwrap();
        assert_eq!(c.dedupe_window, Duration::from_secs(120));
        assert_eq!(c.max_age, Some(Duration::from_secs(86400)));
        c.validate().unwrap();
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut c = StreamConfig::new("a.b", vec!["x".into()]);
        assert!(c.validate().unwrap_err().to_string().contains("stream name"));
        c.name = "ok".into();
        c.subjects = vec!["a.>.b".into()];
        assert!(c.validate().unwrap_err().to_string().contains("subjects"));
        c.subjects = vec!["a.>".into()];
        c.replicas = 2;
        assert!(c.validate().unwrap_err().to_string().contains("replicas"));
        let e = serde_json::from_str::<StreamConfig>(r#"{"name":"x","subjects":["a"],"bogus":1}"#).unwrap_err();
        assert!(e.to_string().contains("bogus"));
    }
}
