//! The calling side of RPC: [`RpcClient`] publishes a request and yields replies as they
//! arrive ([`ReplyStream`], for progress displays) or gathers them with a summary
//! ([`RpcClient::call`]).
//!
//! Like Choria, the client does not know in advance who will answer a broadcast: it waits
//! until the timeout, or until `expected` nodes have answered when the caller knows how
//! many should (after discovery, or for directed requests), which also lets the summary
//! count the nodes that never answered.
//!
//! A client with an [`Identity`] signs every request as its caller
//! ([`RpcClient::signed`]); one that trusts issuers ([`RpcClient::with_trust`]) accepts only
//! replies signed by the node they claim to come from. A reply that fails that check is not
//! a reply: it is counted as `unverified` and kept aside with the reason
//! ([`ReplyStream::rejected`]), never shown as ok.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chorus_schemas::rpc::{Filter, JsonObject};
use chorus_schemas::{RpcReply, RpcRequest, StatusCode};
use futures::{Stream, StreamExt};

use super::signed::{parse_signature, reply_signing_bytes, ReplyEnvelope, RequestEnvelope};
use super::transport::{broadcast_subject, node_subject, reply_inbox, Subscription, Transport, TransportMessage};
use super::RpcError;
use chorus_identity::{Credential, Identity, Issuers, Role};
use chorus_keys::PublicKey;

/// Which nodes a request is sent to. The discovery filter still applies on the nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    /// Every node with the agent in the collective.
    #[default]
    Broadcast,
    /// One node, on its directed subject.
    Node(String),
    /// Each of these nodes, on their directed subjects (Choria's direct addressing, used
    /// after discovery).
    Nodes(Vec<String>),
}

/// How to send one request and how long to wait.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// Discovery filter; empty selects every node.
    pub filter: Filter,
    /// Where the request is published.
    pub target: Target,
    /// How many nodes should answer; waiting stops once that many have. For
    /// [`Target::Node`] and [`Target::Nodes`] it defaults to the number of nodes named.
    pub expected: Option<usize>,
    /// How long to wait for replies after publishing.
    pub timeout: Duration,
    /// Seconds nodes accept the request after it was made.
    pub ttl: u64,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            filter: Filter::default(),
            target: Target::Broadcast,
            expected: None,
            timeout: Duration::from_secs(10),
            ttl: RpcRequest::DEFAULT_TTL,
        }
    }
}

/// Turns a request into the envelope that is published, signature included, when the
/// client itself holds no key: e.g. `chorus_aaa::AaaSigner` has the AAA
/// service judge and sign each request. A refusal fails the request before anything is
/// published.
#[async_trait]
pub trait RequestSigner: Send + Sync {
    /// The signed envelope of `request`, which it must carry unchanged.
    async fn sign(&self, request: RpcRequest) -> Result<RequestEnvelope, RpcError>;
}

/// A client's identity and the issuers whose nodes it believes, as configuration files name
/// them:
///
/// ```yaml
/// security:
///   key: {key_file: /etc/chorus/provisioner.key}   # or {pkcs11: {...}}
///   credential: /etc/chorus/provisioner.cred       # chorus credential issue --client
///   issuers: [/etc/chorus/issuer.pub]              # replies must be signed by their node
/// ```
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSecurity {
    /// The client's key.
    pub key: chorus_keys::KeyConfig,
    /// Its client credential; the caller id is the credential's.
    pub credential: std::path::PathBuf,
    /// Trusted issuers (files or directories); without, replies are not checked.
    #[serde(default)]
    pub issuers: Vec<std::path::PathBuf>,
}

impl ClientSecurity {
    /// A client in `collective` signing as the credential's caller and, with issuers,
    /// accepting only replies signed by their node.
    pub fn client(&self, transport: Arc<dyn Transport>, collective: impl Into<String>) -> Result<RpcClient, RpcError> {
        let identity = Identity::load(&self.key, &self.credential, Role::Client, None)
            .map_err(|e| RpcError::Invalid(format!("credential: {e}")))?;
        let mut client = RpcClient::signed(transport, identity, collective);
        if !self.issuers.is_empty() {
            let issuers = Issuers::from_paths(&self.issuers).map_err(|e| RpcError::Invalid(format!("issuers: {e}")))?;
            client = client.with_trust(Arc::new(issuers));
        }
        Ok(client)
    }
}

