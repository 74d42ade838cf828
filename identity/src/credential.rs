//! Credentials: an issuer's signed statement that a public key speaks for a caller id (a
//! client credential) or for a node identity (a node credential), within limits, until a
//! time. They are compact JWS tokens (JWTs), so they travel as one string beside what the
//! key signs, and any JWT tool can read them.
//!
//! ```json
//! {"purpose": "chorus_client", "sub": "up=alice", "public_key": "ed25519:…",
//!  "tenant": "acme", "collectives": ["acme"], "agents": ["rpcutil.*", "puppet.status"],
//!  "iss": "<issuer key id>", "iat": 1764500000, "nbf": 1764500000, "exp": 1767092000,
//!  "jti": "0193…"}
//! ```
//!
//! Unknown claims are refused: a verifier that does not understand a limit must not skip it.

use std::fmt;
use std::time::Duration;

use chorus_keys::{PublicKey, Signer};
use serde::{Deserialize, Serialize};

use crate::{jws, CredentialError};

/// What a credential lets its key do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Make RPC requests as a caller id (`chorus rpc`, the provisioner, the AAA signer).
    #[serde(rename = "chorus_client")]
    Client,
    /// Be a node: answer requests and publish events as a node identity.
    #[serde(rename = "chorus_node")]
    Node,
}

impl Role {
    /// `client` or `node`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Node => "node",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The claims of a credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Client or node.
    pub purpose: Role,
    /// The caller id (`up=alice`, `choria=provisioner`) or the node identity (its FQDN).
    pub sub: String,
    /// The key the credential is for: only signatures by this key speak for `sub`.
    pub public_key: PublicKey,
    /// The tenant the holder belongs to, if the fleet has tenants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Collectives the holder may address (client) or serve in (node); empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collectives: Vec<String>,
    /// Client: the `agent.action` patterns it may call (`*`, `agent.*`, `agent.action`);
    /// an empty list allows nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Client: may sign requests on behalf of other callers (the AAA signer). Without it a
    /// key speaks only for its own caller id.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delegator: bool,
    /// Key id of the issuer key that signed the credential.
    pub iss: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not valid before, Unix seconds.
    pub nbf: i64,
    /// Not valid after, Unix seconds.
    pub exp: i64,
    /// Unique id of this credential.
    pub jti: String,
}

/// What to put in a new credential (see [`Credential::issue`]).
#[derive(Clone, Debug)]
pub struct CredentialSpec {
    /// Client or node.
    pub role: Role,
    /// Caller id or node identity.
    pub subject: String,
    /// The holder's public key.
    pub public_key: PublicKey,
    /// Tenant, if any.
    pub tenant: Option<String>,
    /// Collectives; empty means all.
    pub collectives: Vec<String>,
    /// Client: allowed `agent.action` patterns.
    pub agents: Vec<String>,
    /// Client: may sign for other callers.
    pub delegator: bool,
    /// How long from issue it is valid.
    pub validity: Duration,
}

impl CredentialSpec {
    /// A client credential for `callerid`'s key, allowed every agent, valid `validity`.
    pub fn client(callerid: impl Into<String>, public_key: PublicKey, validity: Duration) -> Self {
        CredentialSpec {
            role: Role::Client,
            subject: callerid.into(),
            public_key,
            tenant: None,
            collectives: Vec::new(),
            agents: vec!["*".into()],
            delegator: false,
            validity,
        }
    }

    /// A node credential for `identity`'s key, valid `validity`.
    pub fn node(identity: impl Into<String>, public_key: PublicKey, validity: Duration) -> Self {
        CredentialSpec {
            role: Role::Node,
            subject: identity.into(),
            public_key,
            tenant: None,
            collectives: Vec::new(),
            agents: Vec::new(),
            delegator: false,
            validity,
        }
    }

