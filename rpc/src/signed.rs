//! The signed-request envelope: how a request signature is made, carried and checked.
//!
//! The signature covers [`request_signing_bytes`]: the request record's JSON with the keys
//! of every object sorted byte-wise and no whitespace (so the JSON map order of either side
//! does not matter). It travels in the `signature` field of [`RequestEnvelope`] as
//! `<key id>:<base64 signature>`, and the caller's token in `caller_jwt`. A node checks it
//! with [`verify_signed_request`] before its Action Policy runs.
//!
//! This is protocol, not service: the AAA service signs with [`sign_request`], nodes verify,
//! and neither needs the other's crate.

use base64::Engine as _;
use chorus_keys::{SignError, Signer};
use chorus_schemas::signature::{Verifier, VerifyError};
use chorus_schemas::RpcRequest;
use serde::{Deserialize, Serialize};

use crate::transport::RequestEnvelope;

/// A request signed for its caller (by the AAA service, for now).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    /// The request, exactly as signed.
    pub request: RpcRequest,
    /// Key id of the request key.
    pub key_id: String,
    /// Ed25519 signature of [`request_signing_bytes`], standard base64.
    pub signature: String,
    /// Identity of the service that signed.
    pub signer: String,
}

impl SignedRequest {
    /// The envelope a client publishes: signature as `<key id>:<base64>`, token as
    /// `caller_jwt`.
    pub fn into_envelope(self, caller_jwt: Option<String>) -> RequestEnvelope {
        let mut envelope = RequestEnvelope::new(self.request);
        envelope.signature = Some(format!("{}:{}", self.key_id, self.signature));
        envelope.caller_jwt = caller_jwt;
        envelope
    }
}

/// The bytes a request signature covers: the record's JSON, keys sorted, no whitespace.
pub fn request_signing_bytes(request: &RpcRequest) -> Vec<u8> {
    let value = serde_json::to_value(request).expect("request records always serialize");
    chorus_schemas::signature::canonical_json(&value)
}

/// Signs `request` with `key` on behalf of the service `signer`.
pub fn sign_request(request: RpcRequest, key: &dyn Signer, signer: &str) -> Result<SignedRequest, SignError> {
    let signature = key.sign(&request_signing_bytes(&request))?;
    Ok(SignedRequest {
        request,
        key_id: key.key_id().to_string(),
        signature: base64::engine::general_purpose::STANDARD.encode(signature),
        signer: signer.to_string(),
    })
}

/// Checks that `envelope` carries a signature of its request by a key `verifier` trusts
/// (the AAA service's request key); returns the key id.
pub fn verify_signed_request(envelope: &RequestEnvelope, verifier: &Verifier) -> Result<String, VerifyError> {
    let text = envelope.signature.as_deref().ok_or(VerifyError::Unsigned)?;
    let (key_id, sig) = text.split_once(':').ok_or_else(|| VerifyError::Malformed {
        key_id: String::new(),
        reason: "expected <key id>:<base64 signature>".into(),
    })?;
    let malformed = |reason: String| VerifyError::Malformed { key_id: key_id.to_string(), reason };
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(sig).map_err(|e| malformed(format!("not base64: {e}")))?;
    let bytes: [u8; 64] =
        bytes.as_slice().try_into().map_err(|_| malformed(format!("{} bytes, expected 64", bytes.len())))?;
    verifier.verify_bytes(key_id, &request_signing_bytes(&envelope.request), &bytes)?;
    Ok(key_id.to_string())
}
