//! Short-lived caller tokens: JWTs bound to the caller's own key.
//!
//! A token is issued at login for the public key the client proved it holds, and every
//! signing call must be signed by that key: a stolen token alone signs nothing (proof of
//! possession). Tokens are signed through the [`Signer`] trait, so the token key may live in
//! a file or on a PKCS#11 token (Ed25519 `EdDSA` or P-256 `ES256`), and carry the key id in
//! their header: the service checks them against its current key and the previous keys it
//! still accepts, so the token key can be rotated while issued tokens run out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_identity::jws;
use chorus_keys::{PublicKey, Signer};
use serde::{Deserialize, Serialize};

use crate::users::User;
use crate::AaaError;

/// `purpose` claim of Chorus caller tokens (Choria uses `choria_client_id`).
pub const PURPOSE: &str = "chorus_client_id";

/// What a caller token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Subject: the caller id.
    pub sub: String,
    /// Caller id requests are made as (`up=alice`); equal to `sub`.
    pub callerid: String,
    /// The user's login name, looked up again at every signing call (a deleted or
    /// disabled user is refused at once).
    pub username: String,
    /// Tenant of the caller.
    pub tenant: String,
    /// Collectives the caller may address (all within `tenant`).
    pub collectives: Vec<String>,
    /// Allowed `agent.action` patterns (`agent.*`, `*`).
    pub agents: Vec<String>,
    /// The client's key: every signing call must be signed by it.
    pub public_key: PublicKey,
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

impl Claims {
    /// What `token` says, without checking who signed it: for the client holding the token
    /// (e.g. to learn its caller id), never for a decision, which the service makes.
    pub fn read_unverified(token: &str) -> Result<Self, TokenError> {
        let parsed = jws::parse(token.trim()).map_err(|e| TokenError::Invalid(e.to_string()))?;
        serde_json::from_slice(&parsed.claims).map_err(|e| TokenError::Invalid(format!("claims: {e}")))
    }
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
    /// The signature does not verify with the key its header names.
    #[error("token signature invalid")]
    BadSignature,
    /// Signed by a key the service does not (or no longer) accept.
    #[error("token signed by unknown key {0:?}")]
    UnknownKey(String),
    /// Valid for longer than the service allows.
    #[error("token validity of {0}s exceeds the maximum of {1}s")]
    TooLong(i64, i64),
    /// Anything else: malformed, wrong algorithm, wrong issuer or purpose, missing or unknown
    /// claims.
    #[error("token invalid: {0}")]
    Invalid(String),
}

