//! Signatures of events and RPC requests.
//!
//! Producers sign with any [`chorus_keys::Signer`] (a key file or a PKCS#11 token).
//! Consumers verify with the public keys they trust and dead-letter forged or unsigned
//! events with the reason.
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
//! (`chorus-aaa`, through `chorus_rpc::signed`): over the request document alone, with the signature in the
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
//! Key ids are [`chorus_keys::key_id`]: the first 16 bytes of the SHA-256 of the 32-byte
//! public key, in lowercase hex (32 characters).

mod event;
mod verify;

#[cfg(test)]
mod tests;

pub use event::{canonical_json, sign_record, signing_bytes};
pub use verify::{TrustError, Verifier, VerifyError};
