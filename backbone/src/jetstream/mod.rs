//! The JetStream engine: the production and multi-site backbone, over async-nats.
//!
//! Event ids travel as `Nats-Msg-Id`, so JetStream's own duplicate window does the dedupe and
//! a retried or replicated publish is stored once. Publishes are pipelined (many in flight,
//! acknowledgements awaited together) and retried through broker restarts and leader changes.

mod connect;
mod consumer;
mod delivery;
mod errors;
mod headers;
mod kv;
mod ordered;
mod pipeline;
mod sequenced;
mod sourcing;

use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamByNameErrorKind, GetStreamErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, message::PublishMessage as Publish, stream};
use async_trait::async_trait;
use chorus_runtime::Backoff;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::message::Headers;
use crate::{
    Backbone, BackboneError, Consumer, ConsumerConfig, Message, MessageStream, PublishAck, ReplayOptions, Result,
    StartPosition, StoredMessage, StreamConfig, StreamInfo,
};

pub use connect::{NatsAuth, NatsConfig};
pub use sequenced::{SequencedAck, EVENT_ID_HEADER, EXPECTED_LAST_SEQUENCE_HEADER};
pub use sourcing::{
    sourced_sequence, sources_stop_at_duplicates, transforms_sources, NativeSource, RemoteStream, SourceStatus,
    SOURCE_HEADER,
};

/// Header carrying the event id; JetStream dedupes on it.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Pauses between retries of a JetStream call: 50 ms doubling to 1 s, within `retry_for`.
const API_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(1));

/// Ack permits of the JetStream context, used by single publishes and retries: far above any
/// window, so they never block.
const CONTEXT_ACK_PERMITS: usize = 1 << 20;

/// The largest publish window: the acknowledgements of a window must fit the buffer of the
/// pipeline's inbox subscription (async-nats's default of 65,536), or the client drops them
/// as a slow consumer and each costs a timeout.
const MAX_WINDOW: usize = 65_536;

/// Idle acknowledgement inboxes kept per connection; more are unsubscribed.
const IDLE_INBOXES: usize = 16;

/// A [`Backbone`] on NATS JetStream. Cheap to clone.
#[derive(Clone)]
pub struct JetStreamBackbone {
    client: async_nats::Client,
    js: jetstream::Context,
    retry_for: Duration,
    /// Publishes kept in flight by a publish pipeline (see [`pipeline`]); at most
    /// [`MAX_WINDOW`].
    window: usize,
    /// Acknowledgement inboxes of pipelines that ended, for the next ones (see [`pipeline`]).
    idle_inboxes: std::sync::Arc<std::sync::Mutex<Vec<pipeline::AckInbox>>>,
    /// The JetStream domain this backbone's API calls go to, when configured.
    domain: Option<String>,
    /// How long a JetStream API request may take.
    request_timeout: Duration,
}

impl JetStreamBackbone {
    /// Connects with `config`.
    pub async fn connect(config: &NatsConfig) -> Result<Self> {
        Self::connect_with_tls(config, None).await
    }

    /// Connects with a ready rustls client configuration (e.g. a PKCS#11-held client key).
    pub async fn connect_with_tls(config: &NatsConfig, tls: Option<rustls::ClientConfig>) -> Result<Self> {
        let client = config.connect(tls).await?;
        Ok(Self::from_client(client, config))
    }

    /// Wraps an existing connection.
    pub fn from_client(client: async_nats::Client, config: &NatsConfig) -> Self {
        // In-flight publishes are bounded by the pipeline's window, not by the context's
        // ack permits: a server killed with acknowledgements in flight could leave permits
        // that are never given back, and a later publish would then wait on them forever
        // (seen as a producer hung after a broker restart).
        let mut builder = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .max_ack_inflight(CONTEXT_ACK_PERMITS)
            .backpressure_on_inflight(true);
        if let Some(domain) = &config.domain {
            builder = builder.domain(domain).timeout(config.request_timeout);
        }
        JetStreamBackbone {
            js: builder.build(client.clone()),
            client,
            retry_for: config.publish_retry_for,
            window: (config.max_ack_inflight / 2).clamp(1, MAX_WINDOW),
            idle_inboxes: Default::default(),
            domain: config.domain.clone(),
            request_timeout: config.request_timeout,
        }
    }