    /// Checks what no credential may hold.
    fn check(&self) -> Result<(), CredentialError> {
        let bad = |m: String| Err(CredentialError::Malformed(m));
        if self.subject.is_empty() || self.subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad(format!("subject {:?} must be non-empty without white space", self.subject));
        }
        if self.role == Role::Client && !self.subject.contains('=') {
            return bad(format!("caller id {:?} is not kind=name (e.g. up=alice)", self.subject));
        }
        if self.role == Role::Node && (self.delegator || !self.agents.is_empty()) {
            return bad("a node credential has no agents and is no delegator".into());
        }
        for pattern in &self.agents {
            crate::check_agent_pattern(pattern).map_err(CredentialError::Malformed)?;
        }
        if self.validity.is_zero() {
            return bad("validity must be > 0".into());
        }
        Ok(())
    }
}

/// A credential: the token as issued and its claims.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    token: String,
    claims: Claims,
}

impl Credential {
    /// Issues a credential signed by `issuer`, valid from `now` (Unix seconds).
    pub fn issue(issuer: &dyn Signer, spec: &CredentialSpec, now: i64) -> Result<Self, CredentialError> {
        spec.check()?;
        let validity = i64::try_from(spec.validity.as_secs()).unwrap_or(i64::MAX / 2);
        let claims = Claims {
            purpose: spec.role,
            sub: spec.subject.clone(),
            public_key: spec.public_key.clone(),
            tenant: spec.tenant.clone(),
            collectives: spec.collectives.clone(),
            agents: spec.agents.clone(),
            delegator: spec.delegator,
            iss: issuer.key_id().to_string(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(validity),
            jti: uuid::Uuid::now_v7().to_string(),
        };
        let token = jws::sign(issuer, &claims).map_err(CredentialError::Sign)?;
        Ok(Credential { token, claims })
    }

    /// Reads a credential **without checking who signed it**: for showing one, and as the
    /// first step of [`crate::Issuers::verify`].
    pub fn parse_unverified(token: &str) -> Result<Self, CredentialError> {
        let token = token.trim();
        let parsed = jws::parse(token).map_err(|e| CredentialError::Malformed(e.to_string()))?;
        let claims: Claims =
            serde_json::from_slice(&parsed.claims).map_err(|e| CredentialError::Malformed(format!("claims: {e}")))?;
        Ok(Credential { token: token.to_string(), claims })
    }

    /// Reads a credential file (the token, surrounding white space ignored), unverified.
    pub fn read_file(path: impl AsRef<std::path::Path>) -> Result<Self, CredentialError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| CredentialError::Malformed(format!("reading {}: {e}", path.display())))?;
        Self::parse_unverified(&text).map_err(|e| CredentialError::Malformed(format!("{}: {e}", path.display())))
    }

    /// The token, as it travels.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// Client or node.
    pub fn role(&self) -> Role {
        self.claims.purpose
    }

    /// The caller id or node identity the key speaks for.
    pub fn subject(&self) -> &str {
        &self.claims.sub
    }

    /// The key the credential is for.
    pub fn public_key(&self) -> &PublicKey {
        &self.claims.public_key
    }

    /// Whether the holder may address (client) or serve in (node) `collective`.
    pub fn allows_collective(&self, collective: &str) -> bool {
        self.claims.collectives.is_empty() || self.claims.collectives.iter().any(|c| c == collective)
    }

    /// Whether a client may call `agent.action`.
    pub fn allows_agent(&self, agent: &str, action: &str) -> bool {
        crate::agent_allowed(&self.claims.agents, agent, action)
    }

    /// Whether the credential is valid at `at` (Unix seconds), allowing `leeway` seconds
    /// of clock skew either side.
    pub fn valid_at(&self, at: i64, leeway: i64) -> Result<(), CredentialError> {
        if at.saturating_add(leeway) < self.claims.nbf {
            return Err(CredentialError::NotYetValid { nbf: self.claims.nbf, at });
        }
        if at.saturating_sub(leeway) > self.claims.exp {
            return Err(CredentialError::Expired { exp: self.claims.exp, at });
        }
        Ok(())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("role", &self.claims.purpose)
            .field("sub", &self.claims.sub)
            .field("key_id", &self.claims.public_key.key_id())
            .field("iss", &self.claims.iss)
            .field("exp", &self.claims.exp)
            .finish()
    }
}
