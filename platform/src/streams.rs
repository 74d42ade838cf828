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

/// Creates (or updates) the lifecycle, machine, RPC, audit and dead-letter streams.
pub async fn ensure_platform_streams(b: &dyn Backbone, limits: &StreamLimits) -> Result<(), PlatformError> {
    for (name, subjects) in chorus_schemas::subject::streams() {
        let mut cfg = StreamConfig::new(name, subjects.iter().map(|s| s.to_string()).collect());
        cfg.replicas = limits.replicas;
        cfg.max_age = limits.max_age;
        cfg.dedupe_window = limits.dedupe_window;
        b.ensure_stream(&cfg).await?;
    }
    Ok(())
}
