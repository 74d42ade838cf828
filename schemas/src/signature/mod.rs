//! Signatures of events and RPC requests.
//!
//! A [`Signer`] signs bytes with an Ed25519 key that the caller may not be able to read:
//! a key file on disk, or a key held by a PKCS#11 token (HSM, SoftHSM2) that never leaves it.
//! Consumers verify with the public keys they trust and dead-letter forged or unsigned
//! events with the reason.
//!
//! (Work in progress: providers, event signing and verification are being added.)

/// Why signing failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key could not be loaded or used (file unreadable, token absent, wrong PIN).
    #[error("signing key unavailable: {0}")]
    Key(String),
    /// The provider refused or failed the signing operation.
    #[error("signing failed: {0}")]
    Failed(String),
}

/// Signs with an Ed25519 key held somewhere (file, PKCS#11 token).
pub trait Signer: Send + Sync {
    /// Stable id of the key carried with signatures, so verifiers pick the right public key
    /// (hex SHA-256 fingerprint of the public key, first 16 bytes).
    fn key_id(&self) -> &str;
    /// The 32-byte Ed25519 public key.
    fn public_key(&self) -> [u8; 32];
    /// The 64-byte Ed25519 signature of `message`.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError>;
}
