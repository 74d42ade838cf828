//! The calling side of the AAA service: log in with a key, have requests signed, and plug
//! the signer into an [`RpcClient`](chorus_rpc::RpcClient). The client's key needs no
//! credential of its own: the token is bound to it at login, every request sent for signing
//! is signed by it, and the service signs for the caller with its delegator credential.
//!
//! ```no_run
//! # async fn demo(transport: std::sync::Arc<dyn chorus_rpc::Transport>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use chorus_aaa::client::{AaaClient, AaaSigner};
//! use chorus_keys::{Algorithm, FileSigner};
//! use chorus_rpc::RpcClient;
//!
//! let aaa = AaaClient::new("https://aaa.example.net:8443", Some("/etc/chorus/ca.pem".as_ref()))?;
//! let key = Arc::new(FileSigner::random(Algorithm::Ed25519)); // this session's key
//! let grant = aaa.login("alice", "s3cret", key.as_ref()).await?;
//! let rpc = RpcClient::new(transport, grant.callerid.clone(), "acme")
//!     .with_request_signer(Arc::new(AaaSigner::new(aaa, grant.token, key)));
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chorus_schemas::RpcRequest;
use serde::de::DeserializeOwned;
use serde::Serialize;

use chorus_keys::Signer;
use chorus_rpc::signed::request_signing_bytes;
use chorus_rpc::{RequestEnvelope, RequestSigner, RpcError};

use crate::http::{ErrorBody, KeysBody, SignBody};
use crate::signer::{login_message, signature_of, LoginAttempt, LoginGrant};
use crate::AaaError;

/// HTTP client of one AAA service.
#[derive(Clone, Debug)]
pub struct AaaClient {
    http: reqwest::Client,
    base: String,
}

impl AaaClient {
    /// A client of the service at `base_url` (`http://…` or `https://…`). For HTTPS,
    /// `ca_file` is the PEM bundle that signs the service's certificate.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> Result<Self, AaaError> {
        let base = base_url.trim_end_matches('/').to_string();
        let mut builder =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).connect_timeout(Duration::from_secs(10));
        if base.starts_with("https://") {
            let ca = ca_file.ok_or_else(|| AaaError::config(format!("{base}: HTTPS needs a CA file")))?;
            let mut tls = chorus_runtime::tls::client_config(&chorus_runtime::TlsClientConfig::with_ca(ca))?;
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder = builder.use_preconfigured_tls(tls);
        } else if !base.starts_with("http://") {
            return Err(AaaError::config(format!("{base_url:?} is not an http:// or https:// URL")));
        }
        let http = builder.build()?;
        Ok(AaaClient { http, base })
    }

    /// The service's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Logs in, proving possession of `key`: the token is bound to it, and
    /// [`AaaClient::sign`] needs both.
    pub async fn login(&self, username: &str, password: &str, key: &dyn Signer) -> Result<LoginGrant, AaaError> {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signature_of(key, &login_message(timestamp, username, key.public_key()))?;
        let attempt = LoginAttempt {
            username: username.into(),
            password: password.into(),
            public_key: key.public_key().to_text(),
            timestamp,
            signature,
        };
        self.post("/login", &attempt).await
    }

    /// Has `request` signed for the holder of `token`, proving possession of its `key`.
    pub async fn sign(&self, token: &str, request: &RpcRequest, key: &dyn Signer) -> Result<RequestEnvelope, AaaError> {
        let signature = signature_of(key, &request_signing_bytes(request))?;
        self.sign_json(token, serde_json::to_value(request)?, Some(signature)).await
    }

    /// [`AaaClient::sign`] with any JSON as the request and any signature (for tools and
    /// tests).
    pub async fn sign_json(
        &self,
        token: &str,
        request: serde_json::Value,
        signature: Option<String>,
    ) -> Result<RequestEnvelope, AaaError> {
        self.post("/sign", &SignBody { token: token.into(), request, signature }).await
    }

    /// The service's public keys.
    pub async fn keys(&self) -> Result<KeysBody, AaaError> {
        let response = self.http.get(format!("{}/keys", self.base)).send().await?;
        Self::answer(response).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, AaaError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(body)?)
            .send()
            .await?;
        Self::answer(response).await
    }

    async fn answer<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, AaaError> {
        let status = response.status();
        let bytes = response.bytes().await?;
        if status.is_success() {
            return Ok(serde_json::from_slice(&bytes)?);
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => (e.code, e.error),
            Err(_) => ("http".to_string(), String::from_utf8_lossy(&bytes).into_owned()),
        };
        Err(AaaError::Refused { status: status.as_u16(), code, message })
    }
}

/// A [`RequestSigner`] that has every request signed by the AAA service with a caller token
/// and the key it is bound to.
#[derive(Clone)]
pub struct AaaSigner {
    client: AaaClient,
    token: String,
    key: Arc<dyn Signer>,
}

impl AaaSigner {
    /// Signs with `token` (from [`AaaClient::login`]) and the `key` it was issued for.
    pub fn new(client: AaaClient, token: impl Into<String>, key: Arc<dyn Signer>) -> Self {
        AaaSigner { client, token: token.into(), key }
    }
}

impl std::fmt::Debug for AaaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AaaSigner").field("client", &self.client).field("key_id", &self.key.key_id()).finish()
    }
}

#[async_trait]
impl RequestSigner for AaaSigner {
    async fn sign(&self, request: RpcRequest) -> Result<RequestEnvelope, RpcError> {
        let signed = self
            .client
            .sign(&self.token, &request, self.key.as_ref())
            .await
            .map_err(|e| RpcError::Unauthorized(e.to_string()))?;
        if signed.request != request {
            return Err(RpcError::Unauthorized("the AAA service signed a different request".into()));
        }
        Ok(signed)
    }
}
