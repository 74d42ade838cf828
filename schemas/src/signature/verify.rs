//! Checking signatures with a set of trusted public keys.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signature, VerifyingKey};

use super::event::signing_bytes;
use crate::envelope::EventRecord;
use chorus_keys::{key_id, read_public_key_file, Signer};

/// Why a record was not accepted as signed by a trusted key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The record carries no signature.
    #[error("event is not signed")]
    Unsigned,
    /// Signed by a key the verifier does not trust (or does not know).
    #[error("event is signed by unknown key {0}")]
    UnknownKey(String),
    /// The `sig` extension is not 64 bytes in base64.
    #[error("event signature by key {key_id} is malformed: {reason}")]
    Malformed {
        /// The key id the record names.
        key_id: String,
        /// What is wrong with the signature text.
        reason: String,
    },
    /// The signature does not match the record: it was changed after signing, or forged.
    #[error("event signature by key {0} does not match the event (tampered or forged)")]
    BadSignature(String),
}

impl VerifyError {
    /// Stable snake_case name of the reason, for metric labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Unsigned => "unsigned",
            VerifyError::UnknownKey(_) => "unknown_key",
            VerifyError::Malformed { .. } => "malformed_signature",
            VerifyError::BadSignature(_) => "bad_signature",
        }
    }
}

/// Why trusted keys could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TrustError(pub String);

/// A set of trusted Ed25519 public keys, by key id.
#[derive(Clone, Default)]
pub struct Verifier {
    keys: BTreeMap<String, VerifyingKey>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.keys.keys().collect::<Vec<_>>()).finish()
    }
}

impl Verifier {
    /// A verifier that trusts no key (every signed record fails with
    /// [`VerifyError::UnknownKey`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `public_key`; returns its key id.
    pub fn trust(&mut self, public_key: &[u8; 32]) -> Result<String, TrustError> {
        let key =
            VerifyingKey::from_bytes(public_key).map_err(|e| TrustError(format!("not an Ed25519 public key: {e}")))?;
        let id = key_id(public_key);
        self.keys.insert(id.clone(), key);
        Ok(id)
    }

    /// Trusts the public key of `signer`.
    pub fn trust_signer(&mut self, signer: &dyn Signer) -> Result<String, TrustError> {
        self.trust(&signer.public_key())
    }

    /// Builder form of [`Verifier::trust`].
    pub fn with_key(mut self, public_key: &[u8; 32]) -> Result<Self, TrustError> {
        self.trust(public_key)?;
        Ok(self)
    }

    /// Trusts the public key in a file (SPKI PEM, or 32 bytes in hex or base64).
    pub fn trust_file(&mut self, path: impl AsRef<Path>) -> Result<String, TrustError> {
        let key = read_public_key_file(path).map_err(TrustError)?;
        self.trust(&key)
    }

    /// Trusts every `*.pem` and `*.pub` file of a directory; returns how many keys it added.
    /// An unreadable or malformed file is an error (a trust directory should not silently
    /// lose a key).
    pub fn trust_dir(&mut self, dir: impl AsRef<Path>) -> Result<usize, TrustError> {
        let dir = dir.as_ref();
        let entries = std::fs::read_dir(dir).map_err(|e| TrustError(format!("reading {}: {e}", dir.display())))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("pem" | "pub")))
            .collect();
        paths.sort();
        for path in &paths {
            self.trust_file(path)?;
        }
        Ok(paths.len())
    }

    /// A verifier trusting every key file listed and every key file in the directories
    /// listed (see [`Verifier::trust_file`] and [`Verifier::trust_dir`]).
    pub fn from_paths<P: AsRef<Path>>(
        files: impl IntoIterator<Item = P>,
        dirs: impl IntoIterator<Item = P>,
    ) -> Result<Self, TrustError> {
        let mut verifier = Verifier::new();
        for file in files {
            verifier.trust_file(file)?;
        }
        for dir in dirs {
            verifier.trust_dir(dir)?;
        }
        Ok(verifier)
    }

    /// Ids of the trusted keys, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks that `record` is signed by a trusted key and unchanged since (see
    /// [`crate::signature`] for what is signed); returns the key id.
    pub fn verify<'r>(&self, record: &'r EventRecord) -> Result<&'r str, VerifyError> {
        let signature = record.signature.as_ref().ok_or(VerifyError::Unsigned)?;
        let id = signature.key_id.as_str();
        let key = self.keys.get(id).ok_or_else(|| VerifyError::UnknownKey(clip(id)))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(signature.sig.as_bytes())
            .map_err(|e| VerifyError::Malformed { key_id: id.to_owned(), reason: format!("not base64: {e}") })?;
        let bytes: [u8; 64] = bytes.as_slice().try_into().map_err(|_| VerifyError::Malformed {
            key_id: id.to_owned(),
            reason: format!("{} bytes, expected 64", bytes.len()),
        })?;
        let sig = Signature::from_bytes(&bytes);
        if key.verify_strict(&signing_bytes(record), &sig).is_ok() {
            return Ok(id);
        }
        // Signed before a replicator stamped the site (see the event module).
        if record.site.is_some() {
            let mut unsited = record.clone();
            unsited.site = None;
            if key.verify_strict(&signing_bytes(&unsited), &sig).is_ok() {
                return Ok(id);
            }
        }
        Err(VerifyError::BadSignature(id.to_owned()))
    }

    /// Checks a raw signature of `message` by the trusted key `key_id`.
    pub fn verify_bytes(&self, key_id: &str, message: &[u8], signature: &[u8; 64]) -> Result<(), VerifyError> {
        let key = self.keys.get(key_id).ok_or_else(|| VerifyError::UnknownKey(clip(key_id)))?;
        key.verify_strict(message, &Signature::from_bytes(signature))
            .map_err(|_| VerifyError::BadSignature(key_id.to_owned()))
    }
}

/// Key ids come from the wire: bound what is quoted back.
fn clip(text: &str) -> String {
    crate::util::clip(text, crate::util::CLIP)
}
