//! The decisions of the AAA service: login (password and key → token) and signing (token
//! and a request signed by the caller's key → a request signed for the caller), each
//! recorded as an [`AuditRecord`] with the client's address.
//!
//! # Login
//!
//! 1. Not too many attempts for this user or from this address ([`LoginLimits`]): else
//!    `rate_limited`, without looking at the password.
//! 2. The client proves it holds the key it wants the token bound to: a signature by that
//!    key of [`login_message`], made within the last minute (`bad_proof`).
//! 3. The password (`bad_credentials`, the same for an unknown user), and the user is not
//!    disabled (`user_disabled`).
//!
//! # What `sign` checks, in order
//!
//! 1. The token: signature by the current or a previous token key, issuer, purpose,
//!    `exp`/`nbf`, lifetime no longer than `max_validity`.
//! 2. The user still exists in the users file as it is now, with the same caller id and
//!    not disabled (`user_revoked`): deleting a user takes effect at once.
//! 3. The request is an RPC request record (`io.choria.rpc.v1.request`).
//! 4. It is signed by the key the token is bound to (`bad_proof`): a stolen token alone
//!    signs nothing.
//! 5. Its `callerid` is the token's; its collective belongs to the token's tenant and is
//!    one of the caller's; `agent.action` is allowed by the token and by the user as the
//!    users file says now.
//! 6. It is within its TTL, and its TTL is no longer than `signer.max_ttl` (`ttl_too_long`).
//!
//! Allowed requests are signed by the service's own key, which carries a credential with
//! the delegator right: nodes accept it for the caller. Every decision, allow or deny, with
//! the reason, code, token id and client address, is emitted as an audit event **before**
//! the answer is given: if it cannot be stored, an allowed request is not signed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use chorus_identity::Identity;
use chorus_keys::PublicKey;
use chorus_platform::Emitter;
use chorus_rpc::signed::{parse_signature, request_signing_bytes};
use chorus_rpc::RequestEnvelope;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::{AuditAction, AuditRecord, RpcRequest};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Limit, LoginLimits};
use crate::jwt::{Claims, TokenAuthority, TokenError};
use crate::users::{dummy_hash, verify_password, User, Users};
use crate::AaaError;

/// How old a login proof may be: the client signs the time it logs in at.
pub const LOGIN_WINDOW: i64 = 60;

/// What a client signs to prove it holds the key it logs in with.
pub fn login_message(timestamp: i64, username: &str, public_key: &PublicKey) -> Vec<u8> {
    format!("chorus-aaa-login\n{timestamp}\n{username}\n{}", public_key.to_text()).into_bytes()
}

/// Why a request was refused (the `reason` of its audit record is this error's text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// Login with an unknown user or a wrong password (never says which).
    #[error("bad username or password")]
    BadCredentials,
    /// Too many login attempts for this user or from this address.
    #[error("too many login attempts {0}; try again later")]
    RateLimited(String),
    /// The client did not prove it holds the token's (or the login's) key.
    #[error("proof of possession refused: {0}")]
    BadProof(String),
    /// The user is disabled in the users file.
    #[error("user disabled")]
    UserDisabled,
    /// The token's user was deleted, disabled or changed since the token was issued.
    #[error("token revoked: {0}")]
    UserRevoked(String),
    /// The users file cannot be read as it is now: nothing is signed until it is fixed.
    #[error("users file unusable: {0}")]
    UsersUnavailable(String),
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
    /// `agent.action` is not in the caller's allow list.
    #[error("agent not allowed: {agent}.{action} is not in {allowed:?}")]
    AgentNotAllowed {
        /// Agent requested.
        agent: String,
        /// Action requested.
        action: String,
        /// The caller's patterns.
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
    /// Asks for a longer TTL than the service signs.
    #[error("ttl {ttl}s exceeds the maximum of {max}s")]
    TtlTooLong {
        /// Request TTL.
        ttl: u64,
        /// The maximum.
        max: u64,
    },
}

