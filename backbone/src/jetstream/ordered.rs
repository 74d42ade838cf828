//! Ordered replay: every message of a stream (or of one filter) once, in stream order, with
//! no acknowledgements, through an ephemeral push consumer read by a plain subscription.
//!
//! This is the protocol of NATS's ordered consumers, as go-choria's and every client's: the
//! consumer acknowledges nothing, keeps its state in memory on one replica, sends flow
//! control requests (answered here, so the server never sends more than is read) and idle
//! heartbeats. A message whose consumer sequence is not the next one, a heartbeat saying
//! more was delivered than arrived, or a status saying the consumer is gone makes a new
//! consumer start after the last stream sequence delivered; nothing is skipped or repeated.
//! No message and no heartbeat for two heartbeat intervals (the server restarted, the
//! connection is down) does the same, and is reported as an error item so the reader can
//! say so.
//!
//! A *finite* replay (up to the stream's last sequence when it started) also ends when what
//! was left of that range is gone (expired, purged, deleted) before it was delivered: a
//! consumer made with nothing pending, or an idle heartbeat in step with what arrived that
//! the consumer's info confirms (nothing pending, everything delivered), ends it instead of
//! waiting for messages that will never come.
//!
//! Why not async-nats's ordered consumer: it wraps every message with a clone of the
//! JetStream context and parses its reply subject a second time (`Message::info`); profiles
//! of the replicator's copy loop put those at about 6% of its CPU per event. Here the reply
//! subject is read once, by [`super::delivery::delivered`].

use std::time::Duration;

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use async_nats::{StatusCode, Subscriber};
use futures::{FutureExt, StreamExt};

use super::delivery::Delivered;
use super::JetStreamBackbone;
use crate::{BackboneError, Result};

/// How often an idle consumer sends a heartbeat (async-nats's and Go's ordered default).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How often a replay waiting for messages checks whether its connection was made again
/// (the consumer may be gone with a restarted server, or messages lost in between).
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

/// The header of a heartbeat naming the subject to answer when flow control is stalled.
const STALLED_HEADER: &str = "Nats-Consumer-Stalled";

/// The consumer being read: its deliveries and its name (to delete it when replaced).
struct Current {
    deliveries: Subscriber,
    name: String,
    /// The consumer sequence of the last message delivered by this consumer.
    consumer_sequence: u64,
    /// The client's count of connections made when this consumer was made.
    connects: u64,
}

/// What waiting for a message came to.
enum Waited {
    /// The next message (`None`: the client is gone).
    Message(Option<async_nats::Message>),
    /// The connection was made again since the consumer was.
    Reconnected,
    /// Nothing, not even a heartbeat, for two heartbeat intervals.
    Silent,
}

/// What a heartbeat said.
enum Beat {
    /// Nothing new: go on reading.
    Read,
    /// Messages were missed: start again.
    Missed,
    /// The consumer has nothing left to send (its info says so): a finite replay is complete.
    Idle,
}

/// An ordered replay of one stream.
pub(crate) struct Ordered {
    backbone: JetStreamBackbone,
    stream: String,
    filter_subject: String,
    /// Where the first consumer starts; every later one starts after `stream_sequence`.
    start: DeliverPolicy,
    /// The stream sequence of the last message delivered (0 before the first).
    stream_sequence: u64,
    current: Option<Current>,
    /// Messages left to deliver when the first consumer was made.
    pub(crate) pending_at_start: u64,
    /// A finite replay: it ends when nothing is left to deliver (see the module's notes).
    finite: bool,
}

impl Drop for Ordered {
    /// The server would drop the consumer once nothing listens (after its inactivity
    /// threshold); deleting it now keeps many short replays from piling consumers up.
    fn drop(&mut self) {
        self.reset();
    }
}

impl Ordered {
    /// Starts a replay of `stream` at `start`, filtered by `filter_subject` (empty: all);
    /// `finite`: it ends once nothing is left to deliver (the caller ends it at the stream's
    /// last sequence as it was at the start).
    pub(crate) async fn start(
        backbone: &JetStreamBackbone,
        stream: &str,
        filter_subject: String,
        start: DeliverPolicy,
        finite: bool,
    ) -> Result<Self> {
        let mut ordered = Ordered {
            backbone: backbone.clone(),
            stream: stream.to_string(),
            filter_subject,
            start,
            stream_sequence: 0,
            current: None,
            pending_at_start: 0,
            finite,
        };
        let (current, pending) = ordered.consumer().await?;
        ordered.current = Some(current);
        ordered.pending_at_start = pending;
        Ok(ordered)
    }

