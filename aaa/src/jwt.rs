//! Short-lived caller tokens: EdDSA (Ed25519) JWTs.
//!
//! Tokens are *signed* through the [`Signer`] trait, so the token key may live in a file or
//! on a PKCS#11 token like any other Chorus key, and *verified* with the `jsonwebtoken`
//! crate against the public key (algorithm pinned to EdDSA, issuer, `exp` and `nbf`
//! checked, `exp` required).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chorus_keys::Signer;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::users::User;
use crate::AaaError;

/// `purpose` claim of Chorus caller tokens (Choria uses `choria_client_id`).
pub const PURPOSE: &str = "chorus_client_id";

/// What a caller token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the caller id.
    pub sub: String,
    /// Caller id requests are made as (`up=alice`); equal to `sub`.
    pub callerid: String,
    /// Tenant of the caller.
    pub tenant: String,
    /// Collectives the caller may address (all within `tenant`).
    pub collectives: Vec<String>,
    /// Allowed `agent.action` patterns (`agent.*`, `*`).
    pub agents: Vec<String>,
    /// Token purpose, [`PURPOSE`].
    pub purpose: String,
    /// Issuer (the AAA service's configured name).
    pub iss: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds.
    pub nbf: i64,
    /// Expires, Unix seconds.
    pub exp: i64,
    /// Unique token id, recorded with every decision made on this token.
    pub jti: String,
    /// The user's properties.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user_properties: BTreeMap<String, String>,
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// The signature does not verify with the service's key.
    #[error("token signature invalid")]
    BadSignature,
    /// Valid for longer than the service allows.
    #[error("token validity of {0}s exceeds the maximum of {1}s")]
    TooLong(i64, i64),
    /// Anything else: malformed, wrong algorithm, wrong issuer or purpose, missing claims.
    #[error("token invalid: {0}")]
    Invalid(String),
}

/// Issues tokens signed by a [`Signer`] and verifies them with its public key.
pub struct TokenAuthority {
    signer: Arc<dyn Signer>,
    decoding: DecodingKey,
    issuer: String,
    validity: Duration,
    max_validity: Duration,
    leeway: Duration,
}

impl TokenAuthority {
    /// Tokens issued by `issuer`, valid `validity` (tokens presented with a longer lifetime
    /// than `max_validity` are refused), `leeway` of clock skew tolerated on `exp`/`nbf`.
    pub fn new(
        signer: Arc<dyn Signer>,
        issuer: impl Into<String>,
        validity: Duration,
        max_validity: Duration,
        leeway: Duration,
    ) -> Self {
        let decoding = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(signer.public_key()))
            .expect("a base64url Ed25519 public key is always accepted");
        TokenAuthority {
            signer,
            decoding,
            issuer: issuer.into(),
            validity,
            max_validity: max_validity.max(validity),
            leeway,
        }
    }

    /// How long new tokens are valid.
    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// The key id of the token key.
    pub fn key_id(&self) -> &str {
        self.signer.key_id()
    }

    /// The token key's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signer.public_key()
    }

    /// The claims of a token for `user`, issued at `now` (Unix seconds).
    pub fn claims_for(&self, user: &User, tenant_collectives: &[String], now: i64) -> Claims {
        let collectives =
            if user.collectives.is_empty() { tenant_collectives.to_vec() } else { user.collectives.clone() };
        Claims {
            sub: user.callerid.clone(),
            callerid: user.callerid.clone(),
            tenant: user.tenant.clone(),
            collectives,
            agents: user.agents.clone(),
            purpose: PURPOSE.into(),
            iss: self.issuer.clone(),
            iat: now,
            nbf: now,
            exp: now + self.validity.as_secs() as i64,
            jti: uuid::Uuid::now_v7().to_string(),
            user_properties: user.properties.clone(),
        }
    }

    /// Encodes and signs `claims` as a compact JWS (`header.payload.signature`).
    pub fn sign(&self, claims: &Claims) -> Result<String, AaaError> {
        let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": self.signer.key_id()});
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
        );
        let signature = self.signer.sign(token.as_bytes())?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(token)
    }

    /// Checks signature, algorithm, issuer, purpose, `exp`, `nbf` and the lifetime.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iat", "nbf", "iss", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidSignature => TokenError::BadSignature,
            _ => TokenError::Invalid(e.to_string()),
        })?;
        let claims = data.claims;
        if claims.purpose != PURPOSE {
            return Err(TokenError::Invalid(format!("purpose {:?} is not {PURPOSE}", claims.purpose)));
        }
        if claims.sub != claims.callerid {
            return Err(TokenError::Invalid("sub and callerid differ".into()));
        }
        let lifetime = claims.exp - claims.iat;
        let max = self.max_validity.as_secs() as i64;
        if lifetime > max {
            return Err(TokenError::TooLong(lifetime, max));
        }
        Ok(claims)
    }
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthority")
            .field("key_id", &self.signer.key_id())
            .field("issuer", &self.issuer)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_keys::Ed25519FileSigner;

    fn authority() -> TokenAuthority {
        TokenAuthority::new(
            Arc::new(Ed25519FileSigner::random()),
            "chorus-aaa",
            Duration::from_secs(3600),
            Duration::from_secs(86400),
            Duration::ZERO,
        )
    }

    fn alice() -> User {
        User {
            username: "alice".into(),
            password_hash: String::new(),
            callerid: "up=alice".into(),
            tenant: "acme".into(),
            collectives: vec![],
            agents: vec!["rpcutil.*".into()],
            properties: [("team".to_string(), "web".to_string())].into(),
        }
    }

    #[test]
    fn issued_tokens_verify_and_carry_the_claims() {
        let a = authority();
        let now = chrono::Utc::now().timestamp();
        let claims = a.claims_for(&alice(), &["acme".into()], now);
        let token = a.sign(&claims).unwrap();
        let back = a.verify(&token).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.collectives, ["acme"]);
        assert_eq!(back.exp - back.iat, 3600);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "EdDSA");
    }

    #[test]
    fn expired_forged_and_foreign_tokens_are_refused() {
        let a = authority();
        let now = chrono::Utc::now().timestamp();
        let old = a.claims_for(&alice(), &["acme".into()], now - 7200);
        assert_eq!(a.verify(&a.sign(&old).unwrap()), Err(TokenError::Expired));

        let other = authority();
        let foreign = other.sign(&other.claims_for(&alice(), &["acme".into()], now)).unwrap();
        assert_eq!(a.verify(&foreign), Err(TokenError::BadSignature));

        // Claims changed after signing.
        let token = a.sign(&a.claims_for(&alice(), &["acme".into()], now)).unwrap();
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        claims["agents"] = serde_json::json!(["*"]);
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        assert_eq!(a.verify(&parts.join(".")), Err(TokenError::BadSignature));

        let mut long = a.claims_for(&alice(), &["acme".into()], now);
        long.exp = now + 7 * 86400;
        assert!(matches!(a.verify(&a.sign(&long).unwrap()), Err(TokenError::TooLong(..))));

        let mut purpose = a.claims_for(&alice(), &["acme".into()], now);
        purpose.purpose = "something_else".into();
        assert!(matches!(a.verify(&a.sign(&purpose).unwrap()), Err(TokenError::Invalid(_))));
        assert!(matches!(a.verify("not.a.token"), Err(TokenError::Invalid(_))));
    }
}
