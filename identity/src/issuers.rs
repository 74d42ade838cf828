//! The issuers a component trusts, and checking credentials against them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chorus_keys::PublicKey;

use crate::credential::{Claims, Credential, Role};
use crate::{jws, CredentialError};

/// Clock skew tolerated on a credential's `nbf` and `exp`, in seconds.
pub const DEFAULT_LEEWAY: i64 = 30;

/// Credentials whose signature was checked, kept so a node or client seeing the same
/// credential again (every request of a caller, every reply of a node) pays only a lookup.
const CACHE_LIMIT: usize = 200_000;

/// The issuer public keys a component trusts, by key id. A credential is accepted only when
/// one of them signed it.
pub struct Issuers {
    keys: BTreeMap<String, PublicKey>,
    leeway: i64,
    verified: Mutex<HashMap<String, Arc<Credential>>>,
}

impl Issuers {
    /// Trusts no issuer: every credential is refused.
    pub fn new() -> Self {
        Issuers { keys: BTreeMap::new(), leeway: DEFAULT_LEEWAY, verified: Mutex::new(HashMap::new()) }
    }

    /// Trusts the issuer key `key`; returns its key id.
    pub fn trust(&mut self, key: PublicKey) -> String {
        let id = key.key_id().to_string();
        self.keys.insert(id.clone(), key);
        self.forget();
        id
    }

    /// Builder form of [`Issuers::trust`].
    pub fn with(mut self, key: PublicKey) -> Self {
        self.trust(key);
        self
    }

    /// Trusts the issuer public key in `path` (a file), or every `*.pem` and `*.pub` file
    /// of `path` (a directory). An unreadable or malformed file is an error: a trust
    /// directory must not silently lose a key.
    pub fn trust_path(&mut self, path: impl AsRef<Path>) -> Result<usize, CredentialError> {
        let path = path.as_ref();
        let unreadable = |e: &dyn std::fmt::Display| CredentialError::Trust(format!("{}: {e}", path.display()));
        if path.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(|e| unreadable(&e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("pem" | "pub")))
                .collect();
            files.sort();
            for file in &files {
                self.trust(PublicKey::read_file(file).map_err(|e| CredentialError::Trust(e.to_string()))?);
            }
            Ok(files.len())
        } else {
            self.trust(PublicKey::read_file(path).map_err(|e| CredentialError::Trust(e.to_string()))?);
            Ok(1)
        }
    }

    /// Issuers from files and directories (see [`Issuers::trust_path`]).
    pub fn from_paths<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Result<Self, CredentialError> {
        let mut issuers = Issuers::new();
        for path in paths {
            issuers.trust_path(path)?;
        }
        Ok(issuers)
    }

    /// Tolerates `seconds` of clock skew on `nbf`/`exp` (default [`DEFAULT_LEEWAY`]).
    pub fn with_leeway(mut self, seconds: i64) -> Self {
        self.leeway = seconds.max(0);
        self
    }

    /// Whether no issuer is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Ids of the trusted issuer keys, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks `token`: signed by a trusted issuer, for `role`, valid at `at` (Unix seconds:
    /// now for a request or reply, the event's time for an event). Returns the credential.
    pub fn verify(&self, token: &str, role: Role, at: i64) -> Result<Arc<Credential>, CredentialError> {
        let credential = self.signed(token)?;
        if credential.role() != role {
            return Err(CredentialError::WrongRole { expected: role, found: credential.role() });
        }
        credential.valid_at(at, self.leeway)?;
        Ok(credential)
    }

    /// The credential in `token` if a trusted issuer signed it (time and role unchecked).
    fn signed(&self, token: &str) -> Result<Arc<Credential>, CredentialError> {
        let token = token.trim();
        if let Some(hit) = self.cache().get(token) {
            return Ok(hit.clone());
        }
        let parsed = jws::parse(token).map_err(|e| CredentialError::Malformed(e.to_string()))?;
        let kid = parsed.header.kid.clone().unwrap_or_default();
        let key = self.keys.get(&kid).ok_or_else(|| CredentialError::UnknownIssuer(clip(&kid)))?;
        parsed.verify(key).map_err(|e| match e {
            jws::JwsError::BadSignature => CredentialError::BadSignature,
            other => CredentialError::Malformed(other.to_string()),
        })?;
        let claims: Claims =
            serde_json::from_slice(&parsed.claims).map_err(|e| CredentialError::Malformed(format!("claims: {e}")))?;
        if claims.iss != kid {
            return Err(CredentialError::Malformed("iss is not the signing key's id".into()));
        }
        let credential = Arc::new(Credential::parse_unverified(token)?);
        let mut cache = self.cache();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(token.to_string(), credential.clone());
        Ok(credential)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Credential>>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget(&self) {
        self.cache().clear();
    }
}

impl Default for Issuers {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for Issuers {
    fn clone(&self) -> Self {
        Issuers { keys: self.keys.clone(), leeway: self.leeway, verified: Mutex::new(HashMap::new()) }
    }
}

impl std::fmt::Debug for Issuers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuers").field("keys", &self.keys.keys().collect::<Vec<_>>()).finish()
    }
}

/// Ids come from the wire: bound what is quoted back.
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}
