//! The decisions of the AAA service: login (password → token) and signing (token + request →
//! signed request), each recorded as an [`AuditRecord`] event.
//!
//! # What `sign` checks, in order
//!
//! 1. The token: signature by the service's token key, EdDSA, issuer, purpose, `exp`/`nbf`,
//!    lifetime no longer than `max_validity`.
//! 2. The request is an RPC request record (`io.choria.rpc.v1.request`).
//! 3. Its `callerid` is the token's.
//! 4. Its collective belongs to the token's tenant (the service knows every tenant's
//!    collectives) and is one of the token's collectives.
//! 5. `agent.action` matches one of the token's `agents` patterns.
//! 6. The request is within its TTL (`time - ttl < now < time + ttl`).
//!
//! Allowed requests are signed with the service's request key; the client holds no key.
//! Every decision, allow or deny, with the reason and the token id, is emitted as an audit
//! event **before** the answer is given: if the audit record cannot be stored, an allowed
//! request is not signed (an action nobody can audit is not performed).
//!
//! The signed request's format (what the signature covers, how it travels) is protocol, in
//! `chorus_rpc::signed`, which nodes use to verify it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use chorus_keys::Signer;
use chorus_platform::Emitter;
use chorus_rpc::signed::{sign_request, SignedRequest};
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::{AuditAction, AuditRecord, RpcRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jwt::{Claims, TokenAuthority, TokenError};
use crate::users::{agent_allowed, dummy_hash, verify_password, Users};
use crate::AaaError;

/// Why a request was refused (the `reason` of its audit record is this error's text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// Login with an unknown user or a wrong password (never says which).
    #[error("bad username or password")]
    BadCredentials,
    /// The token was refused.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The request is not an RPC request record.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The request's caller is not the token's.
    #[error("callerid {request:?} does not match the token's {token:?}")]
    CallerMismatch {
        /// Caller id in the request.
        request: String,
        /// Caller id of the token.
        token: String,
    },
    /// The request's collective belongs to another tenant, or to none.
    #[error("wrong tenant: collective {collective:?} {owner}, the token is for tenant {tenant:?}")]
    WrongTenant {
        /// Collective the request addresses.
        collective: String,
        /// Who owns it, as text.
        owner: String,
        /// The token's tenant.
        tenant: String,
    },
    /// The collective is the tenant's but not one the caller may address.
    #[error("collective {0:?} not allowed for this caller")]
    CollectiveNotAllowed(String),
    /// `agent.action` is not in the token's allow list.
    #[error("agent not allowed: {agent}.{action} is not in {allowed:?}")]
    AgentNotAllowed {
        /// Agent requested.
        agent: String,
        /// Action requested.
        action: String,
        /// The token's patterns.
        allowed: Vec<String>,
    },
    /// Outside its TTL window.
    #[error("request expired or from the future: time {time}, ttl {ttl}s, now {now}")]
    Stale {
        /// Request time.
        time: i64,
        /// Request TTL.
        ttl: u64,
        /// Service time.
        now: i64,
    },
}

impl Denial {
    /// Stable snake_case name, for metrics and HTTP error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::BadCredentials => "bad_credentials",
            Denial::Token(TokenError::Expired) => "token_expired",
            Denial::Token(TokenError::NotYetValid) => "token_not_yet_valid",
            Denial::Token(TokenError::BadSignature) => "token_bad_signature",
            Denial::Token(TokenError::TooLong(..)) => "token_too_long",
            Denial::Token(TokenError::Invalid(_)) => "token_invalid",
            Denial::Malformed(_) => "malformed_request",
            Denial::CallerMismatch { .. } => "caller_mismatch",
            Denial::WrongTenant { .. } => "wrong_tenant",
            Denial::CollectiveNotAllowed(_) => "collective_not_allowed",
            Denial::AgentNotAllowed { .. } => "agent_not_allowed",
            Denial::Stale { .. } => "request_stale",
        }
    }
}

/// A successful login.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginGrant {
    /// The caller token (JWT).
    pub token: String,
    /// When it expires, Unix seconds.
    pub expires_at: i64,
    /// The caller id it is for.
    pub callerid: String,
}

/// Outcome of a decision, as returned to the HTTP layer.
#[derive(Debug)]
pub enum Decision<T> {
    /// Allowed (and audited).
    Allow(T),
    /// Denied (and audited, unless the audit itself failed; see `audited`).
    Deny {
        /// Why.
        denial: Denial,
        /// Whether the audit record was stored.
        audited: bool,
    },
}