impl Denial {
    /// Stable snake_case name, for metrics, audit records and HTTP error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::BadCredentials => "bad_credentials",
            Denial::RateLimited(_) => "rate_limited",
            Denial::BadProof(_) => "bad_proof",
            Denial::UserDisabled => "user_disabled",
            Denial::UserRevoked(_) => "user_revoked",
            Denial::UsersUnavailable(_) => "users_unavailable",
            Denial::Token(TokenError::Expired) => "token_expired",
            Denial::Token(TokenError::NotYetValid) => "token_not_yet_valid",
            Denial::Token(TokenError::BadSignature) => "token_bad_signature",
            Denial::Token(TokenError::UnknownKey(_)) => "token_unknown_key",
            Denial::Token(TokenError::TooLong(..)) => "token_too_long",
            Denial::Token(TokenError::Invalid(_)) => "token_invalid",
            Denial::Malformed(_) => "malformed_request",
            Denial::CallerMismatch { .. } => "caller_mismatch",
            Denial::WrongTenant { .. } => "wrong_tenant",
            Denial::CollectiveNotAllowed(_) => "collective_not_allowed",
            Denial::AgentNotAllowed { .. } => "agent_not_allowed",
            Denial::Stale { .. } => "request_stale",
            Denial::TtlTooLong { .. } => "ttl_too_long",
        }
    }
}

/// A login as the client sends it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoginAttempt {
    /// Login name.
    pub username: String,
    /// Password.
    pub password: String,
    /// The client's public key (`<alg>:<base64url>` or SPKI PEM) the token is bound to.
    pub public_key: String,
    /// When the client signed, Unix seconds.
    pub timestamp: i64,
    /// `<key id>:<base64>` signature of [`login_message`] by that key.
    pub signature: String,
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

/// The users as the file says now: read again whenever it changes.
struct UsersState {
    path: Option<PathBuf>,
    /// Modification time, length and inode the file was read at.
    seen: Option<(SystemTime, u64, u64)>,
    users: Result<Arc<Users>, String>,
}

/// The AAA service's state: users, tenants, keys, limits and the audit emitter.
pub struct AaaService {
    identity: String,
    site: String,
    users: Mutex<UsersState>,
    /// Tenant → its collectives.
    tenants: BTreeMap<String, Vec<String>>,
    tokens: TokenAuthority,
    signer: Identity,
    max_ttl: u64,
    per_user: DefaultKeyedRateLimiter<String>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    emitter: Arc<Emitter>,
    stats: DecisionStats,
}

/// Decisions the service recorded, by request kind and outcome, for `/metrics`.
#[derive(Debug, Default)]
pub struct DecisionStats {
    /// [login allowed, login denied, sign allowed, sign denied].
    counts: [std::sync::atomic::AtomicU64; 4],
    /// Decisions whose audit record could not be stored (the caller was refused).
    audit_failures: std::sync::atomic::AtomicU64,
}

impl DecisionStats {
    /// (kind, decision, count) for every kind (`login`, `sign`) and decision (`allow`, `deny`).
    pub fn decisions(&self) -> [(&'static str, &'static str, u64); 4] {
        let n = |i: usize| self.counts[i].load(std::sync::atomic::Ordering::Relaxed);
        [("login", "allow", n(0)), ("login", "deny", n(1)), ("sign", "allow", n(2)), ("sign", "deny", n(3))]
    }

