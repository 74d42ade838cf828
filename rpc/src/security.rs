//! The node side of caller identity: who sent a request, checked before anything runs.
//!
//! With [`RequestSecurity`] a node runs only requests that pass, in this order:
//!
//! 1. signed (`unsigned`, `malformed_signature`);
//! 2. with a client credential of a trusted issuer, valid now (`no_credential`,
//!    `unknown_issuer`, `credential_expired`, `bad_credential_signature`, ...): the
//!    caller's own, or a delegator's carrying the delegator right (`not_delegator`);
//! 3. signed by the key that credential is for (`key_mismatch`, `bad_signature`);
//! 4. for the caller id the credential binds, unless a delegator signed (`caller_mismatch`);
//! 5. within the credential's limits: tenant, collectives, `agent.action` patterns
//!    (`wrong_tenant`, `collective_not_allowed`, `agent_not_allowed`);
//! 6. asking for no longer a TTL than the node allows (`ttl_too_long`), so a captured
//!    request cannot be replayed for long;
//! 7. answered on the caller's own reply subjects (`reply_subject_not_bound`), so a
//!    captured request cannot be pointed at another inbox;
//! 8. and, per node, not seen before within its TTL (`replayed`, [`RequestSecurity::first`]).
//!
//! Every refusal is recorded by the server as an audit event with its code and reason.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_identity::{reply_token, Issuers, Role};
use chorus_schemas::RpcRequest;

use crate::signed::{parse_signature, request_signing_bytes, RequestEnvelope};

/// Longest TTL a node accepts by default: long enough for a slow fleet-wide batch, short
/// enough that a captured request is useless soon.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(300);

/// The refusal of a request that asks for replies on a subject not bound to its caller.
pub const REPLY_SUBJECT_NOT_BOUND: &str = "reply_subject_not_bound";

/// Why a request was refused: a stable code and a reason for the audit record and reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stable snake_case name (see the module documentation).
    pub code: &'static str,
    /// What exactly was wrong.
    pub reason: String,
}

impl Refusal {
    fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Refusal { code, reason: reason.into() }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

/// Who a request proved to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller id, bound to the signing key (or vouched for by the delegator).
    pub callerid: String,
    /// Id of the key that signed.
    pub key_id: String,
    /// The delegator that signed for the caller, if one did.
    pub delegator: Option<String>,
}

/// Checks requests for a node (or every node a server hosts); see the module documentation.
pub struct RequestSecurity {
    issuers: Arc<Issuers>,
    max_ttl: u64,
    tenant: Option<String>,
    seen: Mutex<Seen>,
}

impl RequestSecurity {
    /// Requests must carry credentials of `issuers`; TTLs up to [`DEFAULT_MAX_TTL`].
    pub fn new(issuers: Arc<Issuers>) -> Self {
        RequestSecurity { issuers, max_ttl: DEFAULT_MAX_TTL.as_secs(), tenant: None, seen: Mutex::new(Seen::default()) }
    }