    /// A new consumer after the last message delivered, and what it has pending.
    async fn consumer(&self) -> Result<(Current, u64)> {
        let client = &self.backbone.client;
        let connects = self.connects();
        let inbox = client.new_inbox();
        // Subscribing waits while the client reconnects: as long as a request may take.
        let deliveries =
            match tokio::time::timeout(self.backbone.request_timeout, client.subscribe(inbox.clone())).await {
                Ok(subscribed) => subscribed.map_err(|e| BackboneError::nats_untyped(Box::new(e)))?,
                Err(_) => {
                    return Err(BackboneError::Nats {
                        transient: true,
                        source: format!("replay of stream {}: subscribing timed out", self.stream).into(),
                    })
                }
            };
        let deliver_policy = match self.stream_sequence {
            0 => self.start,
            last => DeliverPolicy::ByStartSequence { start_sequence: last + 1 },
        };
        let config = push::OrderedConfig {
            deliver_subject: inbox,
            filter_subject: self.filter_subject.clone(),
            deliver_policy,
            ..Default::default()
        };
        let consumer = self
            .backbone
            .retrying(|| async {
                self.backbone
                    .js
                    .create_consumer_on_stream(config.clone(), &self.stream)
                    .await
                    .map_err(BackboneError::from)
            })
            .await?;
        let info = consumer.cached_info();
        let current = Current { deliveries, name: info.name.clone(), consumer_sequence: 0, connects };
        Ok((current, info.num_pending))
    }

