//! Errors of the producers.

use thiserror::Error;

/// Why a node agent, a machine or the simulator could not start or go on.
#[derive(Debug, Error)]
pub enum ProducerError {
    /// Events could not be stored (outbox, backbone, signing key).
    #[error(transparent)]
    Platform(#[from] chorus_platform::PlatformError),
    /// The backbone failed outside an emission (opening the outbox, connecting).
    #[error(transparent)]
    Backbone(#[from] chorus_backbone::BackboneError),
    /// The configuration cannot work; the error names the file and field.
    #[error(transparent)]
    Config(#[from] chorus_runtime::ConfigError),
    /// The RPC server could not start or host a node.
    #[error("rpc: {0}")]
    Rpc(#[from] chorus_rpc::RpcError),
    /// The signing key could not be opened.
    #[error("signing key: {0}")]
    Signing(#[from] chorus_keys::SignError),
    /// A credential could not be issued or read.
    #[error("identity: {0}")]
    Identity(#[source] chorus_identity::CredentialError),
}
