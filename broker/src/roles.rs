//! What each component may publish and subscribe to: least privilege per role.

use serde::{Deserialize, Serialize};

/// What a user is for. Permissions are per tenant account, scoped to the tenant's
/// collectives `C` (JetStream API subjects are the account's own):
///
/// | Role | May publish | May subscribe |
/// |---|---|---|
/// | `agent` | `choria.lifecycle.>`, `choria.machine.>`, `choria.registration.>`, `chorus.rpc.request.C.>`, `chorus.rpc.reply.C.>`, `chorus.audit.deny.>`, `chorus.audit.unknown.>`, `C.reply.>`, stream lookups, the keys of the tenant's `node_buckets` ([`node_buckets`]), `_INBOX.>` | `C.broadcast.agent.>`, `C.node.>`, `_INBOX.>` |
/// | `client` | `C.broadcast.agent.>`, `C.node.>`, `_INBOX.>` | `C.reply.<reply token of its caller id>.>`, `_INBOX.>` |
/// | `aaa` | `chorus.audit.>`, stream lookups | `_INBOX.>` |
/// | `consumer` | JetStream reads (stream info, message get, consumers, acks), `chorus.deadletter.>`, key-value keys | `_INBOX.>`, `choria.lifecycle.>`, `choria.machine.>`, `choria.registration.>` |
/// | `reactor` | as `consumer`, and `chorus.reactor.>`, and a client's requests | as `consumer`, and the replies to its caller id |
/// | `replicator` | the JetStream API except stream deletion, acks and flow control, every event subject, key-value buckets | `_INBOX.>` |
/// | `admin` | `>` | `>` |
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A node agent (or the simulator): publishes its events and RPC replies, receives
    /// requests for its collectives.
    Agent,
    /// An RPC caller (`chorus rpc`): sends requests to its collectives, reads the replies
    /// to its own caller id only.
    Client,
    /// The AAA service: publishes audit records.
    Aaa,
    /// Projections and exporters: read streams through durable consumers, dead-letter.
    Consumer,
    /// The reactor (`chorus react`): reads streams like a consumer, records its reactions,
    /// and sends RPC requests as its caller id.
    Reactor,
    /// The stream replicator: reads and writes streams.
    Replicator,
    /// Operators and provisioning: everything in the tenant's account.
    Admin,
}

impl Role {
    /// Lower-case name, as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Client => "client",
            Role::Aaa => "aaa",
            Role::Consumer => "consumer",
            Role::Reactor => "reactor",
            Role::Replicator => "replicator",
            Role::Admin => "admin",
        }
    }
}

/// Publish and subscribe permissions of one user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the user may publish to.
    pub publish_allow: Vec<String>,
    /// Subjects the user may not publish to even when `publish_allow` matches.
    pub publish_deny: Vec<String>,
    /// Subjects the user may subscribe to.
    pub subscribe_allow: Vec<String>,
    /// Subjects the user may not subscribe to even when `subscribe_allow` matches.
    pub subscribe_deny: Vec<String>,
}

/// Stream lookups a publisher needs to tell "no stream for this subject" from a hiccup.
const STREAM_LOOKUP: &[&str] = &["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.>"];

/// Key-value buckets (JetStream KV, ADR-8), all of the account's: reading and writing keys,
/// which elections, governors and the replicator's checkpoints use. Reads are direct gets of
/// a key's last value, whose API subject names the key's `$KV.` subject, so this grants no
/// read of other streams. Buckets are made by an admin (`chorus governor add`, `chorus kv`,
/// or the first run of a service with an admin user): no role but the admin and the
/// replicator may make streams, since a stream on another subject would read it.
const KEY_VALUE: &[&str] = &["$KV.>", "$JS.API.DIRECT.GET.*.$KV.>"];

/// What an agent may use of the key-value buckets the tenant lists for its nodes
/// (`node_buckets`: governors' `GOVERNOR_<name>` and `CHORUS_GOVERNORS`, the buckets of `kv`
/// watchers): keys of those buckets only, so a node cannot take over an election or
/// rewrite another service's state. (NATS wildcards are whole tokens: buckets are named
/// one by one.)
pub fn node_buckets(buckets: &[String]) -> Vec<String> {
    buckets.iter().flat_map(|b| [format!("$KV.{b}.>"), format!("$JS.API.DIRECT.GET.KV_{b}.$KV.{b}.>")]).collect()
}

