//! Checking signed events: signed by a key, that key bound by a trusted issuer's node
//! credential to the node the event is about.

use std::sync::Arc;

use base64::Engine as _;
use chorus_identity::{Issuers, Role};

use super::event::signing_bytes;
use crate::envelope::{Event, EventRecord};

/// Why a record was not accepted as signed by the node it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The record carries no signature.
    #[error("event is not signed")]
    Unsigned,
    /// Signed, but without the credential that says whose key it is.
    #[error("event signed by key {0} carries no credential (sigcred)")]
    NoCredential(String),
    /// The credential was refused (untrusted issuer, expired at the event's time, forged,
    /// not a node credential, malformed).
    #[error("event credential refused ({code}): {reason}")]
    Credential {
        /// The credential error's code (`unknown_issuer`, `credential_expired`, ...).
        code: &'static str,
        /// Why.
        reason: String,
    },
    /// The credential is for another key than the one that signed.
    #[error("event signed by key {key_id} with a credential for key {credential_key}")]
    KeyMismatch {
        /// Key id in `sigkey`.
        key_id: String,
        /// Key id the credential binds.
        credential_key: String,
    },
    /// The key belongs to another node than the one the event claims.
    #[error("event about {claimed:?} signed by the key of {credential:?}")]
    WrongIdentity {
        /// The identity the event claims.
        claimed: String,
        /// The identity the credential binds the key to.
        credential: String,
    },
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
            VerifyError::NoCredential(_) => "no_credential",
            VerifyError::Credential { code, .. } => code,
            VerifyError::KeyMismatch { .. } => "key_mismatch",
            VerifyError::WrongIdentity { .. } => "wrong_identity",
            VerifyError::Malformed { .. } => "malformed_signature",
            VerifyError::BadSignature(_) => "bad_signature",
        }
    }
}

/// Checks signed events against trusted issuers: a record is accepted when its `sigcred`
/// is a node credential of a trusted issuer, valid at the event's time, for the key that
/// signed it, and for the node the event is about. So a node key cannot sign another
/// node's events, and an old event stays verifiable after its credential expired.
#[derive(Clone, Debug)]
pub struct Verifier {
    issuers: Arc<Issuers>,
}

/// Who signed an accepted record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// Id of the signing key.
    pub key_id: String,
    /// The node identity the credential binds the key to.
    pub identity: String,
}

impl Verifier {
    /// A verifier trusting the credentials `issuers` signed.
    pub fn new(issuers: Arc<Issuers>) -> Self {
        Verifier { issuers }
    }

    /// The trusted issuers.
    pub fn issuers(&self) -> &Arc<Issuers> {
        &self.issuers
    }

    /// Checks that `record` is signed by the node it is about (see the type documentation
    /// and [`crate::signature`] for what is signed).
    ///
    /// An RPC request record is about its caller's host (`senderid`) but recorded by the
    /// node that received it, so it needs a valid node credential without naming that node.
    pub fn verify(&self, record: &EventRecord) -> Result<Signed, VerifyError> {
        let signature = record.signature.as_ref().ok_or(VerifyError::Unsigned)?;
        let id = signature.key_id.as_str();
        let token = signature.credential.as_deref().ok_or_else(|| VerifyError::NoCredential(clip(id)))?;
        let credential = self
            .issuers
            .verify(token, Role::Node, record.time.timestamp())
            .map_err(|e| VerifyError::Credential { code: e.code(), reason: e.to_string() })?;
        let key = credential.public_key();
        if key.key_id() != id {
            return Err(VerifyError::KeyMismatch { key_id: clip(id), credential_key: key.key_id().to_owned() });
        }
        if !matches!(record.data, Event::RpcRequest(_)) && credential.subject() != record.subject {
            return Err(VerifyError::WrongIdentity {
                claimed: clip(&record.subject),
                credential: credential.subject().to_owned(),
            });
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(signature.sig.as_bytes())
            .map_err(|e| VerifyError::Malformed { key_id: id.to_owned(), reason: format!("not base64: {e}") })?;
        if bytes.len() != 64 {
            return Err(VerifyError::Malformed {
                key_id: id.to_owned(),
                reason: format!("{} bytes, expected 64", bytes.len()),
            });
        }
        let signed = Signed { key_id: id.to_owned(), identity: credential.subject().to_owned() };
        if key.verify(&signing_bytes(record), &bytes) {
            return Ok(signed);
        }
        // Signed before a replicator stamped the site (see the module documentation).
        if record.site.is_some() {
            let mut unsited = record.clone();
            unsited.site = None;
            if key.verify(&signing_bytes(&unsited), &bytes) {
                return Ok(signed);
            }
        }
        Err(VerifyError::BadSignature(id.to_owned()))
    }
}

/// Key ids and identities come from the wire: bound what is quoted back.
fn clip(text: &str) -> String {
    crate::util::clip(text, crate::util::CLIP)
}
