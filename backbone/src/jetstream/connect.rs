//! How to reach a NATS deployment: servers, credentials and TLS, as typed configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use chorus_runtime::{ConfigError, TlsClientConfig};

use super::errors::Classify as _;
use crate::{BackboneError, Result};

/// Connection settings of the JetStream engine.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Seed servers, e.g. `nats://10.0.0.1:4222` or `tls://broker:4222`; the client learns the
    /// rest of a cluster from them and fails over between them.
    pub servers: Vec<String>,
    /// Connection name shown by the server's monitoring.
    #[serde(default)]
    pub name: Option<String>,
    /// How the client authenticates.
    #[serde(default)]
    pub auth: NatsAuth,
    /// TLS towards the broker.
    #[serde(default)]
    pub tls: Option<TlsClientConfig>,
    /// Timeout of JetStream API calls and publish acknowledgements.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
    /// Twice the publish window: a pipelined publisher keeps up to half of it in flight (at
    /// most 65,536, what the acknowledgement inbox buffers) before it waits for acknowledgements.
    #[serde(default = "default_inflight")]
    pub max_ack_inflight: usize,
    /// How long a publish keeps being retried (same event id, so no duplicates) through broker
    /// restarts and cluster leader changes before it fails.
    #[serde(default = "default_retry", with = "humantime_serde")]
    #[schemars(with = "String")]
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
#[derive(schemars::JsonSchema, Clone, Debug, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// Its password.
        password: String,
    },
    /// A token.
    Token {
        /// The token.
        token: String,
    },
    /// A NATS `.creds` file (user JWT and nkey seed), as issued by nsc or an operator.
    Creds {
        /// The file.
        path: PathBuf,
    },
    /// An nkey seed file (`SU…`), for nkey-only users.
    Nkey {
        /// The file.
        seed_file: PathBuf,
    },
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

    /// Rejects settings that cannot work, naming the field (relative to this section:
    /// `servers`, `tls.ca_file`; callers place it with [`ConfigError::within`]).
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::invalid("servers", "must list at least one server"));
        }
        for (i, s) in self.servers.iter().enumerate() {
            if s.parse::<async_nats::ServerAddr>().is_err() {
                return Err(ConfigError::invalid(format!("servers[{i}]"), format!("{s:?} is not a server URL")));
            }
        }
        if self.max_ack_inflight == 0 {
            return Err(ConfigError::invalid("max_ack_inflight", "must be > 0"));
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
            if tls.server_name.is_some() {
                return Err(ConfigError::invalid(
                    "tls.server_name",
                    "not supported for NATS: the certificate is checked against the server URL's host",
                ));
            }
        }
        match &self.auth {
            NatsAuth::Creds { path } | NatsAuth::Nkey { seed_file: path } if !path.exists() => {
                Err(ConfigError::invalid("auth", format!("{} does not exist", path.display())))
            }
            _ => Ok(()),
        }
    }

    /// Connects, applying auth and TLS. `tls_client` overrides the TLS settings with a ready
    /// rustls configuration (e.g. one whose client key lives in a PKCS#11 token).
    pub async fn connect(&self, tls_client: Option<rustls::ClientConfig>) -> Result<async_nats::Client> {
        self.validate().map_err(|e| e.within("nats"))?;
        let mut opts = match &self.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token { token } => async_nats::ConnectOptions::with_token(token.clone()),
            NatsAuth::Creds { path } => async_nats::ConnectOptions::with_credentials_file(path).await.map_err(|e| {
                ConfigError::invalid("nats.auth", format!("creds {}: {e}", path.display())).with_source(e)
            })?,
            NatsAuth::Nkey { seed_file } => {
                let seed = std::fs::read_to_string(seed_file).map_err(|e| {
                    ConfigError::invalid("nats.auth", format!("nkey {}: {e}", seed_file.display())).with_source(e)
                })?;
                async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
            }
        };
        match (tls_client, &self.tls) {
            (Some(cfg), _) => opts = opts.require_tls(true).tls_client_config(cfg),
            (None, Some(tls)) => {
                let cfg = chorus_runtime::tls::client_config(tls).map_err(|e| e.within("nats"))?;
                opts = opts.require_tls(tls.required).tls_client_config(cfg);
            }
            (None, None) => {}
        }
        if let Some(name) = &self.name {
            opts = opts.name(name);
        }
        if self.retry_on_initial_connect {
            opts = opts.retry_on_initial_connect();
        }
        let servers: Vec<async_nats::ServerAddr> = self.servers.iter().filter_map(|s| s.parse().ok()).collect();
        opts.request_timeout(Some(self.request_timeout)).max_reconnects(None).connect(servers).await.map_err(|e| {
            let transient = e.kind().transient();
            BackboneError::Connect { servers: self.servers.join(","), transient, source: e }
        })
    }
}
