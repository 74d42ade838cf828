//! A transport over HTTP, so a client without a broker connection can reach a platform
//! whose nodes listen on an in-process transport (`chorus up` on the embedded store).
//!
//! The relay is a broker connection, nothing more: the client still builds, signs and
//! checks everything itself, and the nodes judge each request by its signature and Action
//! Policy, exactly as over NATS. One HTTP exchange carries one request: the client's
//! [`HttpTransport`] sends its inbox and the request messages at [`Transport::flush`], and
//! the server ([`router`]) subscribes to the inbox, publishes the messages with that reply
//! subject, and streams back what arrives on the inbox as JSON lines until the client hangs
//! up (its reply stream ended) or [`MAX_EXCHANGE`] passes.
//!
//! What a relay client may do is narrower than a NATS connection: publish only request
//! subjects (`<collective>.broadcast.agent.<agent>`, `<collective>.node.<identity>`) and
//! listen only on one exact subject (no wildcards), so it cannot read other callers' replies.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::transport::{validate_subject, Subscription, Transport, TransportMessage};
use super::RpcError;

/// Longest one exchange stays open (the longest request TTL nodes accept, plus a margin).
pub const MAX_EXCHANGE: Duration = Duration::from_secs(330);

/// Most messages one exchange may publish (a request sent directly to that many nodes).
const MAX_MESSAGES: usize = 100_000;

/// One message, with its payload in base64 (payloads are bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayedMessage {
    /// Where it is published (request) or was received (answer).
    pub subject: String,
    /// The payload, base64.
    pub payload: String,
}

/// The body of `POST /api/relay`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exchange {
    /// The subject answers come to; every message is published with it as reply subject.
    pub inbox: String,
    /// The request messages.
    pub messages: Vec<RelayedMessage>,
}

/// `POST /api/relay` over `transport`; see the module documentation.
pub fn router(transport: Arc<dyn Transport>) -> Router {
    Router::new().route("/api/relay", post(relay)).with_state(transport)
}

struct RelayError(StatusCode, String);

impl IntoResponse for RelayError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Whether `subject` is one a request is published on.
fn is_request_subject(subject: &str) -> bool {
    let tokens: Vec<&str> = subject.split('.').collect();
    matches!(tokens.as_slice(), [_, "broadcast", "agent", _]) || (tokens.len() >= 3 && tokens[1] == "node")
}

