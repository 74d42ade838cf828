//! Chorus signing keys: who a component is, as a key it can sign with.
//!
//! A [`Signer`] signs bytes with an Ed25519 key that the caller may not be able to read:
//! a key file on disk, or a key held by a PKCS#11 token (HSM, SoftHSM2) that never leaves it.
//! Event signatures, request signatures, tokens and TLS client identities are all built on
//! this one contract, so every kind of key works everywhere a key is asked for.
//!
//! * [`Ed25519FileSigner`]: a key in a PKCS#8 PEM file (or a raw seed in hex/base64).
//! * [`Pkcs11Signer`]: a key on a PKCS#11 token, used through `CKM_EDDSA`.
//! * [`KeyConfig`]: where a key is, as configuration files name it.
//!
//! Key ids are [`key_id`]: the first 16 bytes of the SHA-256 of the 32-byte public key, in
//! lowercase hex (32 characters).
//!
//! This crate is a leaf: it knows nothing of events or streams.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod file;
mod pkcs11;

#[cfg(test)]
mod tests;

pub use file::{parse_public_key, public_key_pem, read_public_key_file, Ed25519FileSigner};
pub use pkcs11::{Pkcs11Config, Pkcs11Signer, DEFAULT_MODULE as DEFAULT_PKCS11_MODULE};

/// The key id of an Ed25519 public key: lowercase hex of the first 16 bytes of its SHA-256.
pub fn key_id(public_key: &[u8; 32]) -> String {
    let digest = Sha256::digest(public_key);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

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

/// Where a signing key is, as configuration files write it: `{key_file: PATH}` or
/// `{pkcs11: {token_label: ..., key_label: ..., pin_file: ...}}`, exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "KeyFields", into = "KeyFields")]
pub enum KeyConfig {
    /// An Ed25519 key file (PKCS#8 PEM: `chorus security keygen --file`,
    /// `openssl genpkey -algorithm ed25519`).
    KeyFile(PathBuf),
    /// A key held by a PKCS#11 token (SoftHSM2, an HSM).
    Pkcs11(Pkcs11Config),
}

/// The form [`KeyConfig`] is written in: a map with one of two keys, the same in YAML, JSON
/// and every serde format (an enum would be a YAML tag).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pkcs11: Option<Pkcs11Config>,
}

impl TryFrom<KeyFields> for KeyConfig {
    type Error = &'static str;

    fn try_from(fields: KeyFields) -> Result<Self, Self::Error> {
        match (fields.key_file, fields.pkcs11) {
            (Some(path), None) => Ok(KeyConfig::KeyFile(path)),
            (None, Some(token)) => Ok(KeyConfig::Pkcs11(token)),
            _ => Err("set exactly one of key_file and pkcs11"),
        }
    }
}

impl From<KeyConfig> for KeyFields {
    fn from(key: KeyConfig) -> Self {
        match key {
            KeyConfig::KeyFile(path) => KeyFields { key_file: Some(path), pkcs11: None },
            KeyConfig::Pkcs11(token) => KeyFields { key_file: None, pkcs11: Some(token) },
        }
    }
}

impl KeyConfig {
    /// Opens the key: reads the file, or logs in to the token.
    pub fn open(&self) -> Result<Arc<dyn Signer>, SignError> {
        Ok(match self {
            KeyConfig::KeyFile(path) => Arc::new(Ed25519FileSigner::load(path)?),
            KeyConfig::Pkcs11(config) => Arc::new(Pkcs11Signer::open(config)?),
        })
    }
}
