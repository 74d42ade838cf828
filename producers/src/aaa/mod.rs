//! Centralised AAA after Choria's `aaasvc`: users log in with a password and get a
//! short-lived token (JWT); a signer checks each RPC request against the token and signs the
//! allowed ones with a key that only the service holds. Every decision — allow or deny, with
//! the reason — is an [`AuditRecord`](chorus_schemas::AuditRecord) event on the backbone
//! (`CHORUS_AUDIT`), so the SIEM export sees all of them.
//!
//! * [`config`]: the service's YAML configuration (`chorus aaa --config FILE`).
//! * [`users`]: the users file, argon2id password hashes, agent allow lists.
//! * [`jwt`]: caller tokens (EdDSA JWTs signed through the [`Signer`] trait).
//! * [`signer`]: [`AaaService`], the login and signing decisions and their audit records;
//!   the signed request format and its verification.
//! * [`http`]: the axum HTTP API (`POST /login`, `POST /sign`, `GET /keys`).
//! * [`client`]: [`AaaClient`] and [`AaaSigner`], which plugs into
//!   [`RpcClient::with_request_signer`](crate::rpc::RpcClient::with_request_signer).
//!
//! [`Signer`]: chorus_schemas::signature::Signer

use std::net::SocketAddr;
use std::sync::Arc;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::JetStreamBackbone;
use chorus_backbone::Backbone;
use tokio::sync::watch;

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
pub use signer::{verify_signed_request, AaaService, Decision, Denial, LoginGrant, SignedRequest};
pub use users::{hash_password, verify_password, User, Users, UsersFile};

use crate::emitter::{BackboneSink, EventSink};
use crate::outbox::{Outbox, OutboxLimits};
use crate::Emitter;

/// Errors of the AAA service and its client.
#[derive(Debug, thiserror::Error)]
pub enum AaaError {
    /// The configuration (or users file) is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A key could not sign.
    #[error("signing: {0}")]
    Signing(String),
    /// The audit record of a decision could not be stored.
    #[error("audit: {0}")]
    Audit(String),
    /// The HTTP exchange failed (connection, TLS, timeout).
    #[error("http: {0}")]
    Http(String),
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
    /// Anything else (backbone, I/O).
    #[error("{0}")]
    Other(String),
}

/// A running `chorus aaa`: the HTTP API, and the audit forwarder when an outbox is used.
pub struct RunningAaa {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// The service.
    pub service: Arc<AaaService>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    forwarder: Option<tokio::task::JoinHandle<Result<(), crate::ProducerError>>>,
}

/// Starts the service described by `config`: keys, users, audit sink, HTTP(S) listener.
pub async fn start(config: &AaaConfig) -> Result<RunningAaa, AaaError> {
    config.validate()?;
    let other = |e: &dyn std::fmt::Display| AaaError::Other(e.to_string());
    let users = Users::load(&config.users_file)?;
    let jwt_key = config.jwt.key.open("jwt")?;
    let request_key = config.signer.key.open("signer")?;
    let tokens = TokenAuthority::new(
        jwt_key,
        config.jwt.issuer.clone(),
        config.jwt.validity,
        config.jwt.max_validity,
        config.jwt.leeway,
    );

    let (stop, stop_rx) = watch::channel(false);
    let site: Option<Arc<dyn Backbone>> = match &config.audit.nats {
        Some(nats) => {
            let mut nats = nats.clone();
            // With an outbox the service works while the broker is away; without one it
            // must reach the broker to record anything.
            nats.retry_on_initial_connect = config.audit.state_dir.is_some();
            Some(Arc::new(JetStreamBackbone::connect(&nats).await.map_err(|e| other(&e))?))
        }
        None => None,
    };
    let (sink, next_seq, forwarder): (Arc<dyn EventSink>, u64, _) = match &config.audit.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| AaaError::Config(format!("audit.state_dir {}: {e}", dir.display())))?;
            let store = EmbeddedBackbone::open_path(dir.join("outbox")).map_err(|e| other(&e))?;
            let outbox = Outbox::open(store, OutboxLimits::default()).await.map_err(|e| other(&e))?;
            let next = outbox.next_producer_seq().await.map_err(|e| other(&e))?;
            let forwarder = site.map(|site| outbox.spawn_forwarder(site, 1_000, stop_rx.clone()));
            (Arc::new(outbox), next, forwarder)
        }
        None => (Arc::new(BackboneSink(site.expect("validated: nats or state_dir"))), 1, None),
    };
    let emitter = Arc::new(Emitter::new(sink, next_seq, Some(config.site.clone())));
    let service = Arc::new(AaaService::new(
        config.identity.clone(),
        config.site.clone(),
        users,
        config.tenant_collectives(),
        tokens,
        request_key,
        emitter,
    )?);

    let tls = match &config.tls {
        Some(t) => Some(http::tls_config(&t.cert_file, &t.key_file)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| AaaError::Config(format!("listen {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| other(&e))?;
    let mut shutdown = stop_rx;
    let server = tokio::spawn(http::serve(listener, tls, service.clone(), async move {
        let _ = shutdown.wait_for(|s| *s).await;
    }));
    Ok(RunningAaa { addr, service, stop, server, forwarder })
}

impl RunningAaa {
    /// Stops the listener, then lets the outbox forwarder ship what it holds (up to
    /// `drain`); what it cannot stays in the outbox for the next start.
    pub async fn shutdown(self, drain: std::time::Duration) -> Result<(), AaaError> {
        let _ = self.stop.send(true);
        match self.server.await {
            Ok(r) => r.map_err(|e| AaaError::Other(format!("http server: {e}")))?,
            Err(e) => return Err(AaaError::Other(format!("http server: {e}"))),
        }
        if let Some(f) = self.forwarder {
            match tokio::time::timeout(drain, f).await {
                Ok(Ok(r)) => r.map_err(|e| AaaError::Other(e.to_string()))?,
                Ok(Err(e)) => return Err(AaaError::Other(format!("audit forwarder: {e}"))),
                Err(_) => tracing::warn!("audit outbox not drained at shutdown; kept for the next start"),
            }
        }
        Ok(())
    }
}