    /// An acknowledgement inbox a finished pipeline gave back, if any.
    fn idle_inbox(&self) -> Option<pipeline::AckInbox> {
        self.idle_inboxes.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Keeps a finished pipeline's inbox for the next one (dropping it unsubscribes).
    fn give_back(&self, inbox: pipeline::AckInbox) {
        let mut idle = self.idle_inboxes.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.reusable() && idle.len() < IDLE_INBOXES {
            idle.push(inbox);
        }
    }

    /// The underlying connection, for callers that also need core NATS (RPC, benchmarks).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The underlying JetStream context.
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    async fn get_stream(&self, name: &str) -> Result<stream::Stream> {
        self.retrying(|| async {
            self.js.get_stream(name).await.map_err(|e| match e.kind() {
                GetStreamErrorKind::JetStream(api) if api.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                    BackboneError::NotFound { kind: "stream", name: name.to_string() }
                }
                _ => BackboneError::from(e),
            })
        })
        .await
    }

    /// Retries a JetStream API call through transient failures (a cluster electing a stream or
    /// consumer leader answers with timeouts for a few seconds) for up to `retry_for`.
    async fn retrying<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        self.retrying_since(Instant::now(), call).await
    }

    /// [`Self::retrying`] with the `retry_for` budget counted from `started` (a whole batch
    /// shares one budget).
    async fn retrying_since<T, F, Fut>(&self, started: Instant, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut retry = API_BACKOFF.retry();
        loop {
            match call().await {
                Err(e) if e.is_transient() && started.elapsed() < self.retry_for => {
                    tracing::debug!(error = %e, "JetStream call failed, retrying");
                    tokio::time::sleep(retry.next_delay()).await;
                }
                other => return other,
            }
        }
    }

    /// Publishes one message until it is acknowledged or `retry_for` has passed. Safe to repeat:
    /// the event id makes every attempt after a stored one a duplicate.
    async fn publish_retrying(&self, m: &Message, started: Instant) -> Result<PublishAck> {
        self.retrying_since(started, || async {
            let attempt = async {
                let fut = self.js.send_publish(m.subject.clone(), publish_of(m)).await?;
                fut.await
            };
            match attempt.await {
                Ok(ack) => Ok(to_ack(ack)),
                Err(err) => Err(match self.fatal_publish_error(m, &err).await {
                    Some(fatal) => fatal,
                    None => BackboneError::from(err),
                }),
            }
        })
        .await
        .map_err(|e| match e {
            BackboneError::Nats { transient: true, source } => BackboneError::Timeout {
                operation: format!("publishing {} to {}", m.id, m.subject),
                source: Some(source),
            },
            other => other,
        })
    }

    /// Errors that retrying cannot fix: too large, or no stream captures the subject.
    async fn fatal_publish_error(&self, m: &Message, err: &PublishError) -> Option<BackboneError> {
        match err.kind() {
            PublishErrorKind::MaxPayloadExceeded => Some(BackboneError::InvalidMessage(format!("{}: {err}", m.id))),
            // A cluster in a leader election also answers "no responders"; only a stream that
            // the server says does not exist is final.
            PublishErrorKind::StreamNotFound => match self.js.stream_by_subject(m.subject.clone()).await {
                Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
                    Some(BackboneError::NoStreamForSubject(m.subject.clone()))
                }
                _ => None,
            },
            _ => None,
        }
    }
}

fn to_ack(ack: jetstream::publish::PublishAck) -> PublishAck {
    PublishAck { stream: ack.stream, sequence: ack.sequence, duplicate: ack.duplicate }
}

pub(crate) fn to_chrono(t: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_nanos(t.unix_timestamp_nanos() as i64)
}

/// The delivery fields of a message from a consumer: read from its reply subject, or, where
/// that does not have a form [`delivery::delivered`] knows, by async-nats (which says why).
pub(crate) fn delivery_of(m: &async_nats::jetstream::Message) -> Result<delivery::Delivered> {
    if let Some(delivered) = m.reply.as_deref().and_then(delivery::delivered) {
        return Ok(delivered);
    }
    let info = m.info().map_err(BackboneError::nats_untyped)?;
    Ok(delivery::Delivered {
        stream_sequence: info.stream_sequence,
        consumer_sequence: info.consumer_sequence,
        delivered: info.delivered.max(0) as u64,
        pending: info.pending,
        published: to_chrono(info.published),
    })
}