    /// Decisions whose audit record could not be stored.
    pub fn audit_failures(&self) -> u64 {
        self.audit_failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts `decision` of a login (`login`) or a signing request, and hands it on.
    fn count<T>(&self, login: bool, decision: Result<Decision<T>, AaaError>) -> Result<Decision<T>, AaaError> {
        if let Ok(d) = &decision {
            let i = if login { 0 } else { 2 } + usize::from(matches!(d, Decision::Deny { .. }));
            self.counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        decision
    }
}

fn limiter<K: std::hash::Hash + Eq + Clone>(limit: Limit) -> DefaultKeyedRateLimiter<K> {
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    let quota =
        Quota::with_period(limit.every.max(Duration::from_millis(1))).expect("non-zero period").allow_burst(burst);
    RateLimiter::keyed(quota)
}

impl AaaService {
    /// A service signing as `identity` at `site` with `signer` (a key and its delegator
    /// credential). `tenants` maps each tenant to its collectives; a collective must belong
    /// to exactly one tenant.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: impl Into<String>,
        site: impl Into<String>,
        users: Users,
        tenants: BTreeMap<String, Vec<String>>,
        tokens: TokenAuthority,
        signer: Identity,
        limits: &LoginLimits,
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
        if !signer.credential().claims().delegator {
            return Err(AaaError::config(format!(
                "signer.credential: the credential of {:?} has no delegator right; nodes would refuse every \
                 request this service signs",
                signer.subject()
            )));
        }
        let service = AaaService {
            identity: identity.into(),
            site: site.into(),
            users: Mutex::new(UsersState { path: None, seen: None, users: Ok(Arc::new(Users::default())) }),
            tenants,
            tokens,
            signer,
            max_ttl: chorus_rpc::security::DEFAULT_MAX_TTL.as_secs(),
            per_user: limiter(limits.per_user),
            per_address: limiter(limits.per_address),
            emitter,
            stats: DecisionStats::default(),
        };
        service.check_users(&users)?;
        service.state().users = Ok(Arc::new(users));
        Ok(service)
    }

    /// Reads users from `path` again whenever it changes (the users given to
    /// [`AaaService::new`] are replaced at the next decision if the file differs).
    pub fn with_users_file(self, path: PathBuf) -> Self {
        self.state().path = Some(path);
        self
    }

    /// Refuses requests asking for a TTL above `max_ttl`.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl.as_secs().max(1);
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, UsersState> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Users of unknown tenants, or with collectives outside their tenant, are refused.
    fn check_users(&self, users: &Users) -> Result<(), AaaError> {
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
        Ok(())
    }

    /// The users as the file says now; an unusable file is an error until it is fixed
    /// (nothing is signed on the word of a file nobody can read).
    pub fn users(&self) -> Result<Arc<Users>, String> {
        let mut state = self.state();
        let Some(path) = state.path.clone() else { return state.users.clone() };
        let seen = std::fs::metadata(&path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino())
        });
        if seen.is_none() || seen != state.seen {
            state.seen = seen;
            state.users = Users::load(&path)
                .and_then(|users| self.check_users(&users).map(|()| users))
                .map(Arc::new)
                .map_err(|e| e.to_string());
            match &state.users {
                Ok(users) => tracing::info!(file = %path.display(), users = users.len(), "users file read"),
                Err(e) => tracing::error!(file = %path.display(), error = %e, "users file unusable: signing refused"),
            }
        }
        state.users.clone()
    }

    /// The service's identity (the `signer` and event subject of its audit records).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The token authority (issuing and checking caller tokens).
    pub fn tokens(&self) -> &TokenAuthority {
        &self.tokens
    }

    /// Decisions recorded since start.
    pub fn stats(&self) -> &DecisionStats {
        &self.stats
    }

    /// The request signer's key and delegator credential.
    pub fn signer(&self) -> &Identity {
        &self.signer
    }

    /// Checks a login and issues a token bound to the client's key. Every outcome is
    /// audited with `client`, the address the attempt came from.
    pub async fn login(
        &self,
        attempt: LoginAttempt,
        client: Option<SocketAddr>,
    ) -> Result<Decision<LoginGrant>, AaaError> {
        self.stats.count(true, self.judge_login(attempt, client).await)
    }

    async fn judge_login(
        &self,
        attempt: LoginAttempt,
        client: Option<SocketAddr>,
    ) -> Result<Decision<LoginGrant>, AaaError> {
        let LoginAttempt { username, password, public_key, timestamp, signature } = attempt;
        let mut request = JsonObject::new();
        request.insert("action".into(), "login".into());
        request.insert("username".into(), username.as_str().into());
        let unknown = format!("unknown={username}");
        let deny = |callerid: String, denial: Denial, request: JsonObject| async move {
            let audited = self.audit(&callerid, AuditAction::Deny, request, Some(&denial), None, client).await.is_ok();
            Ok(Decision::Deny { denial, audited })
        };
        if self.per_user.check_key(&username).is_err() {
            return deny(unknown, Denial::RateLimited(format!("for user {username:?}")), request).await;
        }
        if let Some(addr) = client {
            if self.per_address.check_key(&addr.ip()).is_err() {
                return deny(unknown, Denial::RateLimited(format!("from {}", addr.ip())), request).await;
            }
        }
        self.forget_idle_limits();
        let users = match self.users() {
            Ok(users) => users,
            Err(e) => return deny(unknown, Denial::UsersUnavailable(e), request).await,
        };
        let key = match PublicKey::parse(&public_key) {
            Ok(key) => key,
            Err(e) => return deny(unknown, Denial::BadProof(format!("public_key: {e}")), request).await,
        };
        request.insert("key_id".into(), key.key_id().into());
        let now = now();
        let fresh = (now - timestamp).abs() <= LOGIN_WINDOW;
        if !fresh || !signed_by(&key, &login_message(timestamp, &username, &key), &signature) {
            let why = if fresh { "the login signature does not verify" } else { "the login timestamp is not recent" };
            return deny(unknown, Denial::BadProof(why.into()), request).await;
        }
        let user = users.get(&username).cloned();
        let hash = user.as_ref().map_or_else(|| dummy_hash().to_string(), |u| u.password_hash.clone());
        let matches = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .map_err(|e| AaaError::PasswordHash(format!("password check: {e}")))?;
        // An unknown user is checked against a dummy hash (same cost) and always refused.
        let user = match (user, matches) {
            (Some(user), true) if user.disabled => {
                return deny(user.callerid.clone(), Denial::UserDisabled, request).await
            }
            (Some(user), true) => user,
            (user, _) => {
                let callerid = user.map_or(unknown, |u| u.callerid);
                return deny(callerid, Denial::BadCredentials, request).await;
            }
        };
        let tenant_collectives = self.tenants.get(&user.tenant).cloned().unwrap_or_default();
        let claims = self.tokens.claims_for(&user, &tenant_collectives, key, now);
        let token = self.tokens.sign(&claims)?;
        request.insert("tenant".into(), user.tenant.clone().into());
        self.audit(&user.callerid, AuditAction::Allow, request, None, Some(&claims.jti), client).await?;
        Ok(Decision::Allow(LoginGrant { token, expires_at: claims.exp, callerid: claims.callerid }))
    }

    /// Judges `request` (the RPC request record as JSON), signed by the caller's key as
    /// `signature`, for the holder of `token`, and signs it for the caller when allowed.
    /// Every outcome is audited with `client`.
    pub async fn sign(
        &self,
        token: &str,
        request: Value,
        signature: Option<&str>,
        client: Option<SocketAddr>,
    ) -> Result<Decision<RequestEnvelope>, AaaError> {
        self.stats.count(false, self.judge_sign(token, request, signature, client).await)
    }

    async fn judge_sign(
        &self,
        token: &str,
        request: Value,
        signature: Option<&str>,
        client: Option<SocketAddr>,
    ) -> Result<Decision<RequestEnvelope>, AaaError> {
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
            Err(e) => return self.deny(&claimed_caller, object, Denial::Token(e), None, client).await,
        };
        let deny = |denial: Denial| self.deny(&claims.callerid, object.clone(), denial, Some(&claims), client);
        let user = match self.users() {
            Err(e) => return deny(Denial::UsersUnavailable(e)).await,
            Ok(users) => match users.get(&claims.username) {
                None => return deny(Denial::UserRevoked(format!("user {:?} no longer exists", claims.username))).await,
                Some(u) if u.disabled => {
                    return deny(Denial::UserRevoked(format!("user {:?} is disabled", u.username))).await
                }
                Some(u) if u.callerid != claims.callerid || u.tenant != claims.tenant => {
                    return deny(Denial::UserRevoked(format!("user {:?} changed since login", u.username))).await
                }
                Some(u) => u.clone(),
            },
        };
        let parsed = match serde_json::from_value::<RpcRequest>(request) {
            Ok(r) if r.protocol == RpcRequest::PROTOCOL => r,
            Ok(r) => return deny(Denial::Malformed(format!("protocol {:?}", r.protocol))).await,
            Err(e) => return deny(Denial::Malformed(e.to_string())).await,
        };
        let proven = signature.is_some_and(|s| signed_by(&claims.public_key, &request_signing_bytes(&parsed), s));
        if !proven {
            let why = if signature.is_none() {
                "the request is not signed"
            } else {
                "the request signature does not verify with the token's key"
            };
            return deny(Denial::BadProof(why.into())).await;
        }
        if let Err(denial) = self.authorize(&claims, &user, &parsed) {
            return deny(denial).await;
        }
        // Audit first: an allowed request whose decision cannot be recorded is not signed.
        self.audit(&claims.callerid, AuditAction::Allow, object, None, Some(&claims.jti), client).await?;
        Ok(Decision::Allow(RequestEnvelope::delegated(parsed, &self.signer)?))
    }

    /// Step 5 and 6 of the checks (see the module documentation).
    fn authorize(&self, claims: &Claims, user: &User, request: &RpcRequest) -> Result<(), Denial> {
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
        let user_collectives_ok = user.collectives.is_empty() || user.collectives.contains(&request.collective);
        if !claims.collectives.contains(&request.collective) || !user_collectives_ok {
            return Err(Denial::CollectiveNotAllowed(request.collective.clone()));
        }
        let (agent, action) = (&request.agent, &request.action);
        for allowed in [&claims.agents, &user.agents] {
            if !chorus_identity::agent_allowed(allowed, agent, action) {
                return Err(Denial::AgentNotAllowed {
                    agent: agent.clone(),
                    action: action.clone(),
                    allowed: allowed.clone(),
                });
            }
        }
        let now = now();
        let ttl = i64::try_from(request.ttl).unwrap_or(i64::MAX);
        if !(request.time.saturating_sub(ttl) < now && now < request.time.saturating_add(ttl)) {
            return Err(Denial::Stale { time: request.time, ttl: request.ttl, now });
        }
        if request.ttl > self.max_ttl {
            return Err(Denial::TtlTooLong { ttl: request.ttl, max: self.max_ttl });
        }
        Ok(())
    }

    /// Limiter entries of users and addresses that have been quiet long enough are
    /// dropped, so a scan of many names does not grow memory without bound.
    fn forget_idle_limits(&self) {
        if self.per_user.len() > 10_000 {
            self.per_user.retain_recent();
        }
        if self.per_address.len() > 10_000 {
            self.per_address.retain_recent();
        }
    }

    async fn deny<T>(
        &self,
        callerid: &str,
        request: JsonObject,
        denial: Denial,
        claims: Option<&Claims>,
        client: Option<SocketAddr>,
    ) -> Result<Decision<T>, AaaError> {
        let audited = self
            .audit(callerid, AuditAction::Deny, request, Some(&denial), claims.map(|c| c.jti.as_str()), client)
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
        client: Option<SocketAddr>,
    ) -> Result<(), AaaError> {
        let mut record = AuditRecord::new(self.identity.clone(), self.site.clone(), callerid, action, request);
        record.reason = denial.map(|d| d.to_string());
        record.code = denial.map(|d| d.code().to_string());
        record.jti = jti.map(String::from);
        record.client = client.map(|c| c.to_string());
        match self.emitter.emit(record).await {
            Ok(_) => {
                tracing::info!(callerid, decision = action.as_str(), reason = denial.map(|d| d.code()), "aaa decision");
                Ok(())
            }
            Err(e) => {
                self.stats.audit_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// Whether `signature` (`<key id>:<base64>`) is `key`'s signature of `message`.
fn signed_by(key: &PublicKey, message: &[u8], signature: &str) -> bool {
    match parse_signature(signature) {
        Ok((key_id, bytes)) => key_id == key.key_id() && key.verify(message, &bytes),
        Err(_) => false,
    }
}

/// `<key id>:<base64>` signature of `message` by `key`: what a client sends.
pub fn signature_of(key: &dyn chorus_keys::Signer, message: &[u8]) -> Result<String, chorus_keys::SignError> {
    Ok(format!("{}:{}", key.key_id(), base64::engine::general_purpose::STANDARD.encode(key.sign(message)?)))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
