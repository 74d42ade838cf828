//! Broker security: a typed description of a multi-tenant Chorus broker, rendered into a
//! `nats-server` configuration (`chorus broker config`) and an nftables snippet.
//!
//! What the generated configuration enforces:
//!
//! * **TLS** on the client port (certificate, key, CA), optionally verifying client
//!   certificates (mutual TLS).
//! * **One NATS account per tenant.** Subjects, streams and consumers of one account are
//!   invisible to every other: nothing is exported or imported between tenant accounts, so
//!   tenant A cannot read tenant B's streams or receive B's messages, and A's publishes never
//!   land in B's streams. Each account has its own JetStream (optionally with limits).
//! * **One user per component** (agent, RPC client, AAA service, replicator, consumers,
//!   admin), with publish and subscribe permissions limited to what that component does, for
//!   the tenant's collectives only (see [`Role`]). Only standard client connections are
//!   allowed with these credentials (no websocket, MQTT or leafnode).
//! * **Passwords as bcrypt hashes**: hashed from the plain text (or a file) in the
//!   description, or given already hashed. The generated file never holds a clear password.
//! * A **system account** for the operators' `$SYS` tooling.
//!
//! What it cannot enforce: nats-server 2.9 has no per-user source-address allow list. The
//! client port is protected by *where it listens* (`listen` on one interface) and by the host
//! firewall: [`BrokerConfig::render_nftables`] writes a rule set that lets only the configured
//! networks reach the client (and monitoring) port. Tenants that must be reachable from
//! different networks get a broker (or a listener address) each. See `docs/SECURITY.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use chorus_runtime::{Config, ConfigError};

/// Results of the broker description: every error is a configuration error naming its field.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// Default bcrypt cost of generated password hashes.
pub const DEFAULT_BCRYPT_COST: u32 = 11;

/// Name of the generated system account.
pub const SYSTEM_ACCOUNT: &str = "SYS";

/// A broker and its tenants (YAML or JSON; unknown keys are refused).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `server_name` of the broker (also its JetStream peer name).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Client listener, `host:port`. Bind to one interface to keep the port off the others.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// HTTP monitoring listener `host:port` (`/varz`, `/healthz`, ...); none when unset.
    #[serde(default)]
    pub monitor: Option<String>,
    /// TLS on the client port. Strongly recommended; without it passwords cross the network
    /// in the clear.
    #[serde(default)]
    pub tls: Option<BrokerTls>,
    /// JetStream storage of the server.
    pub jetstream: BrokerJetStream,
    /// The system account's user, for `$SYS` monitoring and operations.
    #[serde(default)]
    pub system_account: Option<UserSpec>,
    /// Networks allowed to reach the broker, for the nftables rule set.
    #[serde(default)]
    pub firewall: Option<FirewallConfig>,
    /// bcrypt cost (4..=31) of hashes generated from clear passwords.
    #[serde(default = "default_cost")]
    pub bcrypt_cost: u32,
    /// Tenants by name; each is one NATS account of the same name.
    pub tenants: BTreeMap<String, TenantConfig>,
}

fn default_server_name() -> String {
    "chorus-broker".into()
}
fn default_listen() -> String {
    "0.0.0.0:4222".into()
}
fn default_cost() -> u32 {
    DEFAULT_BCRYPT_COST
}

/// TLS files of the client port.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// PEM certificate (chain) of the broker.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA bundle that signs client certificates (needed with `verify_clients`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Require and verify a client certificate signed by `ca_file` (mutual TLS).
    #[serde(default)]
    pub verify_clients: bool,
    /// TLS handshake timeout, seconds.
    #[serde(default = "default_tls_timeout")]
    pub timeout: f64,
}

fn default_tls_timeout() -> f64 {
    2.0
}