/// The AAA service's state: users, tenants, keys and the audit emitter.
pub struct AaaService {
    identity: String,
    site: String,
    users: RwLock<Arc<Users>>,
    /// Tenant → its collectives.
    tenants: BTreeMap<String, Vec<String>>,
    tokens: TokenAuthority,
    request_key: Arc<dyn Signer>,
    emitter: Arc<Emitter>,
}

impl AaaService {
    /// A service signing as `identity` at `site`. `tenants` maps each tenant to its
    /// collectives; a collective must belong to exactly one tenant.
    pub fn new(
        identity: impl Into<String>,
        site: impl Into<String>,
        users: Users,
        tenants: BTreeMap<String, Vec<String>>,
        tokens: TokenAuthority,
        request_key: Arc<dyn Signer>,
        emitter: Arc<Emitter>,
    ) -> Result<Self, AaaError> {
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (tenant, collectives) in &tenants {
            for c in collectives {
                if let Some(other) = owner.insert(c, tenant) {
                    return Err(AaaError::config(format!(
                        "collective {c:?} belongs to tenants {other:?} and {tenant:?}"
                    )));
                }
            }
        }
        let service = AaaService {
            identity: identity.into(),
            site: site.into(),
            users: RwLock::new(Arc::new(Users::default())),
            tenants,
            tokens,
            request_key,
            emitter,
        };
        service.replace_users(users)?;
        Ok(service)
    }

    /// Replaces the users (e.g. after the users file changed). Users of unknown tenants, or
    /// with collectives outside their tenant, are refused.
    pub fn replace_users(&self, users: Users) -> Result<(), AaaError> {
        for u in users.iter() {
            let Some(collectives) = self.tenants.get(&u.tenant) else {
                return Err(AaaError::config(format!("user {}: unknown tenant {:?}", u.username, u.tenant)));
            };
            if let Some(c) = u.collectives.iter().find(|c| !collectives.contains(c)) {
                return Err(AaaError::config(format!(
                    "user {}: collective {c:?} is not in tenant {:?}",
                    u.username, u.tenant
                )));
            }
        }
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(users);
        Ok(())
    }

    /// The service's identity (the `signer` and event subject of its audit records).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The token authority (issuing and checking caller tokens).
    pub fn tokens(&self) -> &TokenAuthority {
        &self.tokens
    }

    /// The request key's public side.
    pub fn request_key(&self) -> &Arc<dyn Signer> {
        &self.request_key
    }

    /// Checks a password and issues a token. Both outcomes are audited.
    pub async fn login(&self, username: &str, password: &str) -> Result<Decision<LoginGrant>, AaaError> {
        let users = self.users.read().unwrap_or_else(|p| p.into_inner()).clone();
        let user = users.get(username).cloned();
        let hash = user.as_ref().map_or_else(|| dummy_hash().to_string(), |u| u.password_hash.clone());
        let password = password.to_string();
        let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .map_err(|e| AaaError::PasswordHash(format!("password check: {e}")))?;
        let mut request = JsonObject::new();
        request.insert("action".into(), "login".into());
        request.insert("username".into(), username.into());
        // An unknown user is checked against a dummy hash (same cost) and always refused.
        let user = match (user, matches) {
            (Some(user), true) => user,
            (user, _) => {
                let callerid = user.map_or_else(|| format!("unknown={username}"), |u| u.callerid);
                let denial = Denial::BadCredentials;
                let audited = self.audit(&callerid, AuditAction::Deny, request, Some(&denial), None).await.is_ok();
                return Ok(Decision::Deny { denial, audited });
            }
        };
        let tenant_collectives = self.tenants.get(&user.tenant).cloned().unwrap_or_default();
        let claims = self.tokens.claims_for(&user, &tenant_collectives, now());
        let token = self.tokens.sign(&claims)?;
        request.insert("tenant".into(), user.tenant.clone().into());
        self.audit(&user.callerid, AuditAction::Allow, request, None, Some(&claims.jti)).await?;
        Ok(Decision::Allow(LoginGrant { token, expires_at: claims.exp, callerid: claims.callerid }))
    }

