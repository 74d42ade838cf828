//! The broker description: tenants, users per component, TLS, JetStream, firewall, and
//! the checks that keep it from weakening isolation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use chorus_runtime::{Config, ConfigError};
use serde::{Deserialize, Serialize};

use crate::password::{hash_password, is_bcrypt};
use crate::roles::Role;
use crate::Result;

/// Default bcrypt cost of generated password hashes.
pub const DEFAULT_BCRYPT_COST: u32 = 11;

/// Name of the generated system account.
pub const SYSTEM_ACCOUNT: &str = "SYS";

/// A broker and its tenants (YAML or JSON; unknown keys are refused).
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
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
    /// Choria's client networks (`client_hosts`): connections from them get their user's
    /// permissions, connections from anywhere else node-only permissions (they can answer
    /// requests, not send them or read replies). See [`ClientNetworks`].
    #[serde(default)]
    pub client_networks: Option<ClientNetworks>,
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
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
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
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
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
#[derive(schemars::JsonSchema, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    /// CIDRs (`10.1.0.0/16`, `2001:db8::/32`, or single addresses) allowed to reach the
    /// client port; every other source is refused with a TCP reset.
    pub allowed_clients: Vec<String>,
    /// CIDRs allowed to reach the monitoring port; every other source is refused.
    #[serde(default)]
    pub allowed_monitor: Vec<String>,
}

/// Where clients may connect from, Choria's `client_hosts` meaning: nats-server has no
/// per-source permissions, so the broker becomes two servers. The main server (JetStream,
/// full permissions) listens on `internal_port`; a generated edge server listens on
/// `listen` with the same users holding node-only permissions and joins the main server's
/// tenant accounts over leafnode connections on loopback `leafnode_port`. The nftables rules
/// send connections from `networks` to the main server and refuse the internal port to
/// everyone else, so the same user gets its full permissions only from a client network.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientNetworks {
    /// CIDRs (`10.1.0.0/16`, `2001:db8::/32`, or single addresses) whose connections are
    /// clients.
    pub networks: Vec<String>,
    /// Port of the main server, on the `listen` address; connections from `networks` to
    /// the `listen` port are redirected here.
    pub internal_port: u16,
    /// Loopback port where the main server accepts the edge server's leafnode connections.
    pub leafnode_port: u16,
}

/// One tenant: a NATS account with its own subjects and JetStream.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Collectives (RPC sub-networks) of the tenant; RPC permissions are scoped to them.
    pub collectives: Vec<String>,
    /// JetStream limits of the tenant's account; unset = JetStream enabled without limits.
    #[serde(default)]
    pub jetstream: Option<AccountJetStream>,
    /// Users of the tenant, one per component.
    pub users: Vec<UserSpec>,
    /// Key-value buckets the tenant's agents may read and write keys of: governors
    /// (`CHORUS_GOVERNORS` and `GOVERNOR_<name>`) and the buckets of `kv` watchers. Agents
    /// get no other bucket.
    #[serde(default)]
    pub node_buckets: Vec<String>,
}

/// JetStream limits of one account.
#[derive(schemars::JsonSchema, Clone, Debug, Default, Serialize, Deserialize)]
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
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
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
    /// The caller id of a `client` user (required for clients): it may read the replies to
    /// this caller only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callerid: Option<String>,
}

fn default_role() -> Role {
    Role::Admin
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
        if let Some(cn) = &self.client_networks {
            if cn.networks.is_empty() {
                return bad("client_networks.networks must list at least one network".into());
            }
            for c in &cn.networks {
                parse_cidr(c).map_err(|e| ConfigError::message(format!("client_networks: {e}")))?;
            }
            let (_, port) = parse_host_port("listen", &self.listen)?;
            let ports = [port, cn.internal_port, cn.leafnode_port];
            if ports.iter().collect::<BTreeSet<_>>().len() != 3 || ports.contains(&0) {
                return bad(format!(
                    "client_networks: the listen port {port}, internal_port {} and leafnode_port {} must be three \
                     different ports",
                    cn.internal_port, cn.leafnode_port
                ));
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
            for (i, b) in tenant.node_buckets.iter().enumerate() {
                if !chorus_backbone::kv::is_bucket_name(b) {
                    return bad(format!("{at}.node_buckets[{i}]: {b:?} is not a bucket name"));
                }
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
        let calls = matches!(self.role, Role::Client | Role::Reactor);
        match (calls, &self.callerid) {
            (true, None) => {
                return Err(ConfigError::message(format!(
                    "{at} ({}): a {} names its callerid (replies are private to it)",
                    self.user,
                    self.role.as_str()
                )))
            }
            (true, Some(c)) if !c.contains('=') || c.chars().any(char::is_whitespace) => {
                return Err(ConfigError::message(format!("{at} ({}): callerid {c:?} is not kind=name", self.user)))
            }
            (true, Some(_)) | (false, None) => {}
            (false, Some(_)) => {
                return Err(ConfigError::message(format!(
                    "{at} ({}): callerid is for clients and reactors, not {}",
                    self.user,
                    self.role.as_str()
                )))
            }
        }
        Ok(())
    }

    /// The bcrypt hash written to the configuration.
    pub(crate) fn password_hash(&self, cost: u32) -> Result<String> {
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

pub(crate) fn parse_host_port(field: &str, s: &str) -> Result<(String, u16)> {
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