/// Server-wide JetStream settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerJetStream {
    /// Where JetStream keeps its data.
    pub store_dir: PathBuf,
    /// Memory storage limit of the server, e.g. `1GB`.
    #[serde(default)]
    pub max_memory: Option<String>,
    /// File storage limit of the server, e.g. `100GB`.
    #[serde(default)]
    pub max_file: Option<String>,
}

/// Which networks may connect (see [`BrokerConfig::render_nftables`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    /// CIDRs (`10.1.0.0/16`, `2001:db8::/32`, or single addresses) allowed to reach the
    /// client port; every other source is refused with a TCP reset.
    pub allowed_clients: Vec<String>,
    /// CIDRs allowed to reach the monitoring port; every other source is refused.
    #[serde(default)]
    pub allowed_monitor: Vec<String>,
}

/// One tenant: a NATS account with its own subjects and JetStream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Collectives (RPC sub-networks) of the tenant; RPC permissions are scoped to them.
    pub collectives: Vec<String>,
    /// JetStream limits of the tenant's account; unset = JetStream enabled without limits.
    #[serde(default)]
    pub jetstream: Option<AccountJetStream>,
    /// Users of the tenant, one per component.
    pub users: Vec<UserSpec>,
}

/// JetStream limits of one account.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountJetStream {
    /// Memory storage, e.g. `256MB`.
    #[serde(default)]
    pub max_memory: Option<String>,
    /// File storage, e.g. `10GB`.
    #[serde(default)]
    pub max_file: Option<String>,
    /// Streams the account may have.
    #[serde(default)]
    pub max_streams: Option<u64>,
    /// Consumers the account may have.
    #[serde(default)]
    pub max_consumers: Option<u64>,
}

/// A user and how its password is obtained. Exactly one of `password`, `password_file` and
/// `password_hash` must be set.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// User name; unique across the whole broker.
    pub user: String,
    /// What the user is for; decides its permissions. Ignored for the system account.
    #[serde(default = "default_role")]
    pub role: Role,
    /// Clear password, hashed with bcrypt into the generated file.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the clear password (first line), hashed with bcrypt.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A bcrypt hash (`$2a$…`, `$2b$…`), used as it is.
    #[serde(default)]
    pub password_hash: Option<String>,
}

fn default_role() -> Role {
    Role::Admin
}

/// What a user is for. Permissions are per tenant account, scoped to the tenant's
/// collectives `C` (JetStream API subjects are the account's own):
///
/// | Role | May publish | May subscribe |
/// |---|---|---|
/// | `agent` | `choria.lifecycle.>`, `choria.machine.>`, `chorus.rpc.request.C.>`, `chorus.rpc.reply.C.>`, `C.reply.>`, stream lookups, `_INBOX.>` | `C.broadcast.agent.>`, `C.node.>`, `_INBOX.>` |
/// | `client` | `C.broadcast.agent.>`, `C.node.>`, `_INBOX.>` | `C.reply.>`, `_INBOX.>` |
/// | `aaa` | `chorus.audit.>`, stream lookups | `_INBOX.>` |
/// | `consumer` | JetStream reads (stream info, message get, consumers, acks), `chorus.deadletter.>` | `_INBOX.>`, `choria.lifecycle.>`, `choria.machine.>` |
/// | `replicator` | the JetStream API except stream deletion, acks and flow control, every event subject | `_INBOX.>` |
/// | `admin` | `>` | `>` |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A node agent (or the simulator): publishes its events and RPC replies, receives
    /// requests for its collectives.
    Agent,
    /// An RPC caller (`chorus rpc`): sends requests to its collectives, reads replies.
    Client,
    /// The AAA service: publishes audit records.
    Aaa,
    /// Projections and exporters: read streams through durable consumers, dead-letter.
    Consumer,
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
}

/// Stream lookups a publisher needs to tell "no stream for this subject" from a hiccup.
const STREAM_LOOKUP: &[&str] = &["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.>"];

