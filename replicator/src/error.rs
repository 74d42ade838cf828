//! Errors of the replicator.

use thiserror::Error;

/// What stops a replicator from starting or running.
#[derive(Debug, Error)]
pub enum ReplicatorError {
    /// The configuration is invalid; the error names the file and the field at fault.
    #[error("invalid replicator configuration: {0}")]
    Config(#[from] chorus_runtime::ConfigError),
    /// The checkpoint store failed (disk full, corruption).
    #[error("checkpoint store: {0}")]
    Checkpoint(#[from] chorus_runtime::StoreError),
    /// A source or target backbone failed in a way retrying will not fix.
    #[error(transparent)]
    Backbone(#[from] chorus_backbone::BackboneError),
    /// The replicator's election could not be joined or ended badly.
    #[error("replicator election: {0}")]
    Election(String),
    /// Reading a configuration file or binding the HTTP listener failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl From<sled::Error> for ReplicatorError {
    fn from(e: sled::Error) -> Self {
        ReplicatorError::Checkpoint(e.into())
    }
}

/// Result of the replicator.
pub type Result<T, E = ReplicatorError> = std::result::Result<T, E>;