/// Issues tokens signed by a [`Signer`] and verifies them with its public key and the
/// previous keys still accepted.
pub struct TokenAuthority {
    signer: Arc<dyn Signer>,
    keys: BTreeMap<String, PublicKey>,
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
        let keys = BTreeMap::from([(signer.key_id().to_string(), signer.public_key().clone())]);
        TokenAuthority {
            signer,
            keys,
            issuer: issuer.into(),
            validity,
            max_validity: max_validity.max(validity),
            leeway,
        }
    }

    /// Also accepts tokens signed by `keys` (earlier token keys, during a rotation): the
    /// tokens they signed stay valid until they expire.
    pub fn with_previous_keys(mut self, keys: impl IntoIterator<Item = PublicKey>) -> Self {
        for key in keys {
            self.keys.entry(key.key_id().to_string()).or_insert(key);
        }
        self
    }

    /// How long new tokens are valid.
    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// The key that signs new tokens.
    pub fn signer(&self) -> &Arc<dyn Signer> {
        &self.signer
    }

    /// Every key tokens are accepted from, by key id (the current one included).
    pub fn keys(&self) -> &BTreeMap<String, PublicKey> {
        &self.keys
    }

    /// The claims of a token for `user` holding `public_key`, issued at `now` (Unix seconds).
    pub fn claims_for(&self, user: &User, tenant_collectives: &[String], public_key: PublicKey, now: i64) -> Claims {
        let collectives =
            if user.collectives.is_empty() { tenant_collectives.to_vec() } else { user.collectives.clone() };
        Claims {
            sub: user.callerid.clone(),
            callerid: user.callerid.clone(),
            username: user.username.clone(),
            tenant: user.tenant.clone(),
            collectives,
            agents: user.agents.clone(),
            public_key,
            purpose: PURPOSE.into(),
            iss: self.issuer.clone(),
            iat: now,
            nbf: now,
            exp: now + self.validity.as_secs() as i64,
            jti: uuid::Uuid::now_v7().to_string(),
            user_properties: user.properties.clone(),
        }
    }

    /// Encodes and signs `claims` as a compact JWS.
    pub fn sign(&self, claims: &Claims) -> Result<String, AaaError> {
        Ok(jws::sign(self.signer.as_ref(), claims)?)
    }

    /// Checks a token now (see [`TokenAuthority::verify_at`]).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, chrono::Utc::now().timestamp())
    }

    /// Checks the signature (by an accepted key, with that key's algorithm), issuer,
    /// purpose, `exp`, `nbf` and the lifetime, at `now`.
    pub fn verify_at(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let parsed = jws::parse(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let kid = parsed.header.kid.clone().unwrap_or_default();
        let key = self.keys.get(&kid).ok_or_else(|| TokenError::UnknownKey(kid.chars().take(40).collect()))?;
        parsed.verify(key).map_err(|e| match e {
            jws::JwsError::BadSignature => TokenError::BadSignature,
            other => TokenError::Invalid(other.to_string()),
        })?;
        let claims: Claims =
            serde_json::from_slice(&parsed.claims).map_err(|e| TokenError::Invalid(format!("claims: {e}")))?;
        if claims.iss != self.issuer {
            return Err(TokenError::Invalid(format!("issuer {:?} is not {:?}", claims.iss, self.issuer)));
        }
        if claims.purpose != PURPOSE {
            return Err(TokenError::Invalid(format!("purpose {:?} is not {PURPOSE}", claims.purpose)));
        }
        if claims.sub != claims.callerid {
            return Err(TokenError::Invalid("sub and callerid differ".into()));
        }
        let leeway = self.leeway.as_secs() as i64;
        if now - leeway > claims.exp {
            return Err(TokenError::Expired);
        }
        if now + leeway < claims.nbf {
            return Err(TokenError::NotYetValid);
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
            .field("accepted", &self.keys.keys().collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use chorus_keys::{Algorithm, FileSigner};

    fn authority(algorithm: Algorithm) -> TokenAuthority {
        TokenAuthority::new(
            Arc::new(FileSigner::random(algorithm)),
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
            disabled: false,
        }
    }

    fn client_key() -> PublicKey {
        FileSigner::random(Algorithm::Ed25519).public_key().clone()
    }

    #[test]
    fn issued_tokens_verify_and_carry_the_claims() {
        for algorithm in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
            let a = authority(algorithm);
            let now = chrono::Utc::now().timestamp();
            let claims = a.claims_for(&alice(), &["acme".into()], client_key(), now);
            let token = a.sign(&claims).unwrap();
            let back = a.verify(&token).unwrap();
            assert_eq!(back, claims);
            assert_eq!(back.collectives, ["acme"]);
            assert_eq!(back.exp - back.iat, 3600);
            let header = jws::parse(&token).unwrap().header;
            assert_eq!(header.alg, algorithm.jws());
            assert_eq!(header.kid.as_deref(), Some(a.signer().key_id()));
        }
    }

    #[test]
    fn expired_forged_foreign_and_odd_tokens_are_refused() {
        let a = authority(Algorithm::Ed25519);
        let now = chrono::Utc::now().timestamp();
        let claims = |at: i64| a.claims_for(&alice(), &["acme".into()], client_key(), at);
        assert_eq!(a.verify(&a.sign(&claims(now - 7200)).unwrap()), Err(TokenError::Expired));
        assert_eq!(a.verify(&a.sign(&claims(now + 600)).unwrap()), Err(TokenError::NotYetValid));

        let other = authority(Algorithm::Ed25519);
        let foreign = other.sign(&other.claims_for(&alice(), &["acme".into()], client_key(), now)).unwrap();
        assert!(matches!(a.verify(&foreign), Err(TokenError::UnknownKey(_))));

        // Claims changed after signing.
        let token = a.sign(&claims(now)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut body: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        body["agents"] = serde_json::json!(["*"]);
        let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(body.to_string()), parts[2]);
        assert_eq!(a.verify(&forged), Err(TokenError::BadSignature));

        // alg none, an HMAC claim with the public key as secret, a crit header.
        let kid = a.signer().key_id();
        for header in [
            format!(r#"{{"alg":"none","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"EdDSA","kid":"{kid}","crit":["exp"]}}"#),
        ] {
            let t = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(&header), parts[1], parts[2]);
            assert!(matches!(a.verify(&t), Err(TokenError::Invalid(_))), "{header}");
        }

        let mut long = claims(now);
        long.exp = now + 7 * 86400;
        assert!(matches!(a.verify(&a.sign(&long).unwrap()), Err(TokenError::TooLong(..))));
        let mut purpose = claims(now);
        purpose.purpose = "something_else".into();
        assert!(matches!(a.verify(&a.sign(&purpose).unwrap()), Err(TokenError::Invalid(_))));
        let mut sub = claims(now);
        sub.sub = "up=admin".into();
        assert!(matches!(a.verify(&a.sign(&sub).unwrap()), Err(TokenError::Invalid(_))));
        assert!(matches!(a.verify("not.a.token"), Err(TokenError::Invalid(_))));
        assert!(matches!(a.verify(&"x".repeat(20_000)), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn a_rotated_key_keeps_its_tokens_valid_until_they_expire() {
        let old = authority(Algorithm::Ed25519);
        let now = chrono::Utc::now().timestamp();
        let issued = old.sign(&old.claims_for(&alice(), &["acme".into()], client_key(), now)).unwrap();
        let new_key = Arc::new(FileSigner::random(Algorithm::EcdsaP256));
        let rotated = TokenAuthority::new(
            new_key,
            "chorus-aaa",
            Duration::from_secs(3600),
            Duration::from_secs(86400),
            Duration::ZERO,
        );
        assert!(matches!(rotated.verify(&issued), Err(TokenError::UnknownKey(_))));
        let overlap = rotated.with_previous_keys([old.signer().public_key().clone()]);
        assert!(overlap.verify(&issued).is_ok());
        assert!(overlap.verify(&overlap.sign(&overlap.claims_for(&alice(), &[], client_key(), now)).unwrap()).is_ok());
        // Old tokens still expire.
        let late = old.sign(&old.claims_for(&alice(), &["acme".into()], client_key(), now - 7200)).unwrap();
        assert_eq!(overlap.verify(&late), Err(TokenError::Expired));
    }
}
