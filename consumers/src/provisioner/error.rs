//! Errors of the provisioner.

use chorus_backbone::BackboneError;
use chorus_runtime::ConfigError;

/// Why the provisioner could not start or had to stop. Malformed events and failing nodes
/// are not errors (they are dead-lettered and retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionerError {
    /// The configuration is invalid (the error names the field).
    #[error("provisioner configuration: {0}")]
    Config(#[from] ConfigError),
    /// The state store failed.
    #[error("provisioner state: {0}")]
    Storage(#[from] chorus_runtime::StoreError),
    /// The state store (sled) failed.
    #[error("provisioner state: {0}")]
    Sled(#[from] sled::Error),
    /// The state store holds something the provisioner did not write.
    #[error("provisioner state is corrupt: {0}")]
    Corrupt(String),
    /// The backbone failed (opening the consumer, creating the dead-letter stream).
    #[error("backbone: {0}")]
    Backbone(#[from] BackboneError),
    /// The provisioner's election could not be joined or ended badly.
    #[error("provisioner election: {0}")]
    Election(String),
    /// The RPC client could not be set up (its key, credential or issuers).
    #[error("provisioner security: {0}")]
    Rpc(#[from] chorus_rpc::RpcError),
}