    /// Drops the consumer being read (deleted in the background: the server would drop it
    /// anyway once nothing listens); the next read makes a new one.
    fn reset(&mut self) {
        if let Some(old) = self.current.take() {
            // Outside a runtime (dropped at shutdown) the server's inactivity threshold does it.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (js, stream) = (self.backbone.js.clone(), self.stream.clone());
                runtime.spawn(async move { js.delete_consumer_from_stream(old.name, stream).await.ok() });
            }
        }
    }

    /// The next message in stream order with its delivery fields; an error when a consumer
    /// cannot be made, has gone silent or its subscription has closed (the next call tries
    /// again); `None` when a finite replay has nothing left to deliver.
    pub(crate) async fn next(&mut self) -> Option<Result<(Delivered, async_nats::Message)>> {
        loop {
            if self.current.is_none() {
                match self.consumer().await {
                    Ok((_, 0)) if self.finite => return None,
                    Ok((current, _)) => self.current = Some(current),
                    Err(e) => return Some(Err(e)),
                }
            }
            let current = self.current.as_mut().expect("made above");
            // Nearly every read finds a message waiting: timers are made only when not.
            let message = match current.deliveries.next().now_or_never() {
                Some(message) => message,
                None => match self.wait().await {
                    Waited::Message(message) => message,
                    Waited::Reconnected => {
                        tracing::debug!(stream = %self.stream, "ordered replay: reconnected, starting again");
                        self.reset();
                        continue;
                    }
                    Waited::Silent => {
                        self.reset();
                        return Some(Err(BackboneError::Nats {
                            transient: true,
                            source: format!(
                                "replay of stream {}: no message or heartbeat for {:?}; starting again after \
                                 sequence {}",
                                self.stream,
                                2 * HEARTBEAT,
                                self.stream_sequence
                            )
                            .into(),
                        }));
                    }
                },
            };
            // A subscription ends when the client is closed or drained: not the end of the
            // stream, whatever a reader would take a plain end for.
            let Some(message) = message else {
                self.reset();
                return Some(Err(BackboneError::Nats {
                    transient: true,
                    source: format!(
                        "replay of stream {}: the subscription closed after sequence {}",
                        self.stream, self.stream_sequence
                    )
                    .into(),
                }));
            };
            match message.status {
                None => match self.in_order(message) {
                    Ok(Some(delivered)) => return Some(Ok(delivered)),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                },
                Some(StatusCode::IDLE_HEARTBEAT) => match self.heartbeat(&message).await {
                    Beat::Read => {}
                    Beat::Missed => self.reset(),
                    Beat::Idle => return None,
                },
                Some(status) => {
                    // The consumer was deleted, the stream is gone, or the server refuses:
                    // start again (making a consumer says what is wrong if it persists).
                    tracing::debug!(stream = %self.stream, %status, "ordered replay: status, starting again");
                    self.reset();
                }
            }
        }
    }

    /// Waits for the current consumer's next message, watching the connection meanwhile.
    async fn wait(&mut self) -> Waited {
        let statistics = self.backbone.client.statistics();
        let current = self.current.as_mut().expect("waited on the current consumer");
        let mut silent = Duration::ZERO;
        loop {
            if let Ok(message) = tokio::time::timeout(RECONNECT_CHECK, current.deliveries.next()).await {
                return Waited::Message(message);
            }
            silent += RECONNECT_CHECK;
            if statistics.connects.load(std::sync::atomic::Ordering::Relaxed) != current.connects {
                return Waited::Reconnected;
            }
            if silent >= 2 * HEARTBEAT {
                return Waited::Silent;
            }
        }
    }

    fn connects(&self) -> u64 {
        self.backbone.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A message with its delivery fields when it is the next one of the consumer; `None`
    /// after a gap (the consumer is reset) or for a message that is no delivery at all.
    fn in_order(&mut self, message: async_nats::Message) -> Result<Option<(Delivered, async_nats::Message)>> {
        let (delivered, message) = match message.reply.as_deref().and_then(super::delivery::delivered) {
            Some(delivered) => (delivered, message),
            None if !message.reply.as_deref().is_some_and(|r| r.starts_with("$JS.ACK.")) => {
                // Someone else's publish to the inbox: not ours to deliver. Were a delivery
                // lost meanwhile, the next one's sequence or a heartbeat says so.
                tracing::debug!(stream = %self.stream, subject = %message.subject, "ordered replay: ignoring a message that is no delivery");
                return Ok(None);
            }
            None => {
                // A reply subject of a form the fast reader does not know: async-nats reads
                // it, or says what is wrong with it.
                let m = async_nats::jetstream::Message { message, context: self.backbone.js.clone() };
                (super::delivery_of(&m)?, m.message)
            }
        };
        let current = self.current.as_mut().expect("a message comes from the current consumer");
        if delivered.consumer_sequence != current.consumer_sequence + 1 {
            tracing::debug!(
                stream = %self.stream, expected = current.consumer_sequence + 1,
                got = delivered.consumer_sequence, "ordered replay: a gap, starting again"
            );
            self.reset();
            return Ok(None);
        }
        current.consumer_sequence = delivered.consumer_sequence;
        self.stream_sequence = delivered.stream_sequence;
        Ok(Some((delivered, message)))
    }

    /// Answers flow control, and says whether messages were missed or, for a finite replay,
    /// whether the consumer has nothing left to send.
    async fn heartbeat(&mut self, message: &async_nats::Message) -> Beat {
        // Flow control requests carry a reply subject; a stalled consumer names one in a
        // heartbeat. Either is answered with an empty message.
        let headers = message.headers.as_ref();
        let stalled = headers.and_then(|h| h.get(STALLED_HEADER)).map(|v| v.to_string());
        let flow_control = message.reply.is_some() || stalled.is_some();
        for subject in message.reply.iter().map(|s| s.to_string()).chain(stalled) {
            if let Err(e) = self.backbone.client.publish(subject, bytes::Bytes::new()).await {
                tracing::debug!(error = %e, "ordered replay: answering flow control");
            }
        }
        let last = headers
            .and_then(|h| h.get(async_nats::header::NATS_LAST_CONSUMER))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        let seen = self.current.as_ref().map_or(0, |c| c.consumer_sequence);
        if last.is_some_and(|last| last != seen) {
            tracing::debug!(stream = %self.stream, "ordered replay: a heartbeat says messages were missed");
            return Beat::Missed;
        }
        // An idle heartbeat comes after a heartbeat interval with nothing sent; the consumer's
        // info decides (a server too slow to send for that long must not end a replay early).
        if self.finite && !flow_control && self.delivered_all(seen).await {
            return Beat::Idle;
        }
        Beat::Read
    }

    /// Whether the current consumer has nothing pending and has sent nothing beyond consumer
    /// sequence `seen` (what async-nats calls delivered all). `false` when its info cannot be
    /// read: the replay goes on waiting, as before.
    async fn delivered_all(&self, seen: u64) -> bool {
        use async_nats::jetstream::response::Response;
        let Some(current) = &self.current else { return false };
        let subject = format!("CONSUMER.INFO.{}.{}", self.stream, current.name);
        let response: std::result::Result<Response<async_nats::jetstream::consumer::Info>, _> =
            self.backbone.js.request(subject, &serde_json::json!({})).await;
        match response {
            Ok(Response::Ok(info)) => info.num_pending == 0 && info.delivered.consumer_sequence == seen,
            Ok(Response::Err { error }) => {
                tracing::debug!(stream = %self.stream, %error, "ordered replay: consumer info");
                false
            }
            Err(e) => {
                tracing::debug!(stream = %self.stream, error = %e, "ordered replay: consumer info");
                false
            }
        }
    }
}
