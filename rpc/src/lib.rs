//! RPC after Choria's MCORPC: a node-side server with agents and a default-deny Action
//! Policy, and a client that fans a request out and gathers the replies.
//!
//! * [`transport`]: how requests and replies move — core NATS ([`NatsTransport`]) or
//!   in-process channels ([`LocalTransport`], so `chorus up` needs no server) — and the
//!   subjects Choria uses.
//! * [`policy`]: Choria's Action Policy and Rego policies; no policy means no access.
//! * [`facts`]: fact and class matching as Choria does it (discovery and policy alike).
//! * [`agents`]: the [`Agent`] trait and the built-in `rpcutil` and `shell` agents.
//! * [`server`]: [`RpcServer`], which hosts one node or tens of thousands of simulated
//!   ones on a handful of subscriptions, and records every request it acts on, and its
//!   reply, as events.
//! * [`client`]: [`RpcClient`], a stream of replies or a collected result with a summary.
//! * [`relay`]: a transport over HTTP, for clients of a platform without a broker.
//! * [`replies`]: `--filter-replies` expressions and DDL aggregate summaries.
//! * [`signed`]: signed requests and replies: what is signed, how it travels.
//! * [`security`]: the node's checks of who sent a request ([`RequestSecurity`]).
//!
//! The wire format is deliberately flat JSON — `{"request": RpcRequest}` out,
//! [`RpcReply`](chorus_schemas::RpcReply) back — rather than Choria's nested base64 layers:
//! the records *are* the protocol, so what is recorded is exactly what was sent. A signature
//! and the signer's credential travel beside the request in [`RequestEnvelope`] and beside
//! the reply in [`ReplyEnvelope`] ([`signed`]).
//!
//! This crate is the protocol both sides share: the node agent and the simulator serve it,
//! the provisioner and the command line call it, the AAA service signs for it. It sits
//! above the platform (requests and replies are recorded as events) and below all of them.

use serde_json::{Map, Value};
use thiserror::Error;

pub mod agents;
pub mod client;
mod compound;
pub mod ddl;
/// JSON and the values of expr, the expression language of compound filters, for other
/// parts that evaluate expressions over documents (the reactor's rules).
pub mod expression {
    pub use crate::compound::{from_json, to_json, Condition};
}
pub mod facts;
mod filter;
pub mod policy;
pub mod relay;
pub mod replies;
pub mod security;
pub mod server;
pub mod signed;
pub mod transport;

#[cfg(test)]
mod tests;

pub use agents::{ActionContext, ActionReply, Agent};
pub use client::{
    CallerSigner, ClientSecurity, RejectedReply, ReplyStream, RequestOptions, RequestSigner, RpcClient, RpcResults,
    RpcSummary, Target,
};
pub use filter::{check_filter, discovery_filter, filter_from_parts, parse_fact_filter, CompiledFilter};
pub use policy::{ActionPolicy, PolicyDecision, PolicySettings, Provider};
pub use security::{Caller, Refusal, RequestSecurity};
pub use server::{RpcServer, ServerOptions, StatsSnapshot};
pub use signed::{ReplyEnvelope, RequestEnvelope};
pub use transport::{LocalTransport, NatsTransport, Subscription, Transport, TransportMessage};

/// What a node is, as its agents, its discovery filter and its Action Policy see it.
///
/// One value per node; a server hosting many simulated nodes holds one per node and
/// nothing else per node but counters, which is what keeps 50,000 of them cheap.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeContext {
    /// The node's identity (usually its FQDN); the directed subject ends with it.
    pub identity: String,
    /// The collective (sub-network) the node listens in.
    pub collective: String,
    /// Facts, matched by discovery filters and policy `fact=value` columns. Nested objects
    /// are reachable by dotted names (`os.family`).
    pub facts: Map<String, Value>,
    /// Configuration-management classes, matched by `cf_class` filters and policy classes.
    pub classes: Vec<String>,
    /// Version of the software the node runs, reported by `rpcutil inventory`.
    pub version: String,
    /// Autonomous agents (machines) the node runs, reported by `rpcutil inventory`.
    pub machines: Vec<String>,
    /// Whether the node is in provisioning mode (Choria's `provision_mode`, seen by Rego
    /// policies).
    pub provision_mode: bool,
}

impl NodeContext {
    /// A node with no facts, classes or machines, running this crate's version.
    pub fn new(identity: impl Into<String>, collective: impl Into<String>) -> Self {
        NodeContext {
            identity: identity.into(),
            collective: collective.into(),
            facts: Map::new(),
            classes: Vec::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            machines: Vec::new(),
            provision_mode: false,
        }
    }

    /// The value of a fact: the key as given, else a dotted path into nested objects.
    pub fn fact(&self, name: &str) -> Option<&Value> {
        if let Some(v) = self.facts.get(name) {
            return Some(v);
        }
        let (first, rest) = name.split_once('.')?;
        at_path(self.facts.get(first)?, rest)
    }
}

/// The value at a dotted path in a JSON document (`os.family`, `disks.0.size`: object keys
/// and array indices), as fact filters and Choria's machine queries read one.
pub fn at_path<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |current, part| match current {
        Value::Object(map) => map.get(part),
        Value::Array(items) => items.get(part.parse::<usize>().ok()?),
        _ => None,
    })
}

/// Errors of the RPC layer. Per-request problems (bad JSON, a denied or failed action) are
/// not errors: they are counted, logged and answered; these are what stops a caller.
#[derive(Debug, Error)]
pub enum RpcError {
    /// The messaging layer failed (connection, subscription, publish).
    #[error("transport: {0}")]
    Transport(String),
    /// A subject that NATS would refuse (empty token, whitespace, wildcard in a publish).
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject {
        /// The subject given.
        subject: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A request could not be encoded.
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
    /// A discovery filter or option the caller gave is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A node was added twice to one server.
    #[error("node {0} is already hosted by this server")]
    DuplicateNode(String),
    /// The request signer (e.g. the AAA service) refused or could not sign the request.
    #[error("request not signed: {0}")]
    Unauthorized(String),
}
