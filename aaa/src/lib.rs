//! Centralised AAA after Choria's `aaasvc`: users log in with a password and a key of their
//! own and get a short-lived token (JWT) bound to that key; a signer checks each RPC request,
//! signed by that key, against the token and the users file as it is now, and signs the
//! allowed ones for the caller with its own key, whose credential carries the delegator
//! right. Every decision — allow or deny, with the reason and the client's address — is an
//! [`AuditRecord`](chorus_schemas::AuditRecord) event on the backbone (`CHORUS_AUDIT`), so
//! the SIEM export sees all of them.
//!
//! * [`config`]: the service's YAML configuration (`chorus aaa --config FILE`).
//! * [`users`]: the users file, argon2id password hashes, agent allow lists.
//! * [`jwt`]: caller tokens (EdDSA or ES256 JWTs, by the key's algorithm, signed through the [`Signer`] trait).
//! * [`signer`]: [`AaaService`], the login and signing decisions and their audit records
//!   (the signed request format itself is protocol: `chorus_rpc::signed`).
//! * [`http`]: the axum HTTP API (`POST /login`, `POST /sign`, `GET /keys`).
//! * [`client`]: [`AaaClient`] and [`AaaSigner`], which plugs into
//!   [`RpcClient::with_request_signer`](chorus_rpc::RpcClient::with_request_signer).
//! * [`start`]: the service as `chorus aaa` runs it ([`RunningAaa`], a runtime
//!   [`Service`]).
//!
//! [`Signer`]: chorus_keys::Signer

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::JetStreamBackbone;
use chorus_backbone::{Backbone, BackboneError};
use chorus_platform::{BackboneSink, Emitter, EventSink, Outbox, OutboxLimits, PlatformError};
use chorus_runtime::{ConfigError, Health, Service, ServiceError, Shutdown, Tasks};

pub mod client;
pub mod config;
pub mod http;
pub mod jwt;
pub mod signer;
pub mod users;

#[cfg(test)]
mod tests;

pub use client::{AaaClient, AaaSigner};
pub use config::AaaConfig;
pub use jwt::{Claims, TokenAuthority, TokenError};
pub use signer::{AaaService, Decision, Denial, LoginAttempt, LoginGrant};
pub use users::{hash_password, verify_password, User, Users, UsersFile};

