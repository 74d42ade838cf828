//! Signing an [`EventRecord`] (any event, including RPC request records).
//!
//! See the [module documentation](super) for what exactly is signed.

use base64::Engine as _;
use serde_json::Value;

use crate::envelope::{EventRecord, EventSignature};
use chorus_keys::{SignError, Signer};

/// The bytes a signature of `record` covers (see [What is signed](super#what-is-signed)).
/// The record's own `signature` is ignored.
pub fn signing_bytes(record: &EventRecord) -> Vec<u8> {
    let mut unsigned = record.clone();
    unsigned.signature = None;
    canonical(&unsigned.encode())
}

/// `encode()` output re-serialized with sorted keys.
fn canonical(encoded: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<Value>(encoded) {
        Ok(value) => {
            let mut out = Vec::with_capacity(encoded.len());
            write_sorted(&value, &mut out);
            out
        }
        // encode() always writes JSON; keep a defined result regardless.
        Err(_) => encoded.to_vec(),
    }
}

/// `value` as compact JSON with object keys sorted (bytewise) at every level: the canonical
/// form signatures cover, so a document re-serialized by another JSON library (or another
/// key order) still verifies. Used for events here and for RPC requests by the AAA signer.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_sorted(value, &mut out);
    out
}

fn write_sorted(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("writing to a Vec never fails");
                out.push(b':');
                write_sorted(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("writing to a Vec never fails"),
    }
}

/// Signs `record` with `signer`, setting its `signature` (replacing any previous one).
pub fn sign_record(record: &mut EventRecord, signer: &dyn Signer) -> Result<(), SignError> {
    let signature = signer.sign(&signing_bytes(record))?;
    record.signature = Some(EventSignature {
        key_id: signer.key_id().to_owned(),
        sig: base64::engine::general_purpose::STANDARD.encode(signature),
    });
    Ok(())
}

impl EventRecord {
    /// This record signed by `signer` (see [`crate::signature`] for what is signed).
    pub fn signed(mut self, signer: &dyn Signer) -> Result<Self, SignError> {
        sign_record(&mut self, signer)?;
        Ok(self)
    }
}
