//! Signed requests and replies: what a signature covers, how it travels, how it is made.
//!
//! A request is signed **by its caller**: the caller's key signs [`request_signing_bytes`]
//! (the request record's JSON with the keys of every object sorted, no whitespace) and the
//! caller's client credential travels beside it, so a node can check that the key speaks
//! for the request's `callerid`. A *delegator* (the AAA signer) may sign instead, carrying
//! its own credential with the delegator right; the node then takes the caller id from the
//! request, vouched for by the delegator.
//!
//! ```json
//! {"request": {…}, "signature": "<key id>:<base64>", "caller": "<client credential>"}
//! {"request": {…}, "signature": "<key id>:<base64>", "delegator": "<delegator credential>"}
//! ```
//!
//! A reply is signed by the node that sends it, with its node credential:
//!
//! ```json
//! {"reply": {…}, "signature": "<key id>:<base64>", "sender": "<node credential>"}
//! ```
//!
//! An unsigned reply (from a node without a key) is the bare reply record, as before.
//! Checking requests is the node's job ([`crate::security`]); checking replies the client's
//! ([`crate::client`]).

use base64::Engine as _;
use chorus_identity::{canonical_bytes, Identity};
use chorus_keys::SignError;
use chorus_schemas::{RpcReply, RpcRequest};
use serde::{Deserialize, Serialize};

/// What travels on a request subject: the request and its authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// The request record, exactly as it will be recorded.
    pub request: RpcRequest,
    /// `<key id>:<base64 signature>` of [`request_signing_bytes`], by the caller's key or a
    /// delegator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The caller's client credential (when the caller signed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The delegator's client credential, with the delegator right (when a delegator such as
    /// the AAA signer signed for the caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegator: Option<String>,
}

impl RequestEnvelope {
    /// An unsigned envelope (for fleets that do not check callers).
    pub fn new(request: RpcRequest) -> Self {
        RequestEnvelope { request, signature: None, caller: None, delegator: None }
    }

    /// `request` signed by its caller, `identity` (whose credential must be for the
    /// request's `callerid`, which nodes check).
    pub fn signed(request: RpcRequest, identity: &Identity) -> Result<Self, SignError> {
        let signature = signature_text(identity, &request_signing_bytes(&request))?;
        Ok(RequestEnvelope {
            request,
            signature: Some(signature),
            caller: Some(identity.token().to_string()),
            delegator: None,
        })
    }

    /// `request` signed for its caller by the delegator `identity` (a credential with the
    /// delegator right).
    pub fn delegated(request: RpcRequest, identity: &Identity) -> Result<Self, SignError> {
        let signature = signature_text(identity, &request_signing_bytes(&request))?;
        Ok(RequestEnvelope {
            request,
            signature: Some(signature),
            caller: None,
            delegator: Some(identity.token().to_string()),
        })
    }
}

/// What travels back on a reply subject from a node with a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyEnvelope {
    /// The reply record, exactly as recorded.
    pub reply: RpcReply,
    /// `<key id>:<base64 signature>` of [`reply_signing_bytes`] by the node's key.
    pub signature: String,
    /// The node's credential.
    pub sender: String,
}

impl ReplyEnvelope {
    /// `reply` signed by the node `identity`.
    pub fn signed(reply: RpcReply, identity: &Identity) -> Result<Self, SignError> {
        let signature = signature_text(identity, &reply_signing_bytes(&reply))?;
        Ok(ReplyEnvelope { reply, signature, sender: identity.token().to_string() })
    }
}

/// The bytes a request signature covers: the record's JSON, keys sorted, no whitespace.
pub fn request_signing_bytes(request: &RpcRequest) -> Vec<u8> {
    canonical_bytes(request).expect("request records always serialize")
}

/// The bytes a reply signature covers: the record's JSON, keys sorted, no whitespace.
pub fn reply_signing_bytes(reply: &RpcReply) -> Vec<u8> {
    canonical_bytes(reply).expect("reply records always serialize")
}

/// `<key id>:<base64 signature of message>`.
fn signature_text(identity: &Identity, message: &[u8]) -> Result<String, SignError> {
    let signature = identity.signer().sign(message)?;
    Ok(format!("{}:{}", identity.signer().key_id(), base64::engine::general_purpose::STANDARD.encode(signature)))
}

/// Splits `<key id>:<base64 signature>` into the key id and the 64 signature bytes.
pub fn parse_signature(text: &str) -> Result<(&str, [u8; 64]), String> {
    let (key_id, sig) = text.split_once(':').ok_or("expected <key id>:<base64 signature>")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(sig).map_err(|e| format!("not base64: {e}"))?;
    let bytes: [u8; 64] = bytes.as_slice().try_into().map_err(|_| format!("{} bytes, expected 64", bytes.len()))?;
    Ok((key_id, bytes))
}
