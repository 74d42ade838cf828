//! Configuration of `chorus aaa --config FILE` (YAML; unknown keys are refused with the path
//! of the key at fault).
//!
//! ```yaml
//! identity: aaa1.example.net          # signer identity: subject of its audit events
//! site: london                        # stamped on audit events, part of their subject
//! listen: 0.0.0.0:8443
//! tls: {cert_file: /etc/chorus/aaa.pem, key_file: /etc/chorus/aaa.key}   # HTTPS; omit for HTTP
//! users_file: /etc/chorus/aaa-users.yaml
//! tenants:
//!   acme: {collectives: [acme, acme_dev]}
//!   globex: {collectives: [globex]}
//! jwt:
//!   key: {key_file: /etc/chorus/aaa-jwt.pem}      # or {pkcs11: {...}}
//!   previous_keys: [/etc/chorus/aaa-jwt-2025.pub]  # still accepted (key rotation)
//!   issuer: chorus-aaa
//!   validity: 1h
//!   max_validity: 24h                              # longer-lived tokens are refused
//!   leeway: 30s
//! signer:
//!   key: {key_file: /etc/chorus/aaa-signer.pem}    # signs requests for callers
//!   credential: /etc/chorus/aaa-signer.cred        # client credential with the delegator right
//!   max_ttl: 5m                                    # requests asking for longer are refused
//! login:
//!   per_user: {burst: 5, every: 12s}               # attempts at once, then one more per `every`
//!   per_address: {burst: 20, every: 3s}
//! audit:
//!   nats: {servers: [tls://broker:4222], auth: {type: user_password, user: acme-aaa, password: ...}}
//!   state_dir: /var/lib/chorus/aaa                 # optional outbox: audit survives broker outages
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chorus_backbone::jetstream::NatsConfig;
use chorus_keys::KeyConfig;
use chorus_runtime::{Config, ConfigError};
use serde::{Deserialize, Serialize};

/// The whole service configuration.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AaaConfig {
    /// Identity of this AAA service: the `signer` and node identity of its audit records.
    pub identity: String,
    /// Site (region) of the service, stamped on its audit events.
    pub site: String,
    /// HTTP listener, `host:port`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// HTTPS instead of HTTP. Passwords and tokens cross this listener: use it off loopback.
    #[serde(default)]
    pub tls: Option<HttpTls>,
    /// The users file (`aaa-users` below; docs/SECURITY.md, "Users").
    pub users_file: PathBuf,
    /// Tenants and their collectives.
    pub tenants: BTreeMap<String, TenantSpec>,
    /// Caller tokens.
    pub jwt: JwtConfig,
    /// The request signer: its key and delegator credential.
    pub signer: SignerConfig,
    /// Limits on login attempts.
    #[serde(default)]
    pub login: LoginLimits,
    /// Where audit records go.
    pub audit: AuditConfig,
}

fn default_listen() -> String {
    "127.0.0.1:8443".into()
}

/// Certificate and key of the HTTPS listener.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// One tenant.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// Collectives of the tenant (each belongs to exactly one tenant).
    pub collectives: Vec<String>,
}

/// Token settings.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The token-signing key.
    pub key: KeyConfig,
    /// Public keys of earlier token keys whose tokens are still accepted until they expire
    /// (rotation: sign with the new key, keep the old one here for one `max_validity`).
    #[serde(default)]
    pub previous_keys: Vec<PathBuf>,
    /// `iss` of issued tokens, required on presented ones.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Lifetime of issued tokens.
    #[serde(default = "default_validity", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub validity: Duration,
    /// Longest lifetime accepted on a presented token.
    #[serde(default = "default_max_validity", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_validity: Duration,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
}

fn default_issuer() -> String {
    "chorus-aaa".into()
}
fn default_validity() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_validity() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// The request signer: nodes accept its signature for a caller because its credential,
/// issued by the fleet's issuer, carries the delegator right.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerConfig {
    /// Where the key is.
    pub key: KeyConfig,
    /// Its client credential (`chorus credential issue --client --delegator`).
    pub credential: PathBuf,
    /// Longest TTL a request may ask for; nodes enforce their own maximum too.
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_ttl: Duration,
}

fn default_max_ttl() -> Duration {
    chorus_rpc::security::DEFAULT_MAX_TTL
}

/// How many login attempts are answered, per user and per client address; the others get
/// 429 `rate_limited` (and are audited) without the password being looked at.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginLimits {
    /// Attempts for one user name, from anywhere.
    #[serde(default = "default_per_user")]
    pub per_user: Limit,
    /// Attempts from one client address, for any user.
    #[serde(default = "default_per_address")]
    pub per_address: Limit,
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits { per_user: default_per_user(), per_address: default_per_address() }
    }
}