    /// Refuses requests asking for a TTL above `max_ttl`.
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl.as_secs().max(1);
        self
    }

    /// The node's tenant: callers whose credential names another tenant are refused.
    pub fn with_tenant(mut self, tenant: Option<String>) -> Self {
        self.tenant = tenant;
        self
    }

    /// The trusted issuers.
    pub fn issuers(&self) -> &Arc<Issuers> {
        &self.issuers
    }

    /// The longest TTL accepted, seconds.
    pub fn max_ttl(&self) -> u64 {
        self.max_ttl
    }

    /// Steps 1 to 7: who sent `envelope`, which arrived asking for replies on `reply_to`,
    /// checked at `now` (Unix seconds).
    pub fn authenticate(
        &self,
        envelope: &RequestEnvelope,
        reply_to: Option<&str>,
        now: i64,
    ) -> Result<Caller, Refusal> {
        let request = &envelope.request;
        let text =
            envelope.signature.as_deref().ok_or_else(|| Refusal::new("unsigned", "the request is not signed"))?;
        let (key_id, signature) = parse_signature(text)
            .map_err(|e| Refusal::new("malformed_signature", format!("request signature: {e}")))?;
        let (token, delegated) = match (&envelope.delegator, &envelope.caller) {
            (Some(token), _) => (token, true),
            (None, Some(token)) => (token, false),
            (None, None) => return Err(Refusal::new("no_credential", "the request carries no credential")),
        };
        let whose = if delegated { "delegator credential" } else { "caller credential" };
        let credential = self
            .issuers
            .verify(token, Role::Client, now)
            .map_err(|e| Refusal::new(e.code(), format!("{whose} refused: {e}")))?;
        if delegated && !credential.claims().delegator {
            return Err(Refusal::new(
                "not_delegator",
                format!("{:?} signed for {:?} without the delegator right", credential.subject(), request.callerid),
            ));
        }
        if credential.public_key().key_id() != key_id {
            return Err(Refusal::new(
                "key_mismatch",
                format!("signed by key {key_id:.40} but the {whose} is for key {}", credential.public_key().key_id()),
            ));
        }
        if !credential.public_key().verify(&request_signing_bytes(request), &signature) {
            return Err(Refusal::new("bad_signature", "the request signature does not verify (tampered or forged)"));
        }
        if !delegated && credential.subject() != request.callerid {
            return Err(Refusal::new(
                "caller_mismatch",
                format!("callerid {:?} is not the credential's {:?}", request.callerid, credential.subject()),
            ));
        }
        let claims = credential.claims();
        if let (Some(ours), Some(theirs)) = (&self.tenant, &claims.tenant) {
            if ours != theirs {
                return Err(Refusal::new("wrong_tenant", format!("caller of tenant {theirs:?}, node of {ours:?}")));
            }
        }
        if !credential.allows_collective(&request.collective) {
            return Err(Refusal::new(
                "collective_not_allowed",
                format!("collective {:?} is outside the {whose} ({:?})", request.collective, claims.collectives),
            ));
        }
        if !credential.allows_agent(&request.agent, &request.action) {
            return Err(Refusal::new(
                "agent_not_allowed",
                format!("{}.{} is outside the {whose} ({:?})", request.agent, request.action, claims.agents),
            ));
        }
        if request.ttl > self.max_ttl {
            return Err(Refusal::new(
                "ttl_too_long",
                format!("ttl {}s exceeds this node's maximum of {}s", request.ttl, self.max_ttl),
            ));
        }
        if let Some(reply_to) = reply_to {
            let own = format!("{}.reply.{}.", request.collective, reply_token(&request.callerid));
            if !reply_to.starts_with(&own) {
                return Err(Refusal::new(
                    REPLY_SUBJECT_NOT_BOUND,
                    format!("replies for {:?} must go to {own}*, not {reply_to:.80}", request.callerid),
                ));
            }
        }
        Ok(Caller {
            callerid: request.callerid.clone(),
            key_id: key_id.to_string(),
            delegator: delegated.then(|| credential.subject().to_string()),
        })
    }

    /// Step 8: whether this is the first time `node` (a server-wide node number) sees
    /// `request` within its TTL; remembers it either way. A request runs once per node,
    /// however often it is sent and whether it came broadcast or directed.
    pub fn first(&self, request: &RpcRequest, node: u64, now: i64) -> bool {
        let ttl = i64::try_from(request.ttl).unwrap_or(i64::MAX).min(self.max_ttl as i64);
        // Kept past the TTL window (and the clock skew it allows either side).
        let expires = request.time.saturating_add(ttl).saturating_add(ttl).max(now);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.purge(now);
        seen.first(&request.requestid, expires, node)
    }
}

impl std::fmt::Debug for RequestSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSecurity")
            .field("issuers", &self.issuers)
            .field("max_ttl", &self.max_ttl)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// Request ids seen within their TTL window, and by which nodes.
#[derive(Default)]
struct Seen {
    requests: HashMap<String, (i64, HashSet<u64>)>,
    /// Request ids in arrival order with their expiry, for purging.
    order: VecDeque<(i64, String)>,
}

impl Seen {
    fn first(&mut self, requestid: &str, expires: i64, node: u64) -> bool {
        if let Some((_, nodes)) = self.requests.get_mut(requestid) {
            return nodes.insert(node);
        }
        self.requests.insert(requestid.to_string(), (expires, HashSet::from([node])));
        self.order.push_back((expires, requestid.to_string()));
        true
    }

    fn purge(&mut self, now: i64) {
        while let Some((expires, _)) = self.order.front() {
            if *expires >= now {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front exists");
            self.requests.remove(&id);
        }
    }
}
