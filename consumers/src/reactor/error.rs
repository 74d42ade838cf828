//! Errors of the reactor.

use chorus_backbone::BackboneError;
use chorus_runtime::ConfigError;

/// Why the reactor could not start or had to stop. Malformed events and failing actions are
/// not errors: they are dead-lettered, or recorded as `failed` reactions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReactorError {
    /// The configuration is invalid (the error names the field).
    #[error("reactor configuration: {0}")]
    Config(#[from] ConfigError),
    /// A rule does not compile.
    #[error("reactor rules: {0}")]
    Rules(String),
    /// The state store failed.
    #[error("reactor state: {0}")]
    Storage(#[from] chorus_runtime::StoreError),
    /// The state store (sled) failed.
    #[error("reactor state: {0}")]
    Sled(#[from] sled::Error),
    /// The state store holds something the reactor did not write.
    #[error("reactor state is corrupt: {0}")]
    Corrupt(String),
    /// The backbone failed.
    #[error("backbone: {0}")]
    Backbone(#[from] BackboneError),
    /// The RPC client could not be set up (its key, credential or issuers).
    #[error("reactor security: {0}")]
    Rpc(#[from] chorus_rpc::RpcError),
    /// The reactor's election could not be joined or ended badly.
    #[error("reactor election: {0}")]
    Election(String),
    /// The HTTP client for webhooks could not be built.
    #[error("reactor webhooks: {0}")]
    Http(#[from] reqwest::Error),
}
