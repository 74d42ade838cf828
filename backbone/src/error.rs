//! Errors of the backbone, shared by both engines so callers handle one type.

use thiserror::Error;

/// Result alias used across the backbone.
pub type Result<T, E = BackboneError> = std::result::Result<T, E>;

/// What went wrong talking to a stream store.
#[derive(Debug, Error)]
pub enum BackboneError {
    /// A stream, consumer or message named by the caller does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// No configured stream captures the subject, so a publish would be lost.
    #[error("no stream captures subject {0:?}")]
    NoStreamForSubject(String),
    /// The caller's configuration is invalid; the message names the field at fault.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The message is unusable (empty id, bad subject, too large).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The engine did not answer within the allowed time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The embedded store failed (disk full, corruption, I/O).
    #[error("storage error: {0}")]
    Storage(String),
    /// The NATS connection or JetStream API failed.
    #[error("nats error: {0}")]
    Nats(String),
    /// The backbone was closed while the call was in flight.
    #[error("backbone closed")]
    Closed,
}

impl From<sled::Error> for BackboneError {
    fn from(e: sled::Error) -> Self {
        BackboneError::Storage(e.to_string())
    }
}

impl BackboneError {
    /// Whether retrying the same call (same event ids) may succeed; publishes are idempotent
    /// thanks to dedupe by event id, so transient failures are safe to retry.
    pub fn is_transient(&self) -> bool {
        matches!(self, BackboneError::Timeout(_) | BackboneError::Nats(_))
    }

    pub(crate) fn nats(e: impl std::fmt::Display) -> Self {
        BackboneError::Nats(e.to_string())
    }
}