/// The permissions of `role` for a tenant with `collectives`; a client's replies are those
/// of `callerid` only.
pub fn permissions(role: Role, collectives: &[String], callerid: Option<&str>) -> Permissions {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let per = |pattern: &str| collectives.iter().map(|c| pattern.replace("{c}", c)).collect::<Vec<_>>();
    let mut p = Permissions::default();
    match role {
        Role::Agent => {
            p.publish_allow = s(&["choria.lifecycle.>", "choria.machine.>", "choria.registration.>"]);
            p.publish_allow.extend(per("chorus.rpc.request.{c}.>"));
            p.publish_allow.extend(per("chorus.rpc.reply.{c}.>"));
            p.publish_allow.extend(per("{c}.reply.>"));
            // Refusals of requests, and policy lines that cannot be used, are audited.
            p.publish_allow.extend(s(&["chorus.audit.deny.>", "chorus.audit.unknown.>"]));
            p.publish_allow.extend(s(STREAM_LOOKUP));
            // The RPC transport's flush is an echo through the connection's own inbox.
            p.publish_allow.push("_INBOX.>".into());
            p.subscribe_allow = per("{c}.broadcast.agent.>");
            p.subscribe_allow.extend(per("{c}.node.>"));
            p.subscribe_allow.push("_INBOX.>".into());
        }
        Role::Client => {
            p.publish_allow = per("{c}.broadcast.agent.>");
            p.publish_allow.extend(per("{c}.node.>"));
            p.publish_allow.push("_INBOX.>".into());
            // Private replies: only this caller's reply subjects (validated: clients name one).
            let token = chorus_identity::reply_token(callerid.unwrap_or_default());
            p.subscribe_allow = per(&format!("{{c}}.reply.{token}.>"));
            p.subscribe_allow.push("_INBOX.>".into());
        }
        Role::Aaa => {
            p.publish_allow = s(&["chorus.audit.>"]);
            p.publish_allow.extend(s(STREAM_LOOKUP));
            p.subscribe_allow = s(&["_INBOX.>"]);
        }
        Role::Consumer | Role::Reactor => {
            p.publish_allow = s(STREAM_LOOKUP);
            p.publish_allow.extend(s(&[
                "$JS.API.STREAM.LIST",
                "$JS.API.STREAM.MSG.GET.>",
                "$JS.API.DIRECT.GET.>",
                "$JS.API.CONSUMER.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                "chorus.deadletter.>",
            ]));
            p.publish_allow.extend(s(KEY_VALUE));
            p.subscribe_allow = s(&["_INBOX.>", "choria.lifecycle.>", "choria.machine.>", "choria.registration.>"]);
            if role == Role::Reactor {
                // Its records, and RPC actions as its caller id, whose replies only it reads.
                p.publish_allow.push("chorus.reactor.>".into());
                let client = permissions(Role::Client, collectives, callerid);
                p.publish_allow.extend(client.publish_allow);
                p.subscribe_allow.extend(client.subscribe_allow.into_iter().filter(|x| x != "_INBOX.>"));
            }
        }
        Role::Replicator => {
            p.publish_allow = s(&["$JS.API.>", "$JS.ACK.>", "$JS.FC.>"]);
            // Every event subject: the platform streams' filters.
            let events = chorus_schemas::subject::streams();
            p.publish_allow.extend(events.iter().flat_map(|(_, subjects)| s(subjects)));
            p.publish_allow.push("$KV.>".into());
            p.publish_deny = s(&["$JS.API.STREAM.DELETE.>"]);
            p.subscribe_allow = s(&["_INBOX.>"]);
        }
        Role::Admin => {
            p.publish_allow = s(&[">"]);
            p.subscribe_allow = s(&[">"]);
        }
    }
    p
}

/// The permissions of `role` on a connection from outside the client networks: Choria's
/// "node only" — whatever the role, it cannot send requests or read replies.
pub fn node_only(role: Role, collectives: &[String], callerid: Option<&str>) -> Permissions {
    let mut p = permissions(role, collectives, callerid);
    let per = |pattern: &str| collectives.iter().map(|c| pattern.replace("{c}", c)).collect::<Vec<_>>();
    p.publish_deny.extend(per("{c}.broadcast.>"));
    p.publish_deny.extend(per("{c}.node.>"));
    p.subscribe_deny.extend(per("{c}.reply.>"));
    p
}