    /// Judges `request` (the RPC request record as JSON) for the holder of `token`, and
    /// signs it when allowed. Both outcomes are audited.
    pub async fn sign(&self, token: &str, request: Value) -> Result<Decision<SignedRequest>, AaaError> {
        let object = match &request {
            Value::Object(o) => o.clone(),
            other => {
                let mut o = JsonObject::new();
                o.insert("invalid_request".into(), other.clone());
                o
            }
        };
        let claimed_caller = object.get("callerid").and_then(Value::as_str).unwrap_or("unknown=unknown").to_string();
        let claims = match self.tokens.verify(token) {
            Ok(c) => c,
            Err(e) => return self.deny(&claimed_caller, object, Denial::Token(e), None).await,
        };
        let parsed = match serde_json::from_value::<RpcRequest>(request) {
            Ok(r) if r.protocol == RpcRequest::PROTOCOL => r,
            Ok(r) => {
                return self
                    .deny(
                        &claims.callerid,
                        object,
                        Denial::Malformed(format!("protocol {:?}", r.protocol)),
                        Some(&claims),
                    )
                    .await
            }
            Err(e) => {
                return self.deny(&claims.callerid, object, Denial::Malformed(e.to_string()), Some(&claims)).await
            }
        };
        if let Err(denial) = self.authorize(&claims, &parsed) {
            return self.deny(&claims.callerid, object, denial, Some(&claims)).await;
        }
        // Audit first: an allowed request whose decision cannot be recorded is not signed.
        self.audit(&claims.callerid, AuditAction::Allow, object, None, Some(&claims.jti)).await?;
        let signed = sign_request(parsed, self.request_key.as_ref(), &self.identity)?;
        Ok(Decision::Allow(signed))
    }

    /// Steps 3 to 6 of the checks (see the module documentation).
    fn authorize(&self, claims: &Claims, request: &RpcRequest) -> Result<(), Denial> {
        if request.callerid != claims.callerid {
            return Err(Denial::CallerMismatch { request: request.callerid.clone(), token: claims.callerid.clone() });
        }
        let owner = self.tenants.iter().find(|(_, cs)| cs.contains(&request.collective)).map(|(t, _)| t.as_str());
        if owner != Some(claims.tenant.as_str()) {
            return Err(Denial::WrongTenant {
                collective: request.collective.clone(),
                owner: match owner {
                    Some(t) => format!("belongs to tenant {t:?}"),
                    None => "belongs to no tenant".into(),
                },
                tenant: claims.tenant.clone(),
            });
        }
        if !claims.collectives.contains(&request.collective) {
            return Err(Denial::CollectiveNotAllowed(request.collective.clone()));
        }
        if !agent_allowed(&claims.agents, &request.agent, &request.action) {
            return Err(Denial::AgentNotAllowed {
                agent: request.agent.clone(),
                action: request.action.clone(),
                allowed: claims.agents.clone(),
            });
        }
        let now = now();
        let ttl = i64::try_from(request.ttl).unwrap_or(i64::MAX);
        if !(request.time.saturating_sub(ttl) < now && now < request.time.saturating_add(ttl)) {
            return Err(Denial::Stale { time: request.time, ttl: request.ttl, now });
        }
        Ok(())
    }

    async fn deny<T>(
        &self,
        callerid: &str,
        request: JsonObject,
        denial: Denial,
        claims: Option<&Claims>,
    ) -> Result<Decision<T>, AaaError> {
        let audited = self
            .audit(callerid, AuditAction::Deny, request, Some(&denial), claims.map(|c| c.jti.as_str()))
            .await
            .is_ok();
        Ok(Decision::Deny { denial, audited })
    }

    async fn audit(
        &self,
        callerid: &str,
        action: AuditAction,
        request: JsonObject,
        denial: Option<&Denial>,
        jti: Option<&str>,
    ) -> Result<(), AaaError> {
        let mut record = AuditRecord::new(self.identity.clone(), self.site.clone(), callerid, action, request);
        record.reason = denial.map(|d| d.to_string());
        record.jti = jti.map(String::from);
        match self.emitter.emit(record).await {
            Ok(_) => {
                tracing::info!(callerid, decision = action.as_str(), reason = denial.map(|d| d.code()), "aaa decision");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, callerid, decision = action.as_str(), "audit record not stored");
                Err(AaaError::Audit(e))
            }
        }
    }
}

impl std::fmt::Debug for AaaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AaaService")
            .field("identity", &self.identity)
            .field("site", &self.site)
            .field("tenants", &self.tenants)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
