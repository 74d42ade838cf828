//! Errors of the backbone, shared by both engines so callers handle one type.
//!
//! Every error from a library below keeps it as its source. Whether retrying may help
//! ([`BackboneError::is_transient`]) is decided from the async-nats error *kind* (and, for
//! JetStream API errors, the server's error code) when the error is converted, never from its
//! text.

use thiserror::Error;

/// Result alias used across the backbone.
pub type Result<T, E = BackboneError> = std::result::Result<T, E>;

/// Any error from a library below, kept whole.
pub type Source = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong talking to a stream store.
#[derive(Debug, Error)]
pub enum BackboneError {
    /// A stream, consumer or message named by the caller does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// `stream`, `consumer`, …
        kind: &'static str,
        /// The name the caller gave.
        name: String,
    },
    /// No configured stream captures the subject, so a publish would be lost.
    #[error("no stream captures subject {0:?}")]
    NoStreamForSubject(String),
    /// The caller's configuration is invalid; the error names the field at fault.
    #[error("invalid configuration: {0}")]
    Config(#[from] chorus_runtime::ConfigError),
    /// The message is unusable (empty id, bad subject, too large).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The engine did not answer within the allowed time (a publish retried for its whole
    /// budget); the last failure is the source.
    #[error("timed out: {operation}")]
    Timeout {
        /// What timed out.
        operation: String,
        /// The last failure.
        #[source]
        source: Option<Source>,
    },
    /// The embedded store failed (disk full, I/O).
    #[error("storage error: {context}: {source}")]
    Storage {
        /// What was being done.
        context: String,
        /// The store's error.
        #[source]
        source: Source,
    },
    /// The embedded store holds something this version did not write.
    #[error("storage corrupt: {0}")]
    Corrupt(String),
    /// The server refused a request that cannot succeed as it is (a stream whose subjects
    /// overlap another stream's, a configuration the server does not accept).
    #[error("{operation} refused: {source}")]
    Refused {
        /// What was asked.
        operation: String,
        /// The server's answer.
        #[source]
        source: Source,
    },
    /// No NATS server of the list could be reached or accepted the client.
    #[error("connecting to {servers}: {source}")]
    Connect {
        /// The servers tried.
        servers: String,
        /// Whether trying again may succeed (a server down, not a refused credential).
        transient: bool,
        /// async-nats's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The NATS connection or JetStream API failed.
    #[error("nats error: {source}")]
    Nats {
        /// Whether retrying the same call may succeed (from the error's kind).
        transient: bool,
        /// The async-nats error.
        #[source]
        source: Source,
    },
    /// The backbone was closed while the call was in flight.
    #[error("backbone closed")]
    Closed,
    /// A key-value write that expected a revision (or no value) found another: someone else
    /// wrote first. Not transient: read again and decide.
    #[error("key {key:?} changed: {message}")]
    WrongRevision {
        /// The key.
        key: String,
        /// What was expected and found.
        message: String,
    },
}

impl From<sled::Error> for BackboneError {
    fn from(e: sled::Error) -> Self {
        BackboneError::Storage { context: "sled".into(), source: Box::new(e) }
    }
}

impl From<chorus_runtime::StoreError> for BackboneError {
    fn from(e: chorus_runtime::StoreError) -> Self {
        BackboneError::Storage { context: "opening the store".into(), source: Box::new(e) }
    }
}

impl BackboneError {
    /// Whether retrying the same call (same event ids) may succeed; publishes are idempotent
    /// thanks to dedupe by event id, so transient failures are safe to retry.
    pub fn is_transient(&self) -> bool {
        match self {
            BackboneError::Timeout { .. } => true,
            BackboneError::Nats { transient, .. } | BackboneError::Connect { transient, .. } => *transient,
            _ => false,
        }
    }

    /// A configuration error without a single field at fault.
    pub(crate) fn invalid_config(message: impl std::fmt::Display) -> Self {
        BackboneError::Config(chorus_runtime::ConfigError::message(message))
    }

    /// A storage failure while doing `context` (also for stores built on the embedded engine).
    pub fn storage(context: impl Into<String>, source: impl Into<Source>) -> Self {
        BackboneError::Storage { context: context.into(), source: source.into() }
    }

    /// A NATS failure whose kind async-nats does not type (acknowledgements return a boxed
    /// error): assumed transient, as a lost connection is.
    pub(crate) fn nats_untyped(source: Source) -> Self {
        BackboneError::Nats { transient: true, source }
    }
}

/// One failure reported to several callers (every publish of a group that could not be
/// written), kept whole behind an `Arc`.
#[derive(Debug, Clone)]
pub struct SharedError(pub std::sync::Arc<BackboneError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
