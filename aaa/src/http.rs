//! The AAA HTTP API (axum), over HTTP or HTTPS (rustls).
//!
//! | Method and path | Body | Answer |
//! |---|---|---|
//! | `POST /login` | [`LoginAttempt`]: `{"username", "password", "public_key", "timestamp", "signature"}` | 200 `{"token", "expires_at", "callerid"}`; 401 on bad credentials or proof; 429 when rate-limited |
//! | `POST /sign` | `{"token", "request": <RPC request record>, "signature": "<key id>:<base64>"}` | 200 the signed [`RequestEnvelope`]; 401 for a refused token or proof, 403 for a refused request |
//! | `GET /keys` | — | the token keys accepted and the signer's key and credential |
//! | `GET /healthz` | — | JSON health (503 when a task of the service failed) |
//!
//! Errors are `{"error": "<reason>", "code": "<snake_case>"}`. Every login and every sign
//! call with a JSON body is a decision and is audited; when the audit record cannot be
//! stored the answer is 503 and nothing is signed. A body that is not JSON at all is
//! answered 400 without an audit record (there is no caller to record).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use chorus_rpc::RequestEnvelope;

use crate::signer::{AaaService, Decision, Denial, LoginAttempt};
use crate::AaaError;

/// Body of `POST /sign`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignBody {
    /// The caller token from `/login`.
    pub token: String,
    /// The RPC request record to sign.
    pub request: Value,
    /// `<key id>:<base64>` signature of the request by the key the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable reason (also the audit record's reason).
    pub error: String,
    /// Stable snake_case code.
    pub code: String,
}

/// A public key a verifier may trust.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishedKey {
    /// Key id (first 16 bytes of the SHA-256 of the public key, hex).
    pub key_id: String,
    /// SPKI PEM.
    pub public_key_pem: String,
}

/// Answer of `GET /keys`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeysBody {
    /// Identity of the service.
    pub identity: String,
    /// Keys whose caller tokens are accepted, the current one first.
    pub jwt: Vec<PublishedKey>,
    /// Key that signs requests for callers.
    pub signer: PublishedKey,
    /// Its credential (with the delegator right), as nodes see it.
    pub signer_credential: String,
}

/// The API routes over `service` (`/healthz` and `/metrics` come from the runtime's ops
/// router, see [`serve`]).
pub fn router(service: Arc<AaaService>) -> Router {
    Router::new().route("/login", post(login)).route("/sign", post(sign)).route("/keys", get(keys)).with_state(service)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: message.into(), code: code.into() })).into_response()
}

fn denied(denial: &Denial, audited: bool, status: StatusCode) -> Response {
    if !audited {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            format!("{denial} (and the decision could not be audited)"),
        );
    }
    error(status, denial.code(), denial.to_string())
}

fn failed(e: AaaError) -> Response {
    match e {
        AaaError::Audit(m) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", format!("audit record not stored: {m}"))
        }
        other => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", other.to_string()),
    }
}

async fn login(
    State(service): State<Arc<AaaService>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", format!("body is not JSON: {e}")),
    };
    let text = |field: &str| value.get(field).and_then(Value::as_str).unwrap_or_default().to_string();
    let attempt = LoginAttempt {
        username: text("username"),
        password: text("password"),
        public_key: text("public_key"),
        timestamp: value.get("timestamp").and_then(Value::as_i64).unwrap_or_default(),
        signature: text("signature"),
    };
    match service.login(attempt, Some(client)).await {
        Ok(Decision::Allow(grant)) => Json(grant).into_response(),
        Ok(Decision::Deny { denial, audited }) => {
            let status = if matches!(denial, Denial::RateLimited(_)) {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::UNAUTHORIZED
            };
            denied(&denial, audited, status)
        }
        Err(e) => failed(e),
    }
}

async fn sign(
    State(service): State<Arc<AaaService>>,
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    body: Bytes,
) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_json", format!("body is not JSON: {e}")),
    };
    let token = value.get("token").and_then(Value::as_str).unwrap_or_default().to_string();
    let request = value.get("request").cloned().unwrap_or(Value::Null);
    let signature = value.get("signature").and_then(Value::as_str);
    match service.sign(&token, request, signature, Some(client)).await {
        Ok(Decision::Allow(signed)) => Json::<RequestEnvelope>(signed).into_response(),
        Ok(Decision::Deny { denial, audited }) => {
            let unauthenticated = matches!(denial, Denial::Token(_) | Denial::BadProof(_) | Denial::UserRevoked(_));
            let status = if unauthenticated { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
            denied(&denial, audited, status)
        }
        Err(e) => failed(e),
    }
}

async fn keys(State(service): State<Arc<AaaService>>) -> Json<KeysBody> {
    let published =
        |key: &chorus_keys::PublicKey| PublishedKey { key_id: key.key_id().to_string(), public_key_pem: key.to_pem() };
    let current = service.tokens().signer().public_key();
    let mut jwt = vec![published(current)];
    jwt.extend(service.tokens().keys().values().filter(|k| *k != current).map(published));
    let signer = service.signer();
    Json(KeysBody {
        identity: service.identity().to_string(),
        jwt,
        signer: published(signer.signer().public_key()),
        signer_credential: signer.token().to_string(),
    })
}

/// Serves the API and `ops` (`/healthz`, `/metrics`) on `listener` (HTTPS with `tls`) until
/// `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    service: Arc<AaaService>,
    ops: chorus_runtime::Ops,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The client's address goes into every audit record.
    let app = ops.router().merge(router(service)).into_make_service_with_connect_info::<ClientAddr>();
    match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(config) => axum::serve(TlsListener::new(listener, config), app).with_graceful_shutdown(shutdown).await,
    }
}

/// The address a request came from, over HTTP or HTTPS.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for ClientAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for ClientAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// A rustls server configuration from PEM certificate chain and key files.
pub fn tls_config(cert_file: &std::path::Path, key_file: &std::path::Path) -> Result<rustls::ServerConfig, AaaError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |m: String| AaaError::config(m);
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("tls.cert_file {}: {e}", cert_file.display())))?;
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| bad(format!("tls.key_file {}: {e}", key_file.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("tls: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(format!("tls: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Accepts TCP connections and completes TLS handshakes in their own tasks (a slow or
/// broken client does not hold up the others); hands out finished TLS streams. Public only
/// because [`ClientAddr`] names it.
pub struct TlsListener {
    local: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    _acceptor: tokio::task::JoinHandle<()>,
}

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn new(listener: TcpListener, config: rustls::ServerConfig) -> Self {
        let local = listener.local_addr().expect("a bound listener has an address");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "aaa: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            tx.send((stream, peer)).await.ok();
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "aaa: TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "aaa: TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { local, ready, _acceptor: task }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self._acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task only ends when aborted (on drop): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
