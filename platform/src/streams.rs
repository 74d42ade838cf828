//! The platform's streams, provisioned the same way on every backbone.

use std::time::Duration;

use chorus_backbone::{Backbone, StreamConfig};

use crate::PlatformError;

/// Limits applied to the platform streams.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    /// Replicas on a JetStream cluster (1 on a single server or the embedded store).
    pub replicas: usize,
    /// How long events are kept; unset keeps them until `max_bytes` is reached.
    pub max_age: Option<Duration>,
    /// Dedupe window: how long an event id is remembered (replicated copies, retries).
    pub dedupe_window: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits { replicas: 1, max_age: None, dedupe_window: Duration::from_secs(600) }
    }
}

/// The platform's streams as Chorus would create them with `limits`.
pub fn platform_streams(limits: &StreamLimits) -> Vec<StreamConfig> {
    chorus_schemas::subject::streams()
        .into_iter()
        .map(|(name, subjects)| {
            let mut cfg = StreamConfig::new(name, subjects.iter().map(|s| s.to_string()).collect());
            cfg.replicas = limits.replicas;
            cfg.max_age = limits.max_age;
            cfg.dedupe_window = limits.dedupe_window;
            cfg
        })
        .collect()
}

/// One way an existing stream differs from what Chorus would create: reported, never
/// applied (operators own their streams; `chorus streams edit` changes them on purpose).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDrift {
    /// The stream.
    pub stream: String,
    /// The setting (`replicas`, `max_age`, `max_bytes`, `max_messages`, `dedupe_window`,
    /// `subjects`).
    pub field: &'static str,
    /// What the stream has.
    pub existing: String,
    /// What Chorus would have created.
    pub chorus: String,
}

impl std::fmt::Display for StreamDrift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream {} has {} {} (Chorus would create {})", self.stream, self.field, self.existing, self.chorus)
    }
}

/// The differences between an existing stream and what Chorus would create. Limits and
/// replicas an operator chose are differences to report; subjects missing from the stream
/// matter more (events on them are not stored), extra subjects are fine.
pub fn drift(existing: &StreamConfig, wanted: &StreamConfig) -> Vec<StreamDrift> {
    let mut out = Vec::new();
    let mut differ = |field, existing: String, chorus: String| {
        if existing != chorus {
            out.push(StreamDrift { stream: wanted.name.clone(), field, existing, chorus });
        }
    };
    let age = |a: Option<Duration>| a.map_or("unlimited".to_string(), |a| humantime::format_duration(a).to_string());
    let limit = |v: u64| if v == 0 { "unlimited".to_string() } else { v.to_string() };
    differ("replicas", existing.replicas.to_string(), wanted.replicas.to_string());
    differ("max_age", age(existing.max_age), age(wanted.max_age));
    differ("max_bytes", limit(existing.max_bytes), limit(wanted.max_bytes));
    differ("max_messages", limit(existing.max_messages), limit(wanted.max_messages));
    differ(
        "dedupe_window",
        humantime::format_duration(existing.dedupe_window).to_string(),
        humantime::format_duration(wanted.dedupe_window).to_string(),
    );
    let missing: Vec<&String> = wanted.subjects.iter().filter(|s| !existing.subjects.contains(s)).collect();
    if !missing.is_empty() {
        differ("subjects", format!("{:?}", existing.subjects), format!("{:?} (missing {missing:?})", wanted.subjects));
    }
    out
}

/// Creates the lifecycle, machine, RPC, audit, registration and dead-letter streams that
/// are missing. Existing ones are never changed (replicas, limits, retention): how each
/// differs from what Chorus would create is logged once here and returned.
pub async fn ensure_platform_streams(
    b: &dyn Backbone,
    limits: &StreamLimits,
) -> Result<Vec<StreamDrift>, PlatformError> {
    let mut drifts = Vec::new();
    for cfg in platform_streams(limits) {
        b.ensure_stream(&cfg).await?;
        let existing = b.stream_config(&cfg.name).await?;
        for d in drift(&existing, &cfg) {
            if d.field == "subjects" {
                tracing::warn!(
                    "{d}: events on the missing subjects are not stored there; change it with `chorus streams edit`"
                );
            } else {
                tracing::info!("{d}: left as it is (change it with `chorus streams edit`)");
            }
            drifts.push(d);
        }
    }
    Ok(drifts)
}
