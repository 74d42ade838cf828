//! How RPC messages move: a small publish/subscribe [`Transport`] with core NATS semantics,
//! implemented over a real NATS connection ([`NatsTransport`]) and in-process
//! ([`LocalTransport`]).
//!
//! The trait is no wider than what RPC needs — publish with an optional reply subject,
//! subscribe with `*`/`>` wildcards, a unique inbox, flush — so the in-process version can
//! honour exactly the same semantics and the server and client never know which they use.
//!
//! Subjects follow Choria:
//!
//! | Purpose | Subject |
//! |---|---|
//! | broadcast to every node with an agent | `<collective>.broadcast.agent.<agent>` |
//! | directed to one node | `<collective>.node.<identity>` |
//! | replies | `<collective>.reply.<caller token>.<unique>` |

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::RpcError;

/// Largest request or reply accepted: NATS's default max payload. Anything larger could not
/// have crossed a real connection, so the in-process transport refuses it too.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// `<collective>.broadcast.agent.<agent>`: every node with the agent receives it.
pub fn broadcast_subject(collective: &str, agent: &str) -> String {
    format!("{collective}.broadcast.agent.{agent}")
}

/// `<collective>.node.<identity>`: only the named node receives it. Identities usually
/// contain dots, so this subject has a variable number of tokens.
pub fn node_subject(collective: &str, identity: &str) -> String {
    format!("{collective}.node.{identity}")
}

/// A fresh, unguessable reply inbox of `callerid`:
/// `<collective>.reply.<reply token of the caller>.<32 hex digits>`. The caller's token
/// ([`chorus_identity::reply_token`]) makes the subject private: the broker lets only the
/// caller subscribe there, and nodes that check callers answer nowhere else.
pub fn reply_inbox(collective: &str, callerid: &str) -> String {
    format!("{collective}.reply.{}.{}", chorus_identity::reply_token(callerid), uuid::Uuid::new_v4().simple())
}

/// One message as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportMessage {
    /// The subject it was published on (never a wildcard).
    pub subject: String,
    /// Where answers go, when the publisher asked for them.
    pub reply: Option<String>,
    /// The body.
    pub payload: Bytes,
}

/// Publish/subscribe with core NATS semantics: at most once, no persistence, every matching
/// subscription gets its own copy, and a subscription ends (unsubscribes) when dropped.
#[async_trait]
pub trait Transport: Send + Sync {
    /// Publishes `payload` on `subject`, asking for answers on `reply` when given.
    /// Nobody listening is not an error.
    async fn publish(&self, subject: &str, reply: Option<&str>, payload: Bytes) -> Result<(), RpcError>;

    /// Subscribes to `subject`, which may contain `*` (one token) and a trailing `>` (one or
    /// more tokens). The subscription sees every message published *through this same
    /// transport* after this returns; for publishers elsewhere, see [`Transport::flush`].
    async fn subscribe(&self, subject: &str) -> Result<Subscription, RpcError>;

    /// Returns once the server has processed everything this transport published and
    /// subscribed so far, so that publishers on *other* connections are sure to reach the
    /// subscriptions made before. (Writing to the socket is not enough: the server orders
    /// each connection's traffic, not traffic across connections.)
    async fn flush(&self) -> Result<(), RpcError>;

    /// Whether the transport reaches its server now (always, in process): a node does not
    /// wait on a flush that only a reconnection could answer.
    fn connected(&self) -> bool {
        true
    }
}

/// The messages of one subscription, in arrival order. Dropping it unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = TransportMessage> + Send>>,
}

impl Subscription {
    /// Wraps any stream of messages (for other transports and tests).
    pub fn new(stream: impl Stream<Item = TransportMessage> + Send + 'static) -> Self {
        Subscription { inner: Box::pin(stream) }
    }
}

impl Stream for Subscription {
    type Item = TransportMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

/// Checks a subject as NATS would: non-empty dot-separated tokens without whitespace;
/// wildcards only where `wildcards` (subscriptions), and `>` only last.
pub(crate) fn validate_subject(subject: &str, wildcards: bool) -> Result<(), RpcError> {
    match chorus_backbone::subject::problem(subject, wildcards) {
        None => Ok(()),
        Some(reason) => Err(RpcError::InvalidSubject { subject: subject.to_string(), reason }),
    }
}

/// RPC over core NATS. Cheap to clone; all clones share the connection.
#[derive(Debug, Clone)]
pub struct NatsTransport {
    client: async_nats::Client,
}

impl NatsTransport {
    /// Uses an existing connection (so one connection can carry RPC, events and more).
    pub fn new(client: async_nats::Client) -> Self {
        NatsTransport { client }
    }

