//! Signatures of events and RPC requests.
//!
//! A [`Signer`] signs bytes with an Ed25519 key that the caller may not be able to read:
//! a key file on disk, or a key held by a PKCS#11 token (HSM, SoftHSM2) that never leaves it.
//! Consumers verify with the public keys they trust and dead-letter forged or unsigned
//! events with the reason.
//!
//! * [`Ed25519FileSigner`]: a key in a PKCS#8 PEM file (or a raw seed in hex/base64).
//! * [`Pkcs11Signer`]: a key on a PKCS#11 token, used through `CKM_EDDSA`.
//!
//! [`sign_record`] (or [`EventRecord::signed`](crate::EventRecord::signed)) signs any event
//! record, RPC request records included, into the CloudEvents extensions `sigkey` and `sig`;
//! [`Verifier::verify`] checks one against trusted public keys.
//!
//! # What is signed
//!
//! The Ed25519 signature covers [`signing_bytes`]: the record's CloudEvents JSON as
//! [`EventRecord::encode`](crate::EventRecord::encode) writes it **with the `sigkey` and `sig` extensions left off**,
//! re-serialized with the keys of every JSON object sorted (byte-wise), no whitespace, and
//! strings and numbers as `serde_json` writes them. That is every CloudEvents attribute
//! (`specversion`, `id`, `type`, `source`, `subject`, `time`, `datacontenttype`), the
//! extensions `seq` and `site`, and the whole `data` document.
//!
//! RPC request *envelopes* as published to nodes are signed differently, by the AAA service
//! (`chorus_producers::aaa`): over the request document alone, with the signature in the
//! envelope's `signature` field; [`Verifier`] checks those too ([`Verifier::verify_bytes`]).
//!
//! Since `decode(encode(r)) == r`, a verifier that decodes the bytes it received and
//! recomputes [`signing_bytes`] gets exactly the bytes the producer signed, whatever order
//! the JSON keys arrived in. Sorting the keys makes the signed form independent of whether a
//! build keeps JSON maps in insertion order (`serde_json/preserve_order`).
//!
//! The signature is carried as two CloudEvents extensions: `sigkey` (the signer's
//! [`key_id`]) and `sig` (the 64 signature bytes in standard base64).
//!
//! `site` is special: the replicator stamps `site` on events that have none when it copies
//! them between sites. A record signed **without** a site therefore still verifies after a
//! site has been added (the verifier tries the record as signed, then without `site`); a
//! record signed **with** a site cannot have it changed.
//!
//! Key ids are [`key_id`]: the first 16 bytes of the SHA-256 of the 32-byte public key, in
//! lowercase hex (32 characters).

use sha2::{Digest, Sha256};

mod event;
mod file;
mod pkcs11;
mod verify;

#[cfg(test)]
mod tests;

pub use event::{canonical_json, sign_record, signing_bytes};
pub use file::{parse_public_key, public_key_pem, read_public_key_file, Ed25519FileSigner};
pub use pkcs11::{Pkcs11Config, Pkcs11Signer, DEFAULT_MODULE as DEFAULT_PKCS11_MODULE};
pub use verify::{TrustError, Verifier, VerifyError};

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