/// Every event subject Chorus publishes (the platform streams' filters).
const EVENT_SUBJECTS: &[&str] =
    &["choria.lifecycle.>", "choria.machine.>", "chorus.rpc.>", "chorus.audit.>", "chorus.deadletter.>"];

/// The permissions of `role` for a tenant with `collectives`.
pub fn permissions(role: Role, collectives: &[String]) -> Permissions {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let per = |pattern: &str| collectives.iter().map(|c| pattern.replace("{c}", c)).collect::<Vec<_>>();
    let mut p = Permissions::default();
    match role {
        Role::Agent => {
            p.publish_allow = s(&["choria.lifecycle.>", "choria.machine.>"]);
            p.publish_allow.extend(per("chorus.rpc.request.{c}.>"));
            p.publish_allow.extend(per("chorus.rpc.reply.{c}.>"));
            p.publish_allow.extend(per("{c}.reply.>"));
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
            p.subscribe_allow = per("{c}.reply.>");
            p.subscribe_allow.push("_INBOX.>".into());
        }
        Role::Aaa => {
            p.publish_allow = s(&["chorus.audit.>"]);
            p.publish_allow.extend(s(STREAM_LOOKUP));
            p.subscribe_allow = s(&["_INBOX.>"]);
        }
        Role::Consumer => {
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
            p.subscribe_allow = s(&["_INBOX.>", "choria.lifecycle.>", "choria.machine.>"]);
        }
        Role::Replicator => {
            p.publish_allow = s(&["$JS.API.>", "$JS.ACK.>", "$JS.FC.>"]);
            p.publish_allow.extend(s(EVENT_SUBJECTS));
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

/// The files `chorus broker config` writes.
#[derive(Clone, Debug)]
pub struct RenderedBroker {
    /// The `nats-server` configuration.
    pub nats_conf: String,
    /// The nftables rule set, when the configuration has a `firewall` section.
    pub nftables: Option<String>,
}

impl Config for BrokerConfig {
    fn validate(&self) -> Result<()> {
        BrokerConfig::validate(self)
    }
}

impl BrokerConfig {
    /// Reads and checks a broker description; errors name the file and the field.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        chorus_runtime::config::load(path)
    }

    /// Rejects what nats-server would refuse or what would weaken isolation, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ConfigError::message(m));
        check_name("server_name", &self.server_name)?;
        parse_host_port("listen", &self.listen)?;
        if let Some(m) = &self.monitor {
            parse_host_port("monitor", m)?;
        }
        if !(4..=31).contains(&self.bcrypt_cost) {
            return bad(format!("bcrypt_cost must be 4..=31, got {}", self.bcrypt_cost));
        }
        if let Some(tls) = &self.tls {
            if tls.verify_clients && tls.ca_file.is_none() {
                return bad("tls.verify_clients needs tls.ca_file (the CA of client certificates)".into());
            }
            if !tls.timeout.is_finite() || tls.timeout <= 0.0 {
                return bad("tls.timeout must be a number of seconds > 0".into());
            }
        }
        for (field, size) in
            [("jetstream.max_memory", &self.jetstream.max_memory), ("jetstream.max_file", &self.jetstream.max_file)]
        {
            if let Some(size) = size {
                check_size(field, size)?;
            }
        }
        if let Some(fw) = &self.firewall {
            if fw.allowed_clients.is_empty() {
                return bad("firewall.allowed_clients must list at least one network".into());
            }
            for c in fw.allowed_clients.iter().chain(&fw.allowed_monitor) {
                parse_cidr(c).map_err(|e| ConfigError::message(format!("firewall: {e}")))?;
            }
            if !fw.allowed_monitor.is_empty() && self.monitor.is_none() {
                return bad("firewall.allowed_monitor is set but there is no monitor listener".into());
            }
        }
        if self.tenants.is_empty() {
            return bad("tenants must name at least one tenant".into());
        }
        let mut users = BTreeSet::new();
        if let Some(sys) = &self.system_account {
            sys.validate("system_account")?;
            users.insert(sys.user.clone());
        }
        let mut collectives = BTreeMap::new();
        for (name, tenant) in &self.tenants {
            let at = format!("tenants.{name}");
            check_name(&at, name)?;
            if name.eq_ignore_ascii_case(SYSTEM_ACCOUNT) || name.starts_with('$') || name == "$G" {
                return bad(format!("{at}: the account name {name:?} is reserved"));
            }
            if tenant.collectives.is_empty() {
                return bad(format!("{at}.collectives must name at least one collective"));
            }
            for c in &tenant.collectives {
                check_token(&format!("{at}.collectives"), c)?;
                // A collective is a subject prefix inside the account; two tenants may use the
                // same name without seeing each other, but it is almost always a mistake.
                if let Some(other) = collectives.insert(c.clone(), name.clone()) {
                    return bad(format!("{at}.collectives: {c:?} is already a collective of tenant {other:?}"));
                }
            }
            if let Some(js) = &tenant.jetstream {
                for (field, size) in [("max_memory", &js.max_memory), ("max_file", &js.max_file)] {
                    if let Some(size) = size {
                        check_size(&format!("{at}.jetstream.{field}"), size)?;
                    }
                }
            }
            if tenant.users.is_empty() {
                return bad(format!("{at}.users must list at least one user"));
            }
            for (i, u) in tenant.users.iter().enumerate() {
                u.validate(&format!("{at}.users[{i}]"))?;
                if !users.insert(u.user.clone()) {
                    return bad(format!(
                        "{at}.users[{i}]: user {:?} is defined twice (user names are broker-wide)",
                        u.user
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `nats-server` configuration and the nftables rule set. Clear passwords are hashed
    /// with bcrypt (with a random salt, so each run differs).
    pub fn render(&self) -> Result<RenderedBroker> {
        Ok(RenderedBroker { nats_conf: self.render_nats_conf()?, nftables: self.render_nftables()? })
    }

    /// The `nats-server` configuration.
    pub fn render_nats_conf(&self) -> Result<String> {
        self.validate()?;
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "# Generated by `chorus broker config`. Do not edit: change the broker description");
        let _ = writeln!(w, "# and generate again. One account per tenant (no exports or imports between them),");
        let _ = writeln!(w, "# one user per component with least-privilege permissions, bcrypt password hashes.");
        let _ = writeln!(w, "server_name: {}", q(&self.server_name));
        let _ = writeln!(w, "listen: {}", q(&self.listen));
        if let Some(m) = &self.monitor {
            let _ = writeln!(w, "http: {}", q(m));
        }
        if let Some(tls) = &self.tls {
            let _ = writeln!(w, "tls {{");
            let _ = writeln!(w, "  cert_file: {}", qp(&tls.cert_file));
            let _ = writeln!(w, "  key_file: {}", qp(&tls.key_file));
            if let Some(ca) = &tls.ca_file {
                let _ = writeln!(w, "  ca_file: {}", qp(ca));
            }
            let _ = writeln!(w, "  verify: {}", tls.verify_clients);
            let _ = writeln!(w, "  timeout: {}", tls.timeout);
            let _ = writeln!(w, "}}");
        }
        let _ = writeln!(w, "jetstream {{");
        let _ = writeln!(w, "  store_dir: {}", qp(&self.jetstream.store_dir));
        if let Some(m) = &self.jetstream.max_memory {
            let _ = writeln!(w, "  max_memory_store: {m}");
        }
        if let Some(f) = &self.jetstream.max_file {
            let _ = writeln!(w, "  max_file_store: {f}");
        }
        let _ = writeln!(w, "}}");
        let _ = writeln!(w, "system_account: {}", q(SYSTEM_ACCOUNT));
        let _ = writeln!(w, "accounts {{");
        let _ = writeln!(w, "  {SYSTEM_ACCOUNT}: {{");
        let _ = writeln!(w, "    users: [");
        if let Some(sys) = &self.system_account {
            let _ =
                writeln!(w, "      {{user: {}, password: {}}}", q(&sys.user), q(&sys.password_hash(self.bcrypt_cost)?));
        }
        let _ = writeln!(w, "    ]");
        let _ = writeln!(w, "  }}");
        for (name, tenant) in &self.tenants {
            let _ = writeln!(w, "  # tenant {name}: collectives {}", tenant.collectives.join(", "));
            let _ = writeln!(w, "  {}: {{", q(name));
            match &tenant.jetstream {
                None => {
                    let _ = writeln!(w, "    jetstream: enabled");
                }
                Some(js) => {
                    let _ = writeln!(w, "    jetstream {{");
                    if let Some(m) = &js.max_memory {
                        let _ = writeln!(w, "      max_mem: {m}");
                    }
                    if let Some(f) = &js.max_file {
                        let _ = writeln!(w, "      max_file: {f}");
                    }
                    if let Some(n) = js.max_streams {
                        let _ = writeln!(w, "      max_streams: {n}");
                    }
                    if let Some(n) = js.max_consumers {
                        let _ = writeln!(w, "      max_consumers: {n}");
                    }
                    let _ = writeln!(w, "    }}");
                }
            }
            let _ = writeln!(w, "    users: [");
            for u in &tenant.users {
                let p = permissions(u.role, &tenant.collectives);
                let _ = writeln!(w, "      # {}: {}", u.user, u.role.as_str());
                let _ = writeln!(w, "      {{");
                let _ = writeln!(w, "        user: {}", q(&u.user));
                let _ = writeln!(w, "        password: {}", q(&u.password_hash(self.bcrypt_cost)?));
                let _ = writeln!(w, "        allowed_connection_types: [\"STANDARD\"]");
                let _ = writeln!(w, "        permissions {{");
                let _ = write!(w, "          publish {{ allow: {}", list(&p.publish_allow));
                if !p.publish_deny.is_empty() {
                    let _ = write!(w, ", deny: {}", list(&p.publish_deny));
                }
                let _ = writeln!(w, " }}");
                let _ = writeln!(w, "          subscribe {{ allow: {} }}", list(&p.subscribe_allow));
                let _ = writeln!(w, "        }}");
                let _ = writeln!(w, "      }}");
            }
            let _ = writeln!(w, "    ]");
            let _ = writeln!(w, "  }}");
        }
        let _ = writeln!(w, "}}");
        Ok(out)
    }

    /// An nftables rule set (`nft -f FILE`) that lets only `firewall.allowed_clients` reach
    /// the client port and only `firewall.allowed_monitor` the monitoring port; other sources
    /// get a TCP reset. `None` without a `firewall` section. The rules live in their own table
    /// (`inet chorus_broker`), which loading the file again replaces.
    pub fn render_nftables(&self) -> Result<Option<String>> {
        self.validate()?;
        let Some(fw) = &self.firewall else { return Ok(None) };
        let (_, client_port) = parse_host_port("listen", &self.listen)?;
        let mut ports = vec![(client_port, "client", &fw.allowed_clients)];
        if let Some(m) = &self.monitor {
            let (_, port) = parse_host_port("monitor", m)?;
            ports.push((port, "monitoring", &fw.allowed_monitor));
        }
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "#!/usr/sbin/nft -f");
        let _ = writeln!(w, "# Generated by `chorus broker config` for broker {}.", self.server_name);
        let _ = writeln!(w, "# nats-server has no per-user source-address limits; this table does it per port.");
        let _ = writeln!(w, "# Loading it again replaces it (the table is created, deleted and defined anew).");
        let _ = writeln!(w, "table inet chorus_broker");
        let _ = writeln!(w, "delete table inet chorus_broker");
        let _ = writeln!(w, "table inet chorus_broker {{");
        let _ = writeln!(w, "  chain input {{");
        let _ = writeln!(w, "    type filter hook input priority filter; policy accept;");
        for (port, what, cidrs) in ports {
            let _ = writeln!(w, "    # {what} port {port}");
            for c in cidrs.iter() {
                let (addr, len) = parse_cidr(c).expect("validated");
                let family = if addr.is_ipv4() { "ip" } else { "ip6" };
                let _ = writeln!(w, "    tcp dport {port} {family} saddr {addr}/{len} accept");
            }
            let _ = writeln!(w, "    tcp dport {port} reject with tcp reset");
        }
        let _ = writeln!(w, "  }}");
        let _ = writeln!(w, "}}");
        Ok(Some(out))
    }
}

impl UserSpec {
    fn validate(&self, at: &str) -> Result<()> {
        if self.user.is_empty() || self.user.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"') {
            return Err(ConfigError::message(format!(
                "{at}.user {:?} must be non-empty without spaces or quotes",
                self.user
            )));
        }
        let given = [self.password.is_some(), self.password_file.is_some(), self.password_hash.is_some()];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(ConfigError::message(format!(
                "{at} ({}): set exactly one of password, password_file and password_hash",
                self.user
            )));
        }
        if let Some(h) = &self.password_hash {
            if !is_bcrypt(h) {
                return Err(ConfigError::message(format!(
                    "{at} ({}): password_hash is not a bcrypt hash ($2a$/$2b$)",
                    self.user
                )));
            }
        }
        if matches!(&self.password, Some(p) if p.is_empty()) {
            return Err(ConfigError::message(format!("{at} ({}): password is empty", self.user)));
        }
        Ok(())
    }

    /// The bcrypt hash written to the configuration.
    fn password_hash(&self, cost: u32) -> Result<String> {
        if let Some(h) = &self.password_hash {
            return Ok(h.clone());
        }
        let clear = match (&self.password, &self.password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::message(format!("user {}: password_file {}: {e}", self.user, path.display()))
                })?;
                let line = text.lines().next().unwrap_or("").to_string();
                if line.is_empty() {
                    return Err(ConfigError::message(format!(
                        "user {}: password_file {} is empty",
                        self.user,
                        path.display()
                    )));
                }
                line
            }
            (None, None) => unreachable!("validated"),
        };
        hash_password(&clear, cost)
    }
}

