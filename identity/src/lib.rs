//! Chorus identities: who may speak for whom.
//!
//! Choria's security rests on one invariant, which Chorus holds and extends: *a request is
//! signed by its caller, and the caller id is bound to that key*. An **issuer** (the
//! organisation's key, in a file or on a PKCS#11 token) signs **credentials** that bind a
//! public key to an identity:
//!
//! * a **client credential** binds a key to a caller id, with the agents it may call, its
//!   tenant and collectives, and whether it may sign for other callers (a *delegator*, such
//!   as the AAA signer);
//! * a **node credential** binds a key to a node identity and its collectives, so a node
//!   key cannot sign another node's events or replies.
//!
//! Whoever checks a signature trusts issuers ([`Issuers`]), not keys: the credential that
//! travels with the signature says which key speaks for which identity.
//!
//! * [`credential`]: the credential format and issuing.
//! * [`Identity`]: a key with its credential, what nodes and clients sign with.
//! * [`Issuers`]: trusted issuer keys and checking credentials against them (cached).
//! * [`jws`]: compact JWS over Chorus keys (Ed25519 `EdDSA`, P-256 `ES256`).
//! * [`canonical_json`]: the form every signed document is signed in.
//! * [`agent_allowed`], [`reply_token`]: the rules shared by nodes, clients, the AAA
//!   service and the broker configuration.

use sha2::{Digest, Sha256};

mod canonical;
pub mod credential;
mod holder;
mod issuers;
pub mod jws;

#[cfg(test)]
mod tests;

pub use canonical::{canonical_bytes, canonical_json};
pub use credential::{Claims, Credential, CredentialSpec, Role};
pub use holder::Identity;
pub use issuers::{Issuers, DEFAULT_LEEWAY};

/// Why a credential was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// Not a well-formed credential token.
    #[error("malformed credential: {0}")]
    Malformed(String),
    /// Signed by an issuer key that is not trusted.
    #[error("credential issued by untrusted issuer {0:?}")]
    UnknownIssuer(String),
    /// The issuer's signature does not verify: changed after issue, or forged.
    #[error("credential signature does not verify (tampered or forged)")]
    BadSignature,
    /// A client credential where a node's is needed, or the other way round.
    #[error("a {found} credential where a {expected} credential is needed")]
    WrongRole {
        /// What was needed.
        expected: Role,
        /// What was presented.
        found: Role,
    },
    /// Past its `exp`.
    #[error("credential expired at {exp} (checked at {at})")]
    Expired {
        /// Expiry, Unix seconds.
        exp: i64,
        /// When it was checked.
        at: i64,
    },
    /// Before its `nbf`.
    #[error("credential not valid before {nbf} (checked at {at})")]
    NotYetValid {
        /// Not-before, Unix seconds.
        nbf: i64,
        /// When it was checked.
        at: i64,
    },
    /// Trusted issuer keys could not be read.
    #[error("trusted issuers: {0}")]
    Trust(String),
    /// The issuer key could not sign.
    #[error("issuing: {0}")]
    Sign(#[source] chorus_keys::SignError),
}

impl CredentialError {
    /// Stable snake_case name of the reason, for audit records, metrics and dead letters.
    pub fn code(&self) -> &'static str {
        match self {
            CredentialError::Malformed(_) => "malformed_credential",
            CredentialError::UnknownIssuer(_) => "unknown_issuer",
            CredentialError::BadSignature => "bad_credential_signature",
            CredentialError::WrongRole { .. } => "wrong_credential_role",
            CredentialError::Expired { .. } => "credential_expired",
            CredentialError::NotYetValid { .. } => "credential_not_yet_valid",
            CredentialError::Trust(_) => "untrusted",
            CredentialError::Sign(_) => "signing_failed",
        }
    }
}

/// Whether `agent.action` is allowed by one of `patterns`: `*`, `agent.*` or
/// `agent.action`. No pattern allows nothing.
pub fn agent_allowed(patterns: &[String], agent: &str, action: &str) -> bool {
    patterns.iter().any(|p| match p.split_once('.') {
        _ if p == "*" => true,
        Some((a, "*")) => a == agent,
        Some((a, b)) => a == agent && b == action,
        None => false,
    })
}

/// Checks an agent pattern: `*`, `agent.*` or `agent.action`.
pub fn check_agent_pattern(pattern: &str) -> Result<(), String> {
    if pattern == "*" {
        return Ok(());
    }
    let bad = || format!("{pattern:?} is not agent.action, agent.* or *");
    let (agent, action) = pattern.split_once('.').ok_or_else(bad)?;
    let token_ok = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !token_ok(agent) || !(action == "*" || token_ok(action)) {
        return Err(bad());
    }
    Ok(())
}

/// The token that makes a caller's reply subjects private: replies to `callerid` go to
/// `<collective>.reply.<reply_token>.<unique>`, and the broker lets only that caller's
/// connections subscribe there. Lowercase hex of the first 16 bytes of the SHA-256 of the
/// caller id (subject-safe whatever the caller id holds).
pub fn reply_token(callerid: &str) -> String {
    Sha256::digest(callerid.as_bytes())[..16].iter().map(|b| format!("{b:02x}")).collect()
}
