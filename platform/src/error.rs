//! Errors of the platform's plumbing.

use thiserror::Error;

/// Why events could not be stamped, stored or forwarded.
#[derive(Debug, Error)]
pub enum PlatformError {
    /// The backbone refused or failed (the store, the broker).
    #[error(transparent)]
    Backbone(#[from] chorus_backbone::BackboneError),
    /// An event has no valid subject (a token with a dot or a wildcard).
    #[error("event cannot be routed: {0}")]
    Subject(#[from] chorus_schemas::SubjectError),
    /// The signing key could not sign (token removed, wrong PIN): nothing unsigned is stored.
    #[error("signing events: {0}")]
    Signing(#[from] chorus_keys::SignError),
    /// A sink other than a backbone (an in-memory sink, a custom one) cannot store now.
    #[error("event sink unavailable: {0}")]
    Unavailable(String),
    /// The streams configured for the platform's subjects cannot be used.
    #[error("{0}")]
    Streams(String),
    /// A request that cannot be made as given (a governor's name or definition).
    #[error("{0}")]
    Invalid(String),
}