/// A bcrypt hash of `password` in the `$2a$` form nats-server reads.
pub fn hash_password(password: &str, cost: u32) -> Result<String> {
    bcrypt::hash_with_result(password, cost)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| ConfigError::message(format!("bcrypt: {e}")))
}

/// Whether `s` looks like a bcrypt hash nats-server recognises (`$2a$NN$…`, `$2b$`, `$2x$`, `$2y$`).
pub fn is_bcrypt(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 60
        && b[0] == b'$'
        && b[1] == b'2'
        && matches!(b[2], b'a' | b'b' | b'x' | b'y')
        && b[3] == b'$'
        && b[4].is_ascii_digit()
        && b[5].is_ascii_digit()
        && b[6] == b'$'
}

/// Parses `a.b.c.d/len`, `v6/len` or a single address (full-length prefix).
pub fn parse_cidr(s: &str) -> std::result::Result<(IpAddr, u8), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.trim().parse().map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
    };
    // nft refuses host bits under the mask; so do we, with a clearer message.
    let host_bits_clear = match addr {
        IpAddr::V4(a) => len == 32 || u32::from(a) & (u32::MAX >> len) == 0,
        IpAddr::V6(a) => len == 128 || u128::from(a) & (u128::MAX >> len) == 0,
    };
    if !host_bits_clear {
        return Err(format!("{s:?}: address has bits set beyond the /{len} prefix"));
    }
    Ok((addr, len))
}