pub(crate) fn to_time(t: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(t.timestamp_nanos_opt().unwrap_or(0) as i128)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn deliver_policy(start: &StartPosition) -> jetstream::consumer::DeliverPolicy {
    use jetstream::consumer::DeliverPolicy;
    match start {
        StartPosition::First => DeliverPolicy::All,
        StartPosition::New => DeliverPolicy::New,
        StartPosition::Sequence(s) => DeliverPolicy::ByStartSequence { start_sequence: (*s).max(1) },
        StartPosition::Time(t) => DeliverPolicy::ByStartTime { start_time: to_time(*t) },
    }
}

/// The one filter JetStream 2.9 can apply server-side; several are applied client-side.
pub(crate) fn server_filter(filters: &[String]) -> String {
    if filters.len() == 1 {
        filters[0].clone()
    } else {
        String::new()
    }
}

pub(crate) fn stored(stream: &str, sequence: u64, time: DateTime<Utc>, msg: &async_nats::Message) -> StoredMessage {
    let (id, headers) = msg.headers.as_ref().map(id_and_headers).unwrap_or_default();
    StoredMessage {
        stream: stream.to_owned(),
        sequence,
        time,
        id,
        subject: msg.subject.as_str().to_owned(),
        payload: msg.payload.clone(),
        headers,
    }
}

/// The event id (`Nats-Msg-Id`, empty when there is none) and the other headers, by name, in
/// one pass (a lookup by name costs as much as the pass: these run per message read).
fn id_and_headers(map: &async_nats::HeaderMap) -> (String, Headers) {
    let mut id = None;
    let mut headers: Headers = Vec::new();
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        if name.eq_ignore_ascii_case(MSG_ID_HEADER) {
            // The id is the first value under its exact name, as a lookup by name gives;
            // other spellings are dropped with it.
            if name == MSG_ID_HEADER {
                id = values.first().map(|v| v.as_str().to_owned()).or(id);
            }
        } else if name == EVENT_ID_HEADER {
            // A sequenced message's id (`Nats-Msg-Id` wins where both are given).
            if id.is_none() {
                id = values.first().map(|v| v.as_str().to_owned());
            }
        } else {
            headers.extend(values.iter().map(|v| (name.to_owned(), v.as_str().to_owned())));
        }
    }
    headers.sort();
    (id.unwrap_or_default(), headers)
}

/// The answer of the stream message get API.
#[derive(serde::Deserialize)]
struct MsgGetResponse {
    message: MsgGetMessage,
}

#[derive(serde::Deserialize)]
struct MsgGetMessage {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: Option<String>,
    time: DateTime<Utc>,
}

/// The event id and the other headers of a NATS header block (`NATS/1.0` then
/// `Name: value` lines), every value of a repeated name kept, as delivered messages are.
fn parse_headers(block: &[u8]) -> (String, Headers) {
    let (mut id, mut headers) = (String::new(), Headers::new());
    let text = String::from_utf8_lossy(block);
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        if name.eq_ignore_ascii_case(MSG_ID_HEADER) {
            id = value.trim().to_string();
        } else if name == EVENT_ID_HEADER {
            if id.is_empty() {
                id = value.trim().to_string();
            }
        } else {
            headers.push((name.to_string(), value.trim().to_string()));
        }
    }
    headers.sort();
    (id, headers)
}

/// The JetStream publish of `m`, with [`headers::of_message`].
fn publish_of(m: &Message) -> Publish {
    Publish::build().headers(headers::of_message(m)).payload(m.payload.clone())
}

/// A JetStream stream's configuration as a [`StreamConfig`] (unlimited as 0, no age as none).
fn config_of(c: &stream::Config) -> StreamConfig {
    let limit = |v: i64| u64::try_from(v).unwrap_or(0);
    StreamConfig {
        name: c.name.clone(),
        subjects: c.subjects.clone(),
        max_messages: limit(c.max_messages),
        max_bytes: limit(c.max_bytes),
        max_age: (!c.max_age.is_zero()).then_some(c.max_age),
        dedupe_window: c.duplicate_window,
        replicas: c.num_replicas,
    }
}

