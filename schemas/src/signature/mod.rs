//! Signatures of events, bound to the nodes that produce them.
//!
//! Producers sign with any [`chorus_keys::Signer`] (a key file or a PKCS#11 token, Ed25519
//! or P-256) and carry their node credential beside the signature. Consumers trust issuers
//! ([`chorus_identity::Issuers`]), not keys: [`Verifier::verify`] accepts a record only when
//! a trusted issuer's node credential binds the signing key to the node the record is about,
//! and dead-letters forged, unsigned or misattributed events with the reason.
//!
//! # What is signed
//!
//! The signature covers [`signing_bytes`]: the record's CloudEvents JSON as
//! [`EventRecord::encode`](crate::EventRecord::encode) writes it **with the `sigkey`, `sig`
//! and `sigcred` extensions left off**, re-serialized with the keys of every JSON object
//! sorted (byte-wise), no whitespace ([`chorus_identity::canonical_json`]). That is every
//! CloudEvents attribute (`specversion`, `id`, `type`, `source`, `subject`, `time`,
//! `datacontenttype`), the extensions `seq` and `site`, and the whole `data` document.
//!
//! Since `decode(encode(r)) == r`, a verifier that decodes the bytes it received and
//! recomputes [`signing_bytes`] gets exactly the bytes the producer signed, whatever order
//! the JSON keys arrived in.
//!
//! The signature travels as three CloudEvents extensions: `sigkey` (the signer's key id),
//! `sig` (the 64 signature bytes in standard base64) and `sigcred` (the node credential).
//!
//! `site` is special: the replicator stamps `site` on events that have none when it copies
//! them between sites. A record signed **without** a site therefore still verifies after a
//! site has been added (the verifier tries the record as signed, then without `site`); a
//! record signed **with** a site cannot have it changed.
//!
//! A credential is checked at the event's own `time`, so an archived event stays verifiable
//! after its producer's credential expired, and an event dated outside the credential's
//! validity is refused.

mod event;
mod verify;

#[cfg(test)]
mod tests;

pub use event::{sign_record, signing_bytes};
pub use verify::{Signed, Verifier, VerifyError};
