//! Chorus signing keys: who a component is, as a key it can sign with.
//!
//! A [`Signer`] signs bytes with a key that the caller may not be able to read: a key file
//! on disk, or a key held by a PKCS#11 token (HSM, smart card, SoftHSM2) that never leaves
//! it. Event signatures, request and reply signatures, credentials, tokens and TLS client
//! identities are all built on this one contract, so every kind of key works everywhere a
//! key is asked for.
//!
//! Two algorithms: Ed25519, and ECDSA P-256 for the many tokens that have no Ed25519. Both
//! give 64-byte signatures; a [`PublicKey`] says which algorithm checks them.
//!
//! * [`FileSigner`]: a key in a PKCS#8 PEM file (or a raw Ed25519 seed in hex/base64).
//! * [`Pkcs11Signer`]: a key on a PKCS#11 token, used through `CKM_EDDSA` or `CKM_ECDSA`.
//! * [`KeyConfig`]: where a key is, as configuration files name it.
//! * [`PublicKey`]: reading, writing and checking public keys; [`key_id`] names them.
//!
//! This crate is a leaf: it knows nothing of events or streams.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

mod file;
mod pkcs11;
mod public;

#[cfg(test)]
mod tests;

pub use file::FileSigner;
pub use pkcs11::{Pkcs11Config, Pkcs11Signer, DEFAULT_MODULE as DEFAULT_PKCS11_MODULE};
pub use public::{ecdsa_der, key_id, Algorithm, PublicKey};

/// A key or key text that cannot be used: not a key of a supported algorithm, malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

impl KeyError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        KeyError(message.into())
    }
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

/// Signs with a private key held somewhere (file, PKCS#11 token).
pub trait Signer: Send + Sync {
    /// The public key, with its algorithm and key id.
    fn public_key(&self) -> &PublicKey;
    /// The 64-byte signature of `message`: Ed25519, or P-256 ECDSA over its SHA-256 as
    /// `r || s`.
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError>;
    /// Stable id of the key carried with signatures, so verifiers pick the right public key
    /// ([`key_id`] of the public key).
    fn key_id(&self) -> &str {
        self.public_key().key_id()
    }
    /// The key's algorithm.
    fn algorithm(&self) -> Algorithm {
        self.public_key().algorithm()
    }
}

/// Where a signing key is, as configuration files write it: `{key_file: PATH}` or
/// `{pkcs11: {token_label: ..., key_label: ..., pin_file: ...}}`, exactly one of the two.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "KeyFields", into = "KeyFields")]
pub enum KeyConfig {
    /// A key file (PKCS#8 PEM: `chorus keys new --file`, `openssl genpkey`).
    KeyFile(PathBuf),
    /// A key held by a PKCS#11 token (SoftHSM2, an HSM).
    Pkcs11(Pkcs11Config),
}

/// The form [`KeyConfig`] is written in: a map with one of two keys, the same in YAML, JSON
/// and every serde format (an enum would be a YAML tag).
#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct KeyFields {
    /// A key file (PKCS#8 PEM). Give this or `pkcs11`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_file: Option<PathBuf>,
    /// A key held by a PKCS#11 token. Give this or `key_file`.
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
    /// A key as one string, for command lines: a file path, or an RFC 7512 PKCS#11 URI
    /// `pkcs11:token=<label>;object=<key label>[;slot-id=<n>][?pin-source=<file>|pin-value=<pin>|pin-env=<VAR>][&module-path=<so>]`
    /// (`pin-env` is ours; without any PIN attribute the PIN comes from `CHORUS_PKCS11_PIN`).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let Some(uri) = text.strip_prefix("pkcs11:") else {
            return Ok(KeyConfig::KeyFile(PathBuf::from(text)));
        };
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let mut config = Pkcs11Config {
            module: PathBuf::from(DEFAULT_PKCS11_MODULE),
            slot: None,
            token_label: None,
            pin: None,
            pin_file: None,
            pin_env: None,
            key_label: String::new(),
        };
        let decode =
            |v: &str| percent_decode(v).ok_or_else(|| KeyError::new(format!("pkcs11 URI: bad escape in {v:?}")));
        for attribute in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| KeyError::new(format!("pkcs11 URI: {attribute:?} is not name=value")))?;
            let value = decode(value)?;
            match name {
                "token" => config.token_label = Some(value),
                "object" => config.key_label = value,
                "slot-id" => {
                    config.slot =
                        Some(value.parse().map_err(|_| KeyError::new(format!("pkcs11 URI: slot-id {value:?}")))?)
                }
                // Attributes that narrow the match but that Chorus does not need.
                "type" | "manufacturer" | "model" | "serial" | "library-description" | "library-manufacturer" => {}
                other => return Err(KeyError::new(format!("pkcs11 URI: unknown attribute {other:?}"))),
            }
        }
        for attribute in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attribute
                .split_once('=')
                .ok_or_else(|| KeyError::new(format!("pkcs11 URI: {attribute:?} is not name=value")))?;
            let value = decode(value)?;
            match name {
                "pin-source" => config.pin_file = Some(PathBuf::from(value.strip_prefix("file:").unwrap_or(&value))),
                "pin-value" => config.pin = Some(value),
                "pin-env" => config.pin_env = Some(value),
                "module-path" => config.module = PathBuf::from(value),
                other => return Err(KeyError::new(format!("pkcs11 URI: unknown query attribute {other:?}"))),
            }
        }
        if config.key_label.is_empty() {
            return Err(KeyError::new("pkcs11 URI: object=<key label> is required"));
        }
        if config.pin.is_none() && config.pin_file.is_none() && config.pin_env.is_none() {
            config.pin_env = Some("CHORUS_PKCS11_PIN".into());
        }
        Ok(KeyConfig::Pkcs11(config))
    }

    /// Opens the key: reads the file, or logs in to the token.
    pub fn open(&self) -> Result<Arc<dyn Signer>, SignError> {
        Ok(match self {
            KeyConfig::KeyFile(path) => Arc::new(FileSigner::load(path)?),
            KeyConfig::Pkcs11(config) => Arc::new(Pkcs11Signer::open(config)?),
        })
    }
}

/// `%XX` escapes of an RFC 7512 URI value.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