/// `burst` attempts at once, then one more every `every`.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Attempts allowed at once.
    pub burst: u32,
    /// Time for one more attempt to be allowed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub every: Duration,
}

fn default_per_user() -> Limit {
    Limit { burst: 5, every: Duration::from_secs(12) }
}

fn default_per_address() -> Limit {
    Limit { burst: 20, every: Duration::from_secs(3) }
}

/// Where audit records go.
#[derive(schemars::JsonSchema, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The broker whose `CHORUS_AUDIT` stream receives the records.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
    /// A local outbox: records are stored on disk first and forwarded, so a broker outage
    /// loses none, and the service's event sequence continues across restarts. Without it
    /// every decision waits for the broker to store its record (and fails closed when it
    /// cannot).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

impl AaaConfig {
    /// Reads and checks a configuration file; errors name the file and the field.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        chorus_runtime::config::load(path)
    }

    /// Parses and checks YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        chorus_runtime::config::from_text(text)
    }

    /// Tenants as the service wants them: name → collectives.
    pub fn tenant_collectives(&self) -> BTreeMap<String, Vec<String>> {
        self.tenants.iter().map(|(t, s)| (t.clone(), s.collectives.clone())).collect()
    }
}

impl Config for AaaConfig {
    /// Rejects what cannot work, naming the field.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, m: String| Err(ConfigError::invalid(field, m));
        if self.identity.is_empty() {
            return bad("identity", "must not be empty".into());
        }
        chorus_schemas::subject::validate_token("site", &self.site)
            .map_err(|e| ConfigError::invalid("site", &e).with_source(e))?;
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("listen", format!("{:?} is not ip:port", self.listen));
        }
        if self.tenants.is_empty() {
            return bad("tenants", "must name at least one tenant".into());
        }
        let mut seen = BTreeMap::new();
        for (tenant, spec) in &self.tenants {
            let field = format!("tenants.{tenant}.collectives");
            if spec.collectives.is_empty() {
                return bad(&field, "must not be empty".into());
            }
            for c in &spec.collectives {
                if let Some(other) = seen.insert(c.clone(), tenant.clone()) {
                    return bad(&field, format!("{c:?} already belongs to tenant {other:?}"));
                }
            }
        }
        if self.jwt.validity.is_zero() {
            return bad("jwt.validity", "must be > 0".into());
        }
        if self.jwt.max_validity < self.jwt.validity {
            return bad("jwt.max_validity", "must not be shorter than jwt.validity".into());
        }
        if self.signer.max_ttl < Duration::from_secs(1) {
            return bad("signer.max_ttl", "must be >= 1s".into());
        }
        for (field, limit) in [("login.per_user", self.login.per_user), ("login.per_address", self.login.per_address)] {
            if limit.burst == 0 || limit.every.is_zero() {
                return bad(field, "burst and every must be > 0".into());
            }
        }
        if self.audit.nats.is_none() && self.audit.state_dir.is_none() {
            return bad("audit", "set nats (the CHORUS_AUDIT stream) and/or state_dir".into());
        }
        if let Some(n) = &self.audit.nats {
            n.validate().map_err(|e| e.within("audit.nats"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
identity: aaa1.example.net
site: london
listen: 127.0.0.1:0
users_file: /etc/chorus/users.yaml
tenants:
  acme: {collectives: [acme]}
jwt: {key: {key_file: /k/jwt.pem}, validity: 15m}
signer: {key: {key_file: /k/signer.pem}, credential: /k/signer.cred}
audit: {state_dir: /var/lib/chorus/aaa}
"#;

    #[test]
    fn reads_the_documented_shape_with_defaults() {
        let c = AaaConfig::from_yaml(SAMPLE).unwrap();
        assert_eq!(c.jwt.validity, Duration::from_secs(900));
        assert_eq!(c.jwt.max_validity, Duration::from_secs(86400));
        assert_eq!(c.jwt.issuer, "chorus-aaa");
        assert_eq!(c.tenant_collectives()["acme"], ["acme"]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = AaaConfig::from_yaml(&SAMPLE.replace("validity: 15m", "validity: soon")).unwrap_err().to_string();
        assert!(e.contains("jwt.validity"), "{e}");
        let e = AaaConfig::from_yaml(&format!("{SAMPLE}\nbogus: 1")).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = AaaConfig::from_yaml(&SAMPLE.replace("audit: {state_dir: /var/lib/chorus/aaa}", "audit: {}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("audit"), "{e}");
        let two = SAMPLE
            .replace("  acme: {collectives: [acme]}", "  acme: {collectives: [acme]}\n  globex: {collectives: [acme]}");
        let e = AaaConfig::from_yaml(&two).unwrap_err().to_string();
        assert!(e.contains("already belongs"), "{e}");
    }
}