fn parse_host_port(field: &str, s: &str) -> Result<(String, u16)> {
    let err = || ConfigError::message(format!("{field}: {s:?} is not host:port"));
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let port: u16 = port.parse().map_err(|_| err())?;
    if host.is_empty() || port == 0 {
        return Err(err());
    }
    Ok((host.trim_matches(|c| c == '[' || c == ']').to_string(), port))
}

fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ConfigError::message(format!("{field}: {name:?} must be 1..=64 letters, digits, '-' or '_'")));
    }
    Ok(())
}

fn check_token(field: &str, token: &str) -> Result<()> {
    if let Some(problem) =
        chorus_backbone::subject::problem(token, false).or_else(|| token.contains('.').then_some("contains a dot"))
    {
        return Err(ConfigError::message(format!("{field}: {token:?} {problem}")));
    }
    Ok(())
}

fn check_size(field: &str, size: &str) -> Result<()> {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &size[digits.len()..];
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && matches!(unit.to_ascii_uppercase().as_str(), "" | "K" | "KB" | "M" | "MB" | "G" | "GB" | "T" | "TB");
    if !ok {
        return Err(ConfigError::message(format!("{field}: {size:?} is not a size like 512MB or 10GB")));
    }
    Ok(())
}

/// A double-quoted NATS config string (JSON escapes, which nats-server's parser reads).
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialize")
}

