//! Compact JWS (RFC 7515) signed and checked with Chorus keys: `EdDSA` (RFC 8037) for
//! Ed25519 keys, `ES256` (RFC 7518) for P-256 keys.
//!
//! Written here rather than taken from a JWT crate because signing must go through the
//! [`Signer`] contract (keys on PKCS#11 tokens never leave them) and checking through the
//! same [`PublicKey`] code every other Chorus signature uses. The algorithm is never taken
//! from the token: it is the trusted key's, and a header naming another one is refused, so
//! `alg: none` and algorithm-confusion tokens cannot pass.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chorus_keys::{PublicKey, SignError, Signer};
use serde::{Deserialize, Serialize};

/// Longest token accepted, in bytes: a credential is well under 2 KiB; anything near this
/// is an attack on the parser.
pub const MAX_TOKEN: usize = 16 * 1024;

/// Why a token is not a well-formed, correctly signed JWS.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Not three base64url parts with a JSON header, or too long.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names an algorithm other than the key's, or critical extensions.
    #[error("token algorithm refused: {0}")]
    Algorithm(String),
    /// The signature does not verify with the key.
    #[error("token signature does not verify")]
    BadSignature,
}

/// The protected header of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// `EdDSA` or `ES256`.
    pub alg: String,
    /// `JWT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    /// Key id of the signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Critical extensions: none are understood, so any is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<serde_json::Value>,
}

/// Signs `claims` with `signer`: `base64url(header).base64url(claims).base64url(signature)`,
/// the header naming the key's algorithm and id.
pub fn sign<C: Serialize>(signer: &dyn Signer, claims: &C) -> Result<String, SignError> {
    let header = Header {
        alg: signer.algorithm().jws().to_string(),
        typ: Some("JWT".into()),
        kid: Some(signer.key_id().to_string()),
        crit: None,
    };
    let mut token = format!("{}.{}", b64_json(&header)?, b64_json(claims)?);
    let signature = signer.sign(token.as_bytes())?;
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    Ok(token)
}

/// A token split into its parts, nothing checked but the form.
#[derive(Debug)]
pub struct Parsed<'t> {
    /// The header.
    pub header: Header,
    /// The claims as JSON bytes.
    pub claims: Vec<u8>,
    signed: &'t str,
    signature: Vec<u8>,
}

impl Parsed<'_> {
    /// Checks the signature with `key`, and that the header names `key`'s algorithm.
    pub fn verify(&self, key: &PublicKey) -> Result<(), JwsError> {
        if self.header.alg != key.algorithm().jws() {
            return Err(JwsError::Algorithm(format!(
                "header says {:?}, the key is {}",
                clip(&self.header.alg),
                key.algorithm().jws()
            )));
        }
        if key.verify(self.signed.as_bytes(), &self.signature) {
            Ok(())
        } else {
            Err(JwsError::BadSignature)
        }
    }
}

/// Splits and decodes `token` without checking its signature.
pub fn parse(token: &str) -> Result<Parsed<'_>, JwsError> {
    if token.len() > MAX_TOKEN {
        return Err(JwsError::Malformed(format!("{} bytes, more than {MAX_TOKEN}", token.len())));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwsError::Malformed("expected header.claims.signature".into()));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD.decode(part).map_err(|e| JwsError::Malformed(format!("{what} is not base64url: {e}")))
    };
    let header: Header = serde_json::from_slice(&decode(h, "header")?)
        .map_err(|e| JwsError::Malformed(format!("header is not a JWS header: {e}")))?;
    if header.crit.is_some() {
        return Err(JwsError::Algorithm("critical header extensions are not supported".into()));
    }
    let claims = decode(c, "claims")?;
    let signature = decode(s, "signature")?;
    Ok(Parsed { header, claims, signed: &token[..h.len() + 1 + c.len()], signature })
}

fn clip(text: &str) -> String {
    text.chars().take(40).collect()
}

fn b64_json<T: Serialize>(value: &T) -> Result<String, SignError> {
    let json = serde_json::to_vec(value).map_err(|e| SignError::Failed(format!("encoding token claims: {e}")))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}
