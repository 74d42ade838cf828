//! Errors of the producers.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProducerError {
    #[error(transparent)]
    Backbone(#[from] chorus_backbone::BackboneError),
    #[error("event cannot be routed: {0}")]
    Subject(#[from] chorus_schemas::SubjectError),
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The signing key could not sign (token removed, wrong PIN): nothing unsigned is stored.
    #[error("signing events: {0}")]
    Signing(String),
    #[error("{0}")]
    Other(String),
}