fn qp(p: &std::path::Path) -> String {
    q(&p.to_string_lossy())
}

fn list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, role: Role) -> UserSpec {
        UserSpec {
            user: name.into(),
            role,
            password: Some(format!("{name}-pw")),
            password_file: None,
            password_hash: None,
        }
    }

    fn sample() -> BrokerConfig {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "acme".to_string(),
            TenantConfig {
                collectives: vec!["acme".into()],
                jetstream: None,
                users: vec![user("acme-agent", Role::Agent), user("acme-admin", Role::Admin)],
            },
        );
        tenants.insert(
            "globex".to_string(),
            TenantConfig {
                collectives: vec!["globex".into(), "globex_dev".into()],
                jetstream: Some(AccountJetStream { max_file: Some("1GB".into()), ..Default::default() }),
                users: vec![user("globex-client", Role::Client)],
            },
        );
        BrokerConfig {
            server_name: "b1".into(),
            listen: "10.0.0.5:4222".into(),
            monitor: Some("127.0.0.1:8222".into()),
            tls: None,
            jetstream: BrokerJetStream {
                store_dir: "/var/lib/nats".into(),
                max_memory: None,
                max_file: Some("10GB".into()),
            },
            system_account: Some(user("sys", Role::Admin)),
            firewall: Some(FirewallConfig {
                allowed_clients: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
                allowed_monitor: vec!["127.0.0.1".into()],
            }),
            bcrypt_cost: 4,
            tenants,
        }
    }

    #[test]
    fn renders_accounts_users_and_hashes() {
        let conf = sample().render_nats_conf().unwrap();
        assert!(conf.contains("\"acme\": {"), "{conf}");
        assert!(conf.contains("\"globex\": {"), "{conf}");
        assert!(conf.contains("max_file: 1GB"), "{conf}");
        assert!(conf.contains("system_account: \"SYS\""), "{conf}");
        assert!(!conf.contains("acme-agent-pw"), "clear password leaked: {conf}");
        assert!(!conf.contains("exports:") && !conf.contains("imports:"), "{conf}");
        assert!(conf.contains("\"globex.broadcast.agent.>\", \"globex_dev.broadcast.agent.>\""), "{conf}");
        let hashes: Vec<&str> = conf.lines().filter_map(|l| l.trim().strip_prefix("password: \"")).collect();
        assert_eq!(hashes.len(), 3, "{conf}");
        let hash = hashes[0].trim_end_matches('"');
        assert!(is_bcrypt(hash), "{hash}");
        assert!(bcrypt::verify("acme-agent-pw", hash).unwrap());
    }

    #[test]
    fn agent_permissions_are_scoped_to_its_collectives() {
        let p = permissions(Role::Agent, &["acme".into()]);
        assert!(p.subscribe_allow.contains(&"acme.broadcast.agent.>".to_string()));
        assert!(p.publish_allow.contains(&"chorus.rpc.reply.acme.>".to_string()));
        assert!(!p.publish_allow.iter().any(|s| s == ">" || s.starts_with("chorus.audit")));
        assert!(!p.subscribe_allow.iter().any(|s| s.starts_with("choria.")), "agents do not read others' events");
        let c = permissions(Role::Client, &["acme".into()]);
        assert!(
            !c.publish_allow.iter().any(|s| s.starts_with("choria.") || s.starts_with("chorus.")),
            "clients forge no events"
        );
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = sample();
        c.tenants.get_mut("acme").unwrap().users.push(user("globex-client", Role::Client));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("defined twice"), "{e}");

        let mut c = sample();
        c.tenants.get_mut("acme").unwrap().users[0].password_hash = Some("$2a$04$x".into());
        assert!(c.validate().unwrap_err().to_string().contains("exactly one"));

        let mut c = sample();
        c.tenants.get_mut("globex").unwrap().collectives.push("acme".into());
        assert!(c.validate().unwrap_err().to_string().contains("already a collective"));

        let mut c = sample();
        c.tenants.insert("SYS".into(), c.tenants["acme"].clone());
        assert!(c.validate().unwrap_err().to_string().contains("reserved"));

        let mut c = sample();
        c.firewall.as_mut().unwrap().allowed_clients.push("10.0.0.1/8".into());
        assert!(c.validate().unwrap_err().to_string().contains("beyond"));

        let mut c = sample();
        c.tls = Some(BrokerTls {
            cert_file: "c".into(),
            key_file: "k".into(),
            ca_file: None,
            verify_clients: true,
            timeout: 2.0,
        });
        assert!(c.validate().unwrap_err().to_string().contains("ca_file"));
    }

    #[test]
    fn nftables_allows_only_the_configured_networks() {
        let nft = sample().render_nftables().unwrap().unwrap();
        assert!(nft.contains("tcp dport 4222 ip saddr 10.0.0.0/8 accept"), "{nft}");
        assert!(nft.contains("tcp dport 4222 ip6 saddr 2001:db8::/32 accept"), "{nft}");
        assert!(nft.contains("tcp dport 4222 reject with tcp reset"), "{nft}");
        assert!(nft.contains("tcp dport 8222 ip saddr 127.0.0.1/32 accept"), "{nft}");
        // Accepts come before the reject of the same port.
        let accept = nft.find("dport 4222 ip saddr").unwrap();
        let reject = nft.find("dport 4222 reject").unwrap();
        assert!(accept < reject);
        let mut c = sample();
        c.firewall = None;
        assert!(c.render_nftables().unwrap().is_none());
    }

    #[test]
    fn parses_cidrs() {
        assert_eq!(parse_cidr("10.1.0.0/16").unwrap().1, 16);
        assert_eq!(parse_cidr("192.168.1.7").unwrap().1, 32);
        assert_eq!(parse_cidr("::1").unwrap().1, 128);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }

    #[test]
    fn reads_yaml_like_json() {
        let c: BrokerConfig = serde_json::from_value(serde_json::json!({
            "jetstream": {"store_dir": "/d"},
            "tenants": {"t": {"collectives": ["t"], "users": [{"user": "u", "role": "agent", "password_hash": hash_password("x", 4).unwrap()}]}}
        }))
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:4222");
        c.validate().unwrap();
        assert!(serde_json::from_value::<BrokerConfig>(
            serde_json::json!({"jetstream": {"store_dir": "/d"}, "tenants": {}, "nope": 1})
        )
        .is_err());
    }
}