/// Signs every request with the caller's own key and credential.
#[derive(Clone, Debug)]
pub struct CallerSigner(pub Identity);

#[async_trait]
impl RequestSigner for CallerSigner {
    async fn sign(&self, request: RpcRequest) -> Result<RequestEnvelope, RpcError> {
        RequestEnvelope::signed(request, &self.0).map_err(|e| RpcError::Unauthorized(e.to_string()))
    }
}

/// Makes RPC requests as one caller in one collective.
#[derive(Clone)]
pub struct RpcClient {
    transport: Arc<dyn Transport>,
    callerid: String,
    collective: String,
    senderid: String,
    request_signer: Option<Arc<dyn RequestSigner>>,
    trust: Option<Arc<Issuers>>,
}

impl RpcClient {
    /// A client calling as `callerid` (e.g. `choria=rip.mcollective`, `up=bob`) into
    /// `collective`. Requests name this host as sender; see [`RpcClient::with_senderid`].
    pub fn new(transport: Arc<dyn Transport>, callerid: impl Into<String>, collective: impl Into<String>) -> Self {
        RpcClient {
            transport,
            callerid: callerid.into(),
            collective: collective.into(),
            senderid: local_hostname(),
            request_signer: None,
            trust: None,
        }
    }

    /// A client calling as the caller `identity`'s credential names, signing every request
    /// with its key.
    pub fn signed(transport: Arc<dyn Transport>, identity: Identity, collective: impl Into<String>) -> Self {
        let callerid = identity.subject().to_string();
        Self::new(transport, callerid, collective).with_request_signer(Arc::new(CallerSigner(identity)))
    }

    /// Accepts only replies signed by the node they claim to be from, with a node credential
    /// of one of `issuers`.
    pub fn with_trust(mut self, issuers: Arc<Issuers>) -> Self {
        self.trust = Some(issuers);
        self
    }

    /// Has every request signed by `signer` (e.g. the AAA service) before it is published.
    pub fn with_request_signer(mut self, signer: Arc<dyn RequestSigner>) -> Self {
        self.request_signer = Some(signer);
        self
    }

    /// Names a different sending host in requests (the `senderid`, which is also the
    /// identity of the request events nodes record).
    pub fn with_senderid(mut self, senderid: impl Into<String>) -> Self {
        self.senderid = senderid.into();
        self
    }

    /// The caller id requests are made as.
    pub fn callerid(&self) -> &str {
        &self.callerid
    }

    /// The collective requests are made in.
    pub fn collective(&self) -> &str {
        &self.collective
    }

    /// Publishes a request and returns the stream of its replies, which ends at the
    /// timeout or once the expected number of nodes answered.
    pub async fn request(
        &self,
        agent: &str,
        action: &str,
        data: JsonObject,
        options: RequestOptions,
    ) -> Result<ReplyStream, RpcError> {
        super::check_filter(&options.filter)?;
        let mut request =
            RpcRequest::new(self.callerid.clone(), self.senderid.clone(), self.collective.clone(), agent, action, data);
        request.filter = options.filter;
        request.ttl = options.ttl;
        let subjects = match &options.target {
            Target::Broadcast => vec![broadcast_subject(&self.collective, agent)],
            Target::Node(identity) => vec![node_subject(&self.collective, identity)],
            Target::Nodes(identities) => {
                let unique: HashSet<&String> = identities.iter().collect();
                let mut subjects: Vec<String> = unique.into_iter().map(|i| node_subject(&self.collective, i)).collect();
                subjects.sort();
                subjects
            }
        };
        let expected = options.expected.or(match &options.target {
            Target::Broadcast => None,
            Target::Node(_) | Target::Nodes(_) => Some(subjects.len()),
        });
        let envelope = match &self.request_signer {
            Some(signer) => signer.sign(request.clone()).await?,
            None => RequestEnvelope::new(request.clone()),
        };
        let payload = Bytes::from(serde_json::to_vec(&envelope)?);

        let inbox = reply_inbox(&self.collective, &self.callerid);
        // No flush needed: a transport orders its own subscribe before its own publish, and
        // nodes can only answer after the request was published.
        let replies = self.transport.subscribe(&inbox).await?;
        let started = Instant::now();
        for subject in &subjects {
            self.transport.publish(subject, Some(&inbox), payload.clone()).await?;
        }
        // One round trip, so an unreachable server is an error here rather than a silent
        // "no replies" after the timeout.
        self.transport.flush().await?;
        Ok(ReplyStream {
            request,
            replies,
            deadline: Box::pin(tokio::time::sleep(options.timeout)),
            expected,
            responders: HashSet::new(),
            counts: Counts::default(),
            trust: self.trust.clone(),
            rejected: Vec::new(),
            ready: VecDeque::new(),
            closed: false,
            started,
            finished: None,
        })
    }

