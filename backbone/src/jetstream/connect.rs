//! How to reach a NATS deployment: servers, credentials and TLS, as typed configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{BackboneError, Result};

/// Connection settings of the JetStream engine.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Seed servers, e.g. `nats://10.0.0.1:4222` or `tls://broker:4222`; the client learns the
    /// rest of a cluster from them and fails over between them.
    pub servers: Vec<String>,
    /// Connection name shown by the server's monitoring.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub auth: NatsAuth,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Timeout of JetStream API calls and publish acknowledgements.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Publishes in flight before the publisher waits for acknowledgements.
    #[serde(default = "default_inflight")]
    pub max_ack_inflight: usize,
    /// How long a publish keeps being retried (same event id, so no duplicates) through broker
    /// restarts and cluster leader changes before it fails.
    #[serde(default = "default_retry", with = "humantime_serde")]
    pub publish_retry_for: Duration,
    /// JetStream domain, for leafnode deployments with a separate JetStream domain per site.
    #[serde(default)]
    pub domain: Option<String>,
    /// Return from connect at once and keep trying in the background, instead of failing
    /// when no server answers: what a node agent that must work offline wants.
    #[serde(default)]
    pub retry_on_initial_connect: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_inflight() -> usize {
    4096
}
fn default_retry() -> Duration {
    Duration::from_secs(60)
}

/// How the client authenticates to the broker.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token {
        token: String,
    },
    /// A NATS `.creds` file (user JWT and nkey seed), as issued by nsc or an operator.
    Creds {
        path: PathBuf,
    },
    /// An nkey seed file (`SU…`), for nkey-only users.
    Nkey {
        seed_file: PathBuf,
    },
}

/// TLS towards the broker (rustls).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA bundle that signs the broker's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for brokers that verify clients.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Refuse to connect without TLS even when the URL says `nats://`.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

impl NatsConfig {
    /// Settings for `servers` with defaults for everything else.
    pub fn new(servers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        NatsConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            name: None,
            auth: NatsAuth::None,
            tls: None,
            request_timeout: default_timeout(),
            max_ack_inflight: default_inflight(),
            publish_retry_for: default_retry(),
            domain: None,
            retry_on_initial_connect: false,
        }
    }

    /// Parses a comma-separated server list, as given on command lines.
    pub fn from_url_list(urls: &str) -> Self {
        Self::new(urls.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from))
    }

    /// Rejects settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(BackboneError::InvalidConfig(m));
        if self.servers.is_empty() {
            return bad("nats.servers must list at least one server".into());
        }
        for s in &self.servers {
            if s.parse::<async_nats::ServerAddr>().is_err() {
                return bad(format!("nats.servers: {s:?} is not a server URL"));
            }
        }
        if self.max_ack_inflight == 0 {
            return bad("nats.max_ack_inflight must be > 0".into());
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return bad("nats.tls: cert_file and key_file go together".into());
            }
            for p in [&tls.ca_file, &tls.cert_file, &tls.key_file].into_iter().flatten() {
                if !p.exists() {
                    return bad(format!("nats.tls: {} does not exist", p.display()));
                }
            }
        }
        match &self.auth {
            NatsAuth::Creds { path } | NatsAuth::Nkey { seed_file: path } if !path.exists() => {
                bad(format!("nats.auth: {} does not exist", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Connects, applying auth and TLS. `tls_client` overrides the TLS settings with a ready
    /// rustls configuration (e.g. one whose client key lives in a PKCS#11 token).
    pub async fn connect(&self, tls_client: Option<rustls::ClientConfig>) -> Result<async_nats::Client> {
        self.validate()?;
        let mut opts = match &self.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token { token } => async_nats::ConnectOptions::with_token(token.clone()),
            NatsAuth::Creds { path } => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| BackboneError::InvalidConfig(format!("nats.auth creds {}: {e}", path.display())))?,
            NatsAuth::Nkey { seed_file } => {
                let seed = std::fs::read_to_string(seed_file).map_err(|e| {
                    BackboneError::InvalidConfig(format!("nats.auth nkey {}: {e}", seed_file.display()))
                })?;
                async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
            }
        };
        if let Some(tls) = &self.tls {
            opts = opts.require_tls(tls.required);
            if let Some(ca) = &tls.ca_file {
                opts = opts.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
        }
        if let Some(cfg) = tls_client {
            opts = opts.require_tls(true).tls_client_config(cfg);
        }
        if let Some(name) = &self.name {
            opts = opts.name(name);
        }
        if self.retry_on_initial_connect {
            opts = opts.retry_on_initial_connect();
        }
        let servers: Vec<async_nats::ServerAddr> = self.servers.iter().filter_map(|s| s.parse().ok()).collect();
        opts.request_timeout(Some(self.request_timeout))
            .max_reconnects(None)
            .connect(servers)
            .await
            .map_err(|e| BackboneError::Nats(format!("connecting to {}: {e}", self.servers.join(","))))
    }
}
