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
    #[error("{0}")]
    Other(String),
}