    /// Makes a request and waits for all its replies.
    pub async fn call(
        &self,
        agent: &str,
        action: &str,
        data: JsonObject,
        options: RequestOptions,
    ) -> Result<RpcResults, RpcError> {
        let mut stream = self.request(agent, action, data, options).await?;
        let mut replies = Vec::new();
        while let Some(reply) = stream.next().await {
            replies.push(reply);
        }
        Ok(RpcResults { summary: stream.summary(), rejected: stream.rejected, request: stream.request, replies })
    }
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("callerid", &self.callerid)
            .field("collective", &self.collective)
            .field("senderid", &self.senderid)
            .finish()
    }
}

/// Every reply to one request, with the summary.
#[derive(Debug, Clone)]
pub struct RpcResults {
    /// The request as sent.
    pub request: RpcRequest,
    /// Replies in arrival order.
    pub replies: Vec<RpcReply>,
    /// Replies refused by the signature check, with the reason.
    pub rejected: Vec<RejectedReply>,
    /// Tallies over the replies.
    pub summary: RpcSummary,
}

/// A reply the client would not accept: unsigned, forged, or signed by another node than it
/// claims to be from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedReply {
    /// The identity the reply claims.
    pub identity: String,
    /// Why it was refused.
    pub reason: String,
}

/// Tallies of the replies to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcSummary {
    /// The request's id.
    pub requestid: String,
    /// Replies received.
    pub replies: usize,
    /// Replies with status OK.
    pub ok: usize,
    /// Replies denied by the node's Action Policy.
    pub denied: usize,
    /// Other replies (unknown action, bad input, failed action, ...).
    pub failed: usize,
    /// Nodes expected to answer, if known.
    pub expected: Option<usize>,
    /// Expected nodes that did not answer (only when `expected` is known).
    pub no_response: Option<usize>,
    /// Messages on the inbox that were not a reply to this request.
    pub ignored: usize,
    /// Replies to this request refused by the signature check (see [`RpcResults::rejected`]).
    pub unverified: usize,
    /// From publishing the request until the stream ended (or until now, before that).
    pub elapsed: Duration,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    replies: usize,
    ok: usize,
    denied: usize,
    failed: usize,
    ignored: usize,
    unverified: usize,
}

/// The replies to one request as they arrive. Dropping it stops listening.
pub struct ReplyStream {
    request: RpcRequest,
    replies: Subscription,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expected: Option<usize>,
    /// Identities that answered, so a node answering twice is not counted twice.
    responders: HashSet<String>,
    counts: Counts,
    trust: Option<Arc<Issuers>>,
    rejected: Vec<RejectedReply>,
    /// Replies accepted and not yet handed out, in arrival order.
    ready: VecDeque<RpcReply>,
    /// The subscription has ended.
    closed: bool,
    started: Instant,
    finished: Option<Instant>,
}

/// Replies taken from the subscription at once, so their signatures are checked together.
const VERIFY_BATCH: usize = 256;

impl ReplyStream {
    /// The request as sent (with its `requestid`).
    pub fn request(&self) -> &RpcRequest {
        &self.request
    }

    /// Nodes expected to answer, if known.
    pub fn expected(&self) -> Option<usize> {
        self.expected
    }