/// Errors of the AAA service and its client.
#[derive(Debug, thiserror::Error)]
pub enum AaaError {
    /// The configuration (or users file) is invalid; the error names the file and field.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A key could not sign.
    #[error("signing: {0}")]
    Signing(#[from] chorus_keys::SignError),
    /// The audit record of a decision could not be stored.
    #[error("audit: {0}")]
    Audit(#[source] PlatformError),
    /// The broker or the local outbox failed at start.
    #[error("audit backbone: {0}")]
    Backbone(#[from] BackboneError),
    /// The listener could not be bound or served.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection, TLS, timeout).
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// The service refused (bad credentials, token or request denied, audit unavailable).
    #[error("refused ({status} {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The service's snake_case code (`token_expired`, `wrong_tenant`, ...).
        code: String,
        /// The reason.
        message: String,
    },
    /// JSON encoding or decoding.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A password hash could not be made or checked.
    #[error("password hash: {0}")]
    PasswordHash(String),
}

impl AaaError {
    /// A configuration error without a single field at fault.
    pub(crate) fn config(message: impl std::fmt::Display) -> Self {
        AaaError::Config(ConfigError::message(message))
    }
}

/// A running `chorus aaa`: the HTTP API, and the audit forwarder when an outbox is used.
pub struct RunningAaa {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// The service.
    pub service: Arc<AaaService>,
    tasks: Tasks,
    drain: Duration,
    /// The audit outbox, when one is used: its faults and forwarding show in health.
    outbox: Option<Outbox>,
}

/// Starts the service described by `config` under `shutdown`: keys, users, audit sink,
/// HTTP(S) listener. At stop the audit outbox forwarder gets `drain` to ship what it holds;
/// what it cannot ship stays in the outbox for the next start.
pub async fn start(config: &AaaConfig, shutdown: Shutdown, drain: Duration) -> Result<RunningAaa, AaaError> {
    use chorus_runtime::Config as _;
    config.validate()?;
    let users = Users::load(&config.users_file)?;
    let jwt_key = config.jwt.key.open().map_err(|e| ConfigError::invalid("jwt.key", &e).with_source(e))?;
    let mut previous = Vec::new();
    for (i, path) in config.jwt.previous_keys.iter().enumerate() {
        let key = chorus_keys::PublicKey::read_file(path)
            .map_err(|e| ConfigError::invalid(format!("jwt.previous_keys[{i}]"), &e).with_source(e))?;
        previous.push(key);
    }
    let signer = chorus_identity::Identity::load(
        &config.signer.key,
        &config.signer.credential,
        chorus_identity::Role::Client,
        None,
    )
    .map_err(|e| ConfigError::invalid("signer", &e).with_source(e))?;
    let tokens = TokenAuthority::new(
        jwt_key,
        config.jwt.issuer.clone(),
        config.jwt.validity,
        config.jwt.max_validity,
        config.jwt.leeway,
    )
    .with_previous_keys(previous);

    let mut tasks = Tasks::new("aaa", shutdown);
    let site: Option<Arc<dyn Backbone>> = match &config.audit.nats {
        Some(nats) => {
            let mut nats = nats.clone();
            // With an outbox the service works while the broker is away; without one it
            // must reach the broker to record anything.
            nats.retry_on_initial_connect = config.audit.state_dir.is_some();
            Some(Arc::new(JetStreamBackbone::connect(&nats).await?))
        }
        None => None,
    };
    let mut audit_outbox = None;
    let (sink, next_seq): (Arc<dyn EventSink>, u64) = match &config.audit.state_dir {
        Some(dir) => {
            let store = EmbeddedBackbone::open_path(dir.join("outbox"))?;
            let outbox = Outbox::open(store, OutboxLimits::default())
                .await
                .map_err(AaaError::Audit)?
                .expecting(chorus_schemas::subject::CHORUS_AUDIT_SUBJECTS.iter().copied());
            let next = outbox.next_producer_seq().await.map_err(AaaError::Audit)?;
            if let Some(site) = site {
                let forwarder = outbox.clone();
                let shutdown = tasks.shutdown().clone();
                tasks.spawn("audit forwarder", async move { forwarder.forward(site, 1_000, shutdown).await });
            }
            audit_outbox = Some(outbox.clone());
            (Arc::new(outbox), next)
        }
        None => (Arc::new(BackboneSink(site.expect("validated: nats or state_dir"))), 1),
    };
    let emitter = Arc::new(Emitter::new(sink, next_seq, Some(config.site.clone())));
    let service = Arc::new(
        AaaService::new(
            config.identity.clone(),
            config.site.clone(),
            users,
            config.tenant_collectives(),
            tokens,
            signer,
            &config.login,
            emitter,
        )?
        .with_users_file(config.users_file.clone())
        .with_max_ttl(config.signer.max_ttl),
    );

    let tls = match &config.tls {
        Some(t) => Some(http::tls_config(&t.cert_file, &t.key_file)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| AaaError::Io { context: format!("listen {}", config.listen), source })?;
    let addr = listener.local_addr().map_err(|source| AaaError::Io { context: "listen".into(), source })?;
    let shutdown = tasks.shutdown().requested_owned();
    let ops =
        chorus_runtime::Ops::new().with(Arc::new(AaaMonitor { tasks: tasks.monitor(), service: service.clone() }));
    if let Some(outbox) = &audit_outbox {
        ops.add(Arc::new(outbox.clone()));
    }
    tasks.spawn("http", http::serve(listener, tls, service.clone(), ops, shutdown));
    Ok(RunningAaa { addr, service, tasks, drain, outbox: audit_outbox })
}

/// The service's tasks and decisions, for `/healthz` and `/metrics` (`chorus_aaa_*`).
struct AaaMonitor {
    tasks: chorus_runtime::TaskMonitor,
    service: Arc<AaaService>,
}

#[async_trait]
impl chorus_runtime::Observable for AaaMonitor {
    fn name(&self) -> &str {
        "aaa"
    }

    fn health(&self) -> Health {
        self.tasks.health()
    }

    async fn collect(
        &self,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<(), chorus_runtime::BoxError> {
        use prometheus_client::metrics::{counter::Counter, family::Family};
        let registry = registry.sub_registry_with_prefix("chorus_aaa");
        let stats = self.service.stats();
        let decisions = Family::<[(&'static str, &'static str); 2], Counter>::default();
        for (kind, decision, n) in stats.decisions() {
            decisions.get_or_create(&[("kind", kind), ("decision", decision)]).inc_by(n);
        }
        registry.register("decisions", "Logins and signing requests decided, by kind and decision", decisions);
        chorus_runtime::register_counters(
            registry,
            &[("audit_failures", "Decisions whose audit record could not be stored", stats.audit_failures())],
        );
        Ok(())
    }
}

#[async_trait]
impl Service for RunningAaa {
    fn name(&self) -> &str {
        "aaa"
    }

    fn health(&self) -> Health {
        match &self.outbox {
            Some(outbox) => self.tasks.health().and(outbox.health()),
            None => self.tasks.health(),
        }
    }

    fn failed(&self) -> bool {
        self.tasks.failed()
    }

    /// Stops the listener, then lets the outbox forwarder ship what it holds (up to the
    /// drain time); what it cannot stays in the outbox for the next start.
    async fn stop(&mut self) -> Result<(), ServiceError> {
        self.tasks.shutdown().request();
        if tokio::time::timeout(self.drain, self.tasks.join()).await.is_err() {
            tracing::warn!("audit outbox not drained at shutdown; kept for the next start");
            self.tasks.abort();
        }
        self.tasks.join().await
    }
}
