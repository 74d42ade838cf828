//! Errors of the replicator.

use thiserror::Error;

/// What stops a replicator from starting or running.
#[derive(Debug, Error)]
pub enum ReplicatorError {
    /// The configuration is invalid; the message names the field at fault.
    #[error("invalid replicator configuration: {0}")]
    Config(String),
    /// The checkpoint store failed (disk full, corruption).
    #[error("checkpoint store: {0}")]
    Checkpoint(String),
    /// A source or target backbone failed in a way retrying will not fix.
    #[error(transparent)]
    Backbone(#[from] chorus_backbone::BackboneError),
    /// Reading a configuration file or binding the HTTP listener failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<sled::Error> for ReplicatorError {
    fn from(e: sled::Error) -> Self {
        ReplicatorError::Checkpoint(e.to_string())
    }
}

pub type Result<T, E = ReplicatorError> = std::result::Result<T, E>;