    /// Replies refused so far by the signature check.
    pub fn rejected(&self) -> &[RejectedReply] {
        &self.rejected
    }

    /// Tallies so far (final once the stream has ended).
    pub fn summary(&self) -> RpcSummary {
        let c = self.counts;
        RpcSummary {
            requestid: self.request.requestid.clone(),
            replies: c.replies,
            ok: c.ok,
            denied: c.denied,
            failed: c.failed,
            expected: self.expected,
            no_response: self.expected.map(|e| e.saturating_sub(self.responders.len())),
            ignored: c.ignored,
            unverified: c.unverified,
            elapsed: self.finished.unwrap_or_else(Instant::now) - self.started,
        }
    }

    fn finish(&mut self) -> Poll<Option<RpcReply>> {
        self.finished.get_or_insert_with(Instant::now);
        Poll::Ready(None)
    }

    fn complete(&self) -> bool {
        self.expected.is_some_and(|e| self.responders.len() >= e)
    }
}

impl Stream for ReplyStream {
    type Item = RpcReply;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RpcReply>> {
        let this = &mut *self;
        loop {
            if this.finished.is_some() || this.complete() {
                return this.finish();
            }
            if let Some(reply) = this.ready.pop_front() {
                this.count(&reply);
                return Poll::Ready(Some(reply));
            }
            // Everything that has arrived (up to a batch), then checked together.
            let mut batch = Vec::new();
            while !this.closed && batch.len() < VERIFY_BATCH {
                match this.replies.poll_next_unpin(cx) {
                    Poll::Ready(Some(message)) => batch.push(message),
                    Poll::Ready(None) => this.closed = true,
                    Poll::Pending => break,
                }
            }
            if !batch.is_empty() {
                this.accept(batch);
                continue;
            }
            if this.closed {
                return this.finish();
            }
            return match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => this.finish(),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl ReplyStream {
    /// Sorts arrived messages into replies to this request that are accepted (queued in
    /// `ready`), refused by the signature check (`rejected`) and anything else (`ignored`).
    /// With trust, the signatures of the batch are checked in one go and, only if that
    /// fails, one by one to find the bad ones.
    fn accept(&mut self, batch: Vec<TransportMessage>) {
        let mut checks: Vec<(RpcReply, SignedReply)> = Vec::with_capacity(batch.len());
        for message in batch {
            let (reply, signed) = match decode_reply(&message.payload) {
                Some((r, signed)) if r.requestid == self.request.requestid => (r, signed),
                _ => {
                    self.counts.ignored += 1;
                    continue;
                }
            };
            let Some(issuers) = &self.trust else {
                self.ready.push_back(reply);
                continue;
            };
            match check_reply(&reply, signed.as_ref(), issuers, &self.request) {
                Ok(check) => checks.push((reply, check)),
                Err(reason) => self.reject(reply, reason),
            }
        }
        let items: Vec<(&PublicKey, &[u8], &[u8; 64])> =
            checks.iter().map(|(_, c)| (c.credential.public_key(), c.bytes.as_slice(), &c.signature)).collect();
        let all_valid = PublicKey::verify_all(&items);
        drop(items);
        for (reply, check) in checks {
            if all_valid || check.credential.public_key().verify(&check.bytes, &check.signature) {
                self.ready.push_back(reply);
            } else {
                self.reject(reply, "reply signature does not verify (tampered or forged)".into());
            }
        }
    }

    fn reject(&mut self, reply: RpcReply, reason: String) {
        self.counts.unverified += 1;
        self.rejected.push(RejectedReply { identity: reply.identity, reason });
    }

    /// Tallies a reply as it is handed out.
    fn count(&mut self, reply: &RpcReply) {
        let c = &mut self.counts;
        c.replies += 1;
        if reply.statuscode == StatusCode::Ok {
            c.ok += 1;
        } else if !reply.authorized && reply.statuscode == StatusCode::Aborted {
            c.denied += 1;
        } else {
            c.failed += 1;
        }
        self.responders.insert(reply.identity.clone());
    }
}

impl std::fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyStream").field("summary", &self.summary()).finish()
    }
}

/// A reply as received: the record, and its signature and sender credential when signed.
/// Signed replies are an envelope with a `reply` member; unsigned ones the bare record.
/// The form tried first is the one the first member names (nodes write `reply` first), so
/// a reply is parsed once; the other form is still tried if that fails, whatever the order.
fn decode_reply(payload: &[u8]) -> Option<(RpcReply, Option<(String, String)>)> {
    let envelope =
        || serde_json::from_slice::<ReplyEnvelope>(payload).ok().map(|e| (e.reply, Some((e.signature, e.sender))));
    let bare = || serde_json::from_slice::<RpcReply>(payload).ok().map(|r| (r, None));
    if first_member_is(payload, b"reply") {
        envelope().or_else(bare)
    } else {
        bare().or_else(envelope)
    }
}

/// Whether the JSON object in `payload` starts with the member `name`.
fn first_member_is(payload: &[u8], name: &[u8]) -> bool {
    let mut rest = payload.trim_ascii_start().strip_prefix(b"{").unwrap_or_default().trim_ascii_start();
    rest = rest.strip_prefix(b"\"").unwrap_or_default();
    rest.strip_prefix(name).is_some_and(|r| r.first() == Some(&b'"'))
}

/// A reply's signature, ready to be checked against its sender's key.
struct SignedReply {
    credential: Arc<Credential>,
    bytes: Vec<u8>,
    signature: [u8; 64],
}

/// Whether `reply` is signed, under a node credential of a trusted issuer for the node it
/// claims to come from that covers the request's collective, by that credential's key:
/// everything but the signature itself, which the caller checks (in a batch).
fn check_reply(
    reply: &RpcReply,
    signed: Option<&(String, String)>,
    issuers: &Issuers,
    request: &RpcRequest,
) -> Result<SignedReply, String> {
    let (signature, sender) = signed.ok_or("unsigned reply")?;
    let credential = issuers
        .verify(sender, Role::Node, chrono::Utc::now().timestamp())
        .map_err(|e| format!("sender credential refused ({}): {e}", e.code()))?;
    if credential.subject() != reply.identity {
        return Err(format!(
            "reply from {:?} signed with the credential of {:?}",
            reply.identity,
            credential.subject()
        ));
    }
    if !credential.allows_collective(&request.collective) {
        return Err(format!("{:?} has no credential for collective {:?}", reply.identity, request.collective));
    }
    let (key_id, signature) = parse_signature(signature).map_err(|e| format!("reply signature: {e}"))?;
    if key_id != credential.public_key().key_id() {
        return Err(format!("reply signed by key {key_id:.40}, not the sender credential's"));
    }
    Ok(SignedReply { credential, bytes: reply_signing_bytes(reply), signature })
}

/// This host's name, the default `senderid`.
fn local_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply() -> RpcReply {
        let request = RpcRequest::new("choria=a", "s", "c", "rpcutil", "ping", Default::default());
        RpcReply::new(&request, "n1", StatusCode::Ok, Default::default())
    }

    #[test]
    fn replies_decode_in_either_form_and_member_order() {
        let bare = serde_json::to_vec(&reply()).unwrap();
        assert!(matches!(decode_reply(&bare), Some((r, None)) if r.identity == "n1"));
        let envelope = serde_json::json!({"reply": reply(), "signature": "k:s", "sender": "cred"});
        let signed = serde_json::to_vec(&envelope).unwrap();
        assert!(first_member_is(&signed, b"reply"));
        assert!(matches!(decode_reply(&signed), Some((_, Some((s, c)))) if s == "k:s" && c == "cred"));
        // Another writer's member order: still an envelope, found by the fallback.
        let reordered = format!(
            r#" {{ "sender":"cred", "signature":"k:s", "reply":{} }}"#,
            serde_json::to_string(&reply()).unwrap()
        );
        assert!(matches!(decode_reply(reordered.as_bytes()), Some((r, Some(_))) if r.identity == "n1"));
        assert!(decode_reply(b"{\"reply\": 3}").is_none());
        assert!(decode_reply(b"not json").is_none());
    }
}