    /// Connects to `url` with default options.
    pub async fn connect(url: &str) -> Result<Self, RpcError> {
        let client =
            async_nats::connect(url).await.map_err(|e| RpcError::Transport(format!("connecting to {url}: {e}")))?;
        Ok(NatsTransport { client })
    }

    /// The underlying connection.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn publish(&self, subject: &str, reply: Option<&str>, payload: Bytes) -> Result<(), RpcError> {
        validate_subject(subject, false)?;
        let result = match reply {
            Some(reply) => {
                validate_subject(reply, false)?;
                self.client.publish_with_reply(subject.to_string(), reply.to_string(), payload).await
            }
            None => self.client.publish(subject.to_string(), payload).await,
        };
        result.map_err(|e| RpcError::Transport(format!("publishing to {subject}: {e}")))
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, RpcError> {
        validate_subject(subject, true)?;
        let subscriber = self
            .client
            .subscribe(subject.to_string())
            .await
            .map_err(|e| RpcError::Transport(format!("subscribing to {subject}: {e}")))?;
        Ok(Subscription::new(subscriber.map(|m| TransportMessage {
            subject: m.subject.to_string(),
            reply: m.reply.map(|r| r.to_string()),
            payload: m.payload,
        })))
    }

    async fn flush(&self) -> Result<(), RpcError> {
        // A round trip through the server: once a message to our own fresh inbox comes
        // back, everything this connection sent before it has been processed.
        let err = |e: &dyn std::fmt::Display| RpcError::Transport(format!("flush: {e}"));
        let inbox = self.client.new_inbox();
        let mut echo = self.client.subscribe(inbox.clone()).await.map_err(|e| err(&e))?;
        self.client.publish(inbox, Bytes::new()).await.map_err(|e| err(&e))?;
        self.client.flush().await.map_err(|e| err(&e))?;
        match tokio::time::timeout(FLUSH_TIMEOUT, echo.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(err(&"connection closed")),
            Err(_) => Err(err(&format!("no answer from the server within {FLUSH_TIMEOUT:?}"))),
        }
    }
}

/// How long [`NatsTransport::flush`] waits for its round trip.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Default per-subscription queue of [`LocalTransport`]: enough for a 50,000-node fan-in.
pub const LOCAL_QUEUE: usize = 65_536;

/// RPC inside one process, with the subject semantics of NATS, so a single-process
/// `chorus up` (and the tests) run the real server and client with no NATS server.
///
/// Like a NATS server facing a slow consumer, it never lets one subscriber stall the
/// publisher: a message for a subscription whose queue is full is dropped and counted
/// ([`LocalTransport::dropped`]). Cheap to clone; clones share the subscriptions.
#[derive(Clone)]
pub struct LocalTransport {
    shared: Arc<LocalShared>,
}

struct LocalShared {
    subs: RwLock<LocalSubs>,
    next_id: AtomicU64,
    dropped: AtomicU64,
    capacity: usize,
}

/// Exact subjects are looked up by hash (replies to an inbox, directed requests); only
/// wildcard subscriptions are scanned.
#[derive(Default)]
struct LocalSubs {
    exact: HashMap<String, Vec<(u64, mpsc::Sender<TransportMessage>)>>,
    wildcard: Vec<(u64, String, mpsc::Sender<TransportMessage>)>,
}

impl LocalTransport {
    /// A transport whose subscriptions each queue up to [`LOCAL_QUEUE`] messages.
    pub fn new() -> Self {
        Self::with_capacity(LOCAL_QUEUE)
    }

    /// A transport whose subscriptions each queue up to `capacity` messages.
    pub fn with_capacity(capacity: usize) -> Self {
        LocalTransport {
            shared: Arc::new(LocalShared {
                subs: RwLock::new(LocalSubs::default()),
                next_id: AtomicU64::new(1),
                dropped: AtomicU64::new(0),
                capacity: capacity.max(1),
            }),
        }
    }

