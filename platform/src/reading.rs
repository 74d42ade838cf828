//! Reading a stream that may not be there yet: the one way a long-running consumer (the
//! provisioner, the audit exporter) opens its durable consumers.
//!
//! Operators own the streams, and services start in any order: a consumer started before its
//! stream exists, or while its broker is down, must not die or pretend to be ready. It keeps
//! trying (200 ms doubling to 2 s, so a stream that appears is read within 2 s), says why it
//! is not reading in health ([`ReadStatus`]), and, being durable, reads from the stream's
//! start once it opens: no event is missed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_backbone::{Backbone, BackboneError, Consumer, ConsumerConfig};
use chorus_runtime::{Backoff, Health, Shutdown};

use crate::deadletter;

/// Pauses between attempts to open a consumer.
const OPEN_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(200), Duration::from_secs(2));

/// Which streams a service cannot read yet, and why; cheap to clone, shared with health.
#[derive(Clone, Debug, Default)]
pub struct ReadStatus(Arc<Mutex<BTreeMap<String, String>>>);

impl ReadStatus {
    /// A status that says `stream` is not read yet (`starting`) until its consumer opens.
    pub fn starting(streams: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let status = ReadStatus::default();
        for s in streams {
            status.waiting(s.into(), "starting".into());
        }
        status
    }

    /// Says `stream` is not read, and why (for readers that open their streams themselves).
    pub fn waiting(&self, stream: String, why: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(stream, why);
    }

    /// Says `stream` is read again.
    pub fn reading(&self, stream: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(stream);
    }

    /// Why some stream is not read, when one is not (`stream: why; …`).
    pub fn problem(&self) -> Option<String> {
        let waiting = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.is_empty() {
            return None;
        }
        Some(waiting.iter().map(|(s, why)| format!("{s}: {why}")).collect::<Vec<_>>().join("; "))
    }

    /// Failing ("not reading its streams: …") while a stream is not read.
    pub fn health(&self) -> Health {
        match self.problem() {
            Some(why) => Health::failing(format!("not reading its streams: {why}")),
            None => Health::ok(),
        }
    }
}

/// Opens the dead-letter stream and a durable consumer on `stream`, retrying while the stream
/// is missing or the broker unreachable and saying why in `status`; `None` on shutdown.
pub async fn open_consumer(
    backbone: &dyn Backbone,
    stream: &str,
    config: &ConsumerConfig,
    status: &ReadStatus,
    shutdown: &Shutdown,
) -> Option<Box<dyn Consumer>> {
    let mut retry = OPEN_BACKOFF.retry();
    loop {
        let opened = match deadletter::ensure_stream(backbone).await {
            Ok(()) => backbone.consumer(stream, config).await,
            Err(e) => Err(e),
        };
        let why = match opened {
            Ok(consumer) => {
                status.reading(stream);
                return Some(consumer);
            }
            Err(e @ BackboneError::NotFound { .. }) => {
                format!("{e} (`chorus streams create` creates the platform streams)")
            }
            Err(e) => e.to_string(),
        };
        tracing::warn!(stream, consumer = %config.name, "{why}; retrying");
        status.waiting(stream.to_string(), why);
        if !retry.wait(shutdown).await {
            return None;
        }
    }
}