async fn relay(State(transport): State<Arc<dyn Transport>>, Json(exchange): Json<Exchange>) -> Response {
    match start(transport, exchange).await {
        Ok(answers) => {
            let lines = answers.map(|m| {
                let line = RelayedMessage {
                    subject: m.subject,
                    payload: base64::engine::general_purpose::STANDARD.encode(&m.payload),
                };
                let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
                bytes.push(b'\n');
                Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
            });
            let until = tokio::time::sleep(MAX_EXCHANGE);
            let body = Body::from_stream(lines.take_until(until));
            ([(axum::http::header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn start(transport: Arc<dyn Transport>, exchange: Exchange) -> Result<Subscription, RelayError> {
    let bad = |m: String| RelayError(StatusCode::BAD_REQUEST, m);
    validate_subject(&exchange.inbox, false).map_err(|e| bad(format!("inbox: {e}")))?;
    if exchange.messages.len() > MAX_MESSAGES {
        return Err(bad(format!("{} messages: at most {MAX_MESSAGES}", exchange.messages.len())));
    }
    let mut messages = Vec::with_capacity(exchange.messages.len());
    for m in exchange.messages {
        validate_subject(&m.subject, false).map_err(|e| bad(e.to_string()))?;
        if !is_request_subject(&m.subject) {
            return Err(bad(format!("{}: only request subjects are relayed", m.subject)));
        }
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&m.payload)
            .map_err(|e| bad(format!("{}: payload is not base64: {e}", m.subject)))?;
        messages.push((m.subject, Bytes::from(payload)));
    }
    let failed = |e: RpcError| RelayError(StatusCode::BAD_GATEWAY, e.to_string());
    let answers = transport.subscribe(&exchange.inbox).await.map_err(failed)?;
    for (subject, payload) in messages {
        transport.publish(&subject, Some(&exchange.inbox), payload).await.map_err(failed)?;
    }
    transport.flush().await.map_err(failed)?;
    Ok(answers)
}

/// What a client has subscribed and published since its last flush.
#[derive(Default)]
struct Pending {
    inbox: Option<(String, mpsc::UnboundedSender<TransportMessage>)>,
    messages: Vec<RelayedMessage>,
}

/// The client side: a [`Transport`] for one request at a time through a relay at `url`
/// (`http://127.0.0.1:8080`). Subscribe to the inbox, publish the request messages, then
/// flush: the exchange starts there, and the inbox's subscription receives the answers
/// until it is dropped.
pub struct HttpTransport {
    url: String,
    http: reqwest::Client,
    pending: Mutex<Pending>,
}

impl HttpTransport {
    /// A transport through the relay at `url`.
    pub fn new(url: &str) -> Self {
        HttpTransport {
            url: format!("{}/api/relay", url.trim_end_matches('/')),
            http: reqwest::Client::new(),
            pending: Mutex::new(Pending::default()),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn publish(&self, subject: &str, reply: Option<&str>, payload: Bytes) -> Result<(), RpcError> {
        let mut pending = self.pending();
        let inbox = pending.inbox.as_ref().map(|(s, _)| s.as_str());
        if reply.is_none() || reply != inbox {
            return Err(RpcError::Transport(format!(
                "{}: a relayed message must ask for answers on the inbox subscribed first",
                self.url
            )));
        }
        pending.messages.push(RelayedMessage {
            subject: subject.to_string(),
            payload: base64::engine::general_purpose::STANDARD.encode(&payload),
        });
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, RpcError> {
        validate_subject(subject, false)?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending().inbox = Some((subject.to_string(), tx));
        Ok(Subscription::new(tokio_stream_of(rx)))
    }

    async fn flush(&self) -> Result<(), RpcError> {
        let (inbox, messages) = {
            let mut pending = self.pending();
            let messages = std::mem::take(&mut pending.messages);
            match pending.inbox.take() {
                Some(inbox) => (inbox, messages),
                None if messages.is_empty() => return Ok(()),
                None => return Err(RpcError::Transport("relay: messages without an inbox".into())),
            }
        };
        let (subject, answers) = inbox;
        let exchange = Exchange { inbox: subject, messages };
        let body = serde_json::to_vec(&exchange)?;
        let unreachable = |e: reqwest::Error| RpcError::Transport(format!("relay {}: {e}", self.url));
        let mut response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(unreachable)?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(RpcError::Transport(format!("relay {}: {status}: {text}", self.url)));
        }
        tokio::spawn(async move {
            let mut buffer: Vec<u8> = Vec::new();
            loop {
                let chunk = tokio::select! {
                    chunk = response.chunk() => chunk,
                    // The reply stream ended: hang up, so the relay unsubscribes.
                    _ = answers.closed() => return,
                };
                let Ok(Some(chunk)) = chunk else { return };
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let Ok(message) = serde_json::from_slice::<RelayedMessage>(&line) else { continue };
                    let Ok(payload) = base64::engine::general_purpose::STANDARD.decode(&message.payload) else {
                        continue;
                    };
                    let message = TransportMessage { subject: message.subject, reply: None, payload: payload.into() };
                    if answers.send(message).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(())
    }
}

/// The receiving end of a channel as a stream.
fn tokio_stream_of(mut rx: mpsc::UnboundedReceiver<TransportMessage>) -> impl futures::Stream<Item = TransportMessage> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::RpcUtil;
    use crate::{LocalTransport, NodeContext, RequestOptions, RpcClient, RpcServer, ServerOptions};
    use chorus_platform::{Emitter, MemorySink};

    /// A relay on a free loopback port over `transport`.
    async fn relay_on(transport: Arc<dyn Transport>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(transport)).await });
        url
    }

    /// A client with no broker reaches nodes on an in-process transport through the relay,
    /// and what the relay refuses (other subjects, wildcard inboxes) is refused with a reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_and_replies_cross_the_relay_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rpcutil.policy"), "policy default allow\n").unwrap();
        let local: Arc<dyn Transport> = Arc::new(LocalTransport::new());
        let options = ServerOptions { wildcard_directed: true, ..Default::default() };
        let server = RpcServer::new(local.clone(), vec![Arc::new(RpcUtil)], Some(dir.path().into()), options).unwrap();
        let sink = Arc::new(MemorySink::default());
        for n in ["n1", "n2", "n3"] {
            let emitter = Arc::new(Emitter::new(sink.clone(), 1, None));
            server.add_node(NodeContext::new(n, "choria"), emitter, None).await.unwrap();
        }
        let url = relay_on(local).await;
        let client = RpcClient::new(Arc::new(HttpTransport::new(&url)), "choria=relayed", "choria");
        let options = RequestOptions { expected: Some(3), timeout: Duration::from_secs(10), ..Default::default() };
        let results = client.call("rpcutil", "ping", chorus_schemas::rpc::JsonObject::new(), options).await.unwrap();
        assert_eq!((results.summary.replies, results.summary.ok), (3, 3), "{:?}", results.summary);
        let direct = RequestOptions { target: crate::Target::Node("n2".into()), ..Default::default() };
        let results = client.call("rpcutil", "ping", chorus_schemas::rpc::JsonObject::new(), direct).await.unwrap();
        assert_eq!(results.replies.len(), 1);
        assert_eq!(results.replies[0].identity, "n2");

        let http = reqwest::Client::new();
        let post = |exchange: serde_json::Value| {
            let http = http.clone();
            let url = format!("{url}/api/relay");
            async move {
                let response = http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(exchange.to_string())
                    .send()
                    .await
                    .unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            }
        };
        let payload = base64::engine::general_purpose::STANDARD.encode(b"{}");
        let (status, body) = post(serde_json::json!({
            "inbox": "choria.reply.x.1", "messages": [{"subject": "choria.reply.someone.1", "payload": payload}]
        }))
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("only request subjects are relayed"), "{body}");
        let (status, body) = post(serde_json::json!({"inbox": "choria.reply.>", "messages": []})).await;
        assert_eq!(status, 400, "a wildcard inbox would read other callers' replies: {body}");
        let (status, body) = post(serde_json::json!({
            "inbox": "choria.reply.x.2", "messages": [{"subject": "choria.node.n1", "payload": "not base64!"}]
        }))
        .await;
        assert_eq!(status, 400, "{body}");
    }
}