fn stream_config(c: &StreamConfig) -> stream::Config {
    let limit = |v: u64| if v == 0 { -1 } else { v as i64 };
    stream::Config {
        name: c.name.clone(),
        subjects: c.subjects.clone(),
        max_messages: limit(c.max_messages),
        max_bytes: limit(c.max_bytes),
        max_age: c.max_age.unwrap_or_default(),
        duplicate_window: c.dedupe_window,
        num_replicas: c.replicas,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    }
}

fn info_of(i: &stream::Info) -> StreamInfo {
    StreamInfo {
        name: i.config.name.clone(),
        subjects: i.config.subjects.clone(),
        messages: i.state.messages,
        bytes: i.state.bytes,
        first_sequence: i.state.first_sequence,
        last_sequence: i.state.last_sequence,
        consumers: i.state.consumer_count,
    }
}

#[async_trait]
impl Backbone for JetStreamBackbone {
    fn engine(&self) -> &'static str {
        "jetstream"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn ensure_stream(&self, config: &StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        match self.get_stream(&config.name).await {
            // Left as it is: see the trait. Its info is fresh from the lookup.
            Ok(existing) => return Ok(info_of(existing.cached_info())),
            Err(BackboneError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let created = self.js.create_stream(stream_config(config)).await.map_err(|e| BackboneError::Refused {
            operation: format!("creating stream {}", config.name),
            source: Box::new(e),
        })?;
        Ok(info_of(created.cached_info()))
    }

    async fn update_stream(&self, config: &StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        self.get_stream(&config.name).await?;
        // Only what this trait describes changes: the stream's whole configuration is read
        // and written back as the server's JSON, so what it does not describe (a mirror,
        // sources and their subject transforms, placement, fields newer than this client)
        // is kept as it is.
        let info = self.update_stream_fields(config).await.map_err(|e| match e {
            BackboneError::Refused { source, .. } => {
                BackboneError::Refused { operation: format!("updating stream {}", config.name), source }
            }
            e => e,
        })?;
        Ok(info_of(&info))
    }

    async fn stream_config(&self, stream: &str) -> Result<StreamConfig> {
        let s = self.get_stream(stream).await?;
        Ok(config_of(&s.cached_info().config))
    }

    async fn streams(&self) -> Result<Vec<StreamConfig>> {
        let mut out: Vec<StreamConfig> = self
            .retrying(|| async {
                let mut list = self.js.streams();
                let mut out = Vec::new();
                while let Some(info) = list.next().await {
                    out.push(config_of(
                        &info.map_err(|e| BackboneError::Nats { transient: true, source: Box::new(e) })?.config,
                    ));
                }
                Ok(out)
            })
            .await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        let s = self.get_stream(stream).await?;
        self.retrying(|| {
            let mut s = s.clone();
            async move { s.info().await.map(info_of).map_err(BackboneError::from) }
        })
        .await
    }

    async fn delete_stream(&self, stream: &str) -> Result<()> {
        self.get_stream(stream).await?;
        self.js.delete_stream(stream).await?;
        Ok(())
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Result<Vec<PublishAck>> {
        // Checked before anything is sent, so an invalid message stores none of its batch.
        for m in &messages {
            m.validate()?;
        }
        let n = messages.len();
        let mut acks =
            pipeline::publish(std::sync::Arc::new(self.clone()), Box::pin(futures::stream::iter(messages)), false);
        let mut out = Vec::with_capacity(n);
        while let Some(ack) = acks.next().await {
            out.push(ack?);
        }
        Ok(out)
    }

    fn publish_stream<'a>(self: std::sync::Arc<Self>, messages: crate::Outgoing<'a>) -> crate::AckStream<'a> {
        pipeline::publish(self, messages, true)
    }

    async fn consumer(&self, stream: &str, config: &ConsumerConfig) -> Result<Box<dyn Consumer>> {
        config.validate()?;
        let s = self.get_stream(stream).await?;
        let consumer =
            self.retrying(|| consumer::JetStreamConsumer::open(s.clone(), self.client.clone(), stream, config)).await?;
        Ok(Box::new(consumer))
    }

    async fn delete_consumer(&self, stream: &str, name: &str) -> Result<()> {
        let s = self.get_stream(stream).await?;
        s.delete_consumer(name).await.map_err(|e| match e.kind() {
            stream::ConsumerErrorKind::JetStream(api) if api.error_code() == ErrorCode::CONSUMER_NOT_FOUND => {
                BackboneError::NotFound { kind: "consumer", name: name.to_string() }
            }
            _ => BackboneError::from(e),
        })?;
        Ok(())
    }

    async fn replay(&self, stream: &str, options: ReplayOptions) -> Result<MessageStream> {
        for f in &options.filter_subjects {
            crate::subject::validate_filter(f)?;
        }
        let last = self.stream_info(stream).await?.last_sequence;
        let start = match &options.start {
            StartPosition::New => StartPosition::Sequence(last + 1),
            other => other.clone(),
        };
        if !options.follow {
            if let StartPosition::Sequence(seq) = start {
                if seq > last {
                    return Ok(Box::pin(futures::stream::empty()));
                }
            }
            if last == 0 {
                return Ok(Box::pin(futures::stream::empty()));
            }
        }
        let filter = server_filter(&options.filter_subjects);
        let ordered = ordered::Ordered::start(self, stream, filter, deliver_policy(&start), !options.follow).await?;
        if ordered.pending_at_start == 0 && !options.follow {
            return Ok(Box::pin(futures::stream::empty()));
        }
        // The stream name and filters travel in the unfold's state: nothing is cloned per message.
        let state = (ordered, false, stream.to_string(), options.filter_subjects.clone());
        let follow = options.follow;
        // A finite replay ends right after the message that reached the end of the stream,
        // without reading the ordered consumer again (it would wait for new messages).
        let out = futures::stream::unfold(state, move |(mut ordered, ended, name, filters)| async move {
            if ended {
                return None;
            }
            loop {
                let (info, m) = match ordered.next().await? {
                    Ok(delivered) => delivered,
                    Err(e) => return Some((Err(e), (ordered, false, name, filters))),
                };
                let done = !follow && (info.pending == 0 || info.stream_sequence >= last);
                let message = stored(&name, info.stream_sequence, info.published, &m);
                if crate::subject::matches_any(&filters, &message.subject) {
                    return Some((Ok(message), (ordered, done, name, filters)));
                }
                if done {
                    return None;
                }
            }
        });
        Ok(Box::pin(out))
    }

    async fn purge(&self, stream: &str, below: u64) -> Result<u64> {
        let s = self.get_stream(stream).await?;
        let r = self.retrying(|| async { s.purge().sequence(below).await.map_err(BackboneError::from) }).await?;
        Ok(r.purged)
    }

    /// The stream's message get API, called directly: async-nats's `get_raw_message` keeps
    /// only the last value of a header given more than once.
    async fn get(&self, stream: &str, sequence: u64) -> Result<Option<StoredMessage>> {
        use async_nats::jetstream::response::Response;
        self.get_stream(stream).await?; // NotFound for a missing stream, as elsewhere
        let request = serde_json::json!({ "seq": sequence });
        let response: Response<MsgGetResponse> =
            self.js.request(format!("STREAM.MSG.GET.{stream}"), &request).await.map_err(BackboneError::from)?;
        let m = match response {
            Response::Ok(ok) => ok.message,
            Response::Err { error } if error.error_code() == ErrorCode::NO_MESSAGE_FOUND => return Ok(None),
            Response::Err { error } => {
                return Err(BackboneError::Nats { transient: errors::transient_code(&error), source: Box::new(error) })
            }
        };
        let base64 = |field: &str, text: Option<&str>| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(text.unwrap_or_default())
                .map_err(|e| BackboneError::Corrupt(format!("{stream} message {sequence}: {field}: {e}")))
        };
        let (id, headers) = match m.hdrs.as_deref() {
            Some(h) => parse_headers(&base64("hdrs", Some(h))?),
            None => Default::default(),
        };
        Ok(Some(StoredMessage {
            stream: stream.to_string(),
            sequence: m.seq,
            time: m.time,
            id,
            subject: m.subject,
            payload: base64("data", m.data.as_deref())?.into(),
            headers,
        }))
    }

    async fn bucket(&self, config: &crate::BucketConfig) -> Result<std::sync::Arc<dyn crate::Bucket>> {
        self.open_bucket(config).await
    }
}
