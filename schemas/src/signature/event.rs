//! Signing an [`EventRecord`] (any event, including RPC request records).
//!
//! See the [module documentation](super) for what exactly is signed.

use base64::Engine as _;

use crate::envelope::{EventRecord, EventSignature};
use chorus_identity::canonical_json;
use chorus_keys::{SignError, Signer};

/// The bytes a signature of `record` covers (see [What is signed](super#what-is-signed)).
/// The record's own `signature` (with its credential) is left out.
pub fn signing_bytes(record: &EventRecord) -> Vec<u8> {
    canonical_json(&record.unsigned_value())
}

/// Signs `record` with `signer`, setting its `signature` (replacing any previous one) and
/// carrying `credential`, the signer's node credential, beside it.
pub fn sign_record(record: &mut EventRecord, signer: &dyn Signer, credential: Option<&str>) -> Result<(), SignError> {
    let signature = signer.sign(&signing_bytes(record))?;
    record.signature = Some(EventSignature {
        key_id: signer.key_id().to_owned(),
        sig: base64::engine::general_purpose::STANDARD.encode(signature),
        credential: credential.map(str::to_owned),
    });
    Ok(())
}

impl EventRecord {
    /// This record signed by `signer`, with the signer's `credential` (see
    /// [`crate::signature`] for what is signed).
    pub fn signed(mut self, signer: &dyn Signer, credential: Option<&str>) -> Result<Self, SignError> {
        sign_record(&mut self, signer, credential)?;
        Ok(self)
    }
}