    /// Messages dropped because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn deliver(&self, tx: &mpsc::Sender<TransportMessage>, message: &TransportMessage) {
        match tx.try_send(message.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subject = %message.subject, "local transport: slow consumer, message dropped");
            }
            // The subscription is being dropped; its guard removes it.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

impl Default for LocalTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LocalTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTransport").field("dropped", &self.dropped()).finish()
    }
}

/// Removes a local subscription when its [`Subscription`] is dropped.
struct Unsubscribe {
    shared: Arc<LocalShared>,
    id: u64,
    subject: String,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let mut subs = self.shared.subs.write().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = subs.exact.get_mut(&self.subject) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                subs.exact.remove(&self.subject);
            }
        }
        subs.wildcard.retain(|(id, _, _)| *id != self.id);
    }
}

#[async_trait]
impl Transport for LocalTransport {
    async fn publish(&self, subject: &str, reply: Option<&str>, payload: Bytes) -> Result<(), RpcError> {
        validate_subject(subject, false)?;
        if let Some(reply) = reply {
            validate_subject(reply, false)?;
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(RpcError::Transport(format!(
                "payload of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        let message = TransportMessage { subject: subject.to_string(), reply: reply.map(str::to_string), payload };
        let subs = self.shared.subs.read().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = subs.exact.get(subject) {
            for (_, tx) in list {
                self.deliver(tx, &message);
            }
        }
        for (_, pattern, tx) in &subs.wildcard {
            if chorus_backbone::subject::matches(pattern, subject) {
                self.deliver(tx, &message);
            }
        }
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, RpcError> {
        validate_subject(subject, true)?;
        let (tx, mut rx) = mpsc::channel(self.shared.capacity);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut subs = self.shared.subs.write().unwrap_or_else(|e| e.into_inner());
            if subject.split('.').any(|t| t == "*" || t == ">") {
                subs.wildcard.push((id, subject.to_string(), tx));
            } else {
                subs.exact.entry(subject.to_string()).or_default().push((id, tx));
            }
        }
        let guard = Unsubscribe { shared: Arc::clone(&self.shared), id, subject: subject.to_string() };
        Ok(Subscription::new(futures::stream::poll_fn(move |cx| {
            let _keep = &guard;
            rx.poll_recv(cx)
        })))
    }

    async fn flush(&self) -> Result<(), RpcError> {
        // Delivery is synchronous: a publish is queued at every subscriber before it returns.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_validated() {
        assert!(validate_subject("a.b", false).is_ok());
        assert!(validate_subject("a.*", false).is_err());
        assert!(validate_subject("a.*", true).is_ok());
        assert!(validate_subject("a.>.b", true).is_err());
        assert!(validate_subject("a..b", true).is_err());
        assert!(validate_subject("a b", true).is_err());
        assert!(validate_subject("", true).is_err());
    }

    /// The next message already delivered, if any: the local transport delivers during
    /// `publish`, so nothing more can arrive later for what was published before.
    fn next(sub: &mut Subscription) -> Option<TransportMessage> {
        futures::FutureExt::now_or_never(sub.next()).flatten()
    }

    #[tokio::test]
    async fn local_transport_delivers_to_every_matching_subscription() {
        let t = LocalTransport::new();
        let mut exact = t.subscribe("c.node.n1.example").await.unwrap();
        let mut wild = t.subscribe("c.node.>").await.unwrap();
        let mut other = t.subscribe("c.node.n2").await.unwrap();
        t.publish("c.node.n1.example", Some("c.reply.x"), Bytes::from_static(b"hi")).await.unwrap();
        let m = next(&mut exact).unwrap();
        assert_eq!(m.reply.as_deref(), Some("c.reply.x"));
        assert_eq!(m.payload, Bytes::from_static(b"hi"));
        assert_eq!(next(&mut wild).unwrap().subject, "c.node.n1.example");
        assert!(next(&mut other).is_none());
        assert!(t.publish("c.*", None, Bytes::new()).await.is_err());
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes_and_full_queues_drop() {
        let t = LocalTransport::with_capacity(1);
        let sub = t.subscribe("x.>").await.unwrap();
        t.publish("x.1", None, Bytes::new()).await.unwrap();
        t.publish("x.2", None, Bytes::new()).await.unwrap();
        assert_eq!(t.dropped(), 1);
        drop(sub);
        assert!(t.shared.subs.read().unwrap().wildcard.is_empty());
        t.publish("x.3", None, Bytes::new()).await.unwrap();
        assert_eq!(t.dropped(), 1);
    }
}
