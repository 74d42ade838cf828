//! The one trait both engines implement.

use std::pin::Pin;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use futures::{Stream, StreamExt};

use crate::{
    ConsumerConfig, Delivery, Message, PublishAck, Result, StartPosition, StoredMessage, StreamConfig, StreamInfo,
};

/// An ordered stream of stored messages, as returned by [`Backbone::replay`].
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<StoredMessage>> + Send>>;

/// Messages a producer hands to [`Backbone::publish_stream`] as it makes them.
/// It may borrow what the producer makes them from: messages are taken only as the window
/// has room, so a producer that makes them on demand overlaps its work with the broker's.
pub type Outgoing<'a> = Pin<Box<dyn Stream<Item = Message> + Send + 'a>>;

/// What [`Backbone::publish_stream`] reports: one acknowledgement per message, in the
/// messages' order; after an error nothing more.
pub type AckStream<'a> = Pin<Box<dyn Stream<Item = Result<PublishAck>> + Send + 'a>>;

/// Messages [`Backbone::publish_stream`]'s default takes at once from what is ready.
const STREAM_CHUNK: usize = 1_024;

/// What to replay from a stream.
#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    /// Where the replay starts (default: the oldest message still stored).
    pub start: StartPosition,
    /// Only subjects matching one of these filters (empty = all).
    pub filter_subjects: Vec<String>,
    /// Keep following new messages after the end; otherwise the replay ends at the last
    /// message stored when it started.
    pub follow: bool,
}

/// A durable stream store: publish with dedupe by event id, durable consumers with ack and
/// redelivery, replay from a sequence or a time, stream info and retention limits.
///
/// Every implementation passes the conformance suite in `chorus-tests`, so code written
/// against this trait behaves the same on the embedded store and on JetStream.
#[async_trait]
pub trait Backbone: Send + Sync + 'static {
    /// Short engine name for logs and benchmarks ("embedded", "jetstream").
    fn engine(&self) -> &'static str;

    /// The engine itself, for the few callers that use what only one engine can do (the
    /// replicator sets up native JetStream sources): `downcast_ref::<JetStreamBackbone>()`.
    fn as_any(&self) -> &dyn std::any::Any;

    /// Creates the stream if there is none of that name. An existing stream is left exactly
    /// as it is (replicas, limits, retention, subjects): operators own their streams, and a
    /// change is only ever made on purpose, with [`Backbone::update_stream`].
    async fn ensure_stream(&self, config: &StreamConfig) -> Result<StreamInfo>;

    /// Changes an existing stream's limits and subjects to `config` (`NotFound` when there
    /// is no such stream): what `chorus streams edit` does.
    async fn update_stream(&self, config: &StreamConfig) -> Result<StreamInfo>;

    /// The configuration a stream has now, as [`StreamConfig`] (a stream created by another
    /// tool included), so a caller can compare it with what it would create.
    async fn stream_config(&self, stream: &str) -> Result<StreamConfig>;

    /// Every stream's configuration, by name: how a component finds the streams that already
    /// capture its subjects (Choria's `CHORIA_EVENTS`, say) instead of failing to create its own.
    async fn streams(&self) -> Result<Vec<StreamConfig>>;

    /// Whether the engine reaches its server now (the embedded store always does). For
    /// health reports: calls made while it does not are retried or fail as usual.
    fn connected(&self) -> bool {
        true
    }

    /// Current counters of a stream.
    async fn stream_info(&self, stream: &str) -> Result<StreamInfo>;

    /// Deletes a stream with its messages and consumers.
    async fn delete_stream(&self, stream: &str) -> Result<()>;

    /// Publishes one message and waits until it is durably stored.
    async fn publish(&self, message: Message) -> Result<PublishAck> {
        let mut acks = self.publish_batch(vec![message]).await?;
        acks.pop().ok_or(crate::BackboneError::Closed)
    }

    /// Publishes many messages, pipelined, and waits until all are durably stored. Acks come
    /// back in the order of `messages`. On error some messages may be stored; publishing the
    /// same batch again is safe because ids are deduplicated.
    async fn publish_batch(&self, messages: Vec<Message>) -> Result<Vec<PublishAck>>;

    /// Publishes messages as the producer makes them, without the stop at the end of each
    /// batch that [`Backbone::publish_batch`] makes (the broker idles while the caller
    /// prepares the next one): a producer with a steady flow (a storm, a drain, a copy)
    /// keeps the engine's window of publishes on the wire. Each message's acknowledgement is
    /// yielded once it is durably stored, in order; the first error ends the stream (some
    /// later messages may be stored: publishing them again is safe, ids are deduplicated).
    /// Acknowledgements must be read for publishing to go on.
    ///
    /// The default publishes what is ready in batches; JetStream overrides it.
    fn publish_stream<'a>(self: Arc<Self>, messages: Outgoing<'a>) -> AckStream<'a> {
        // Each ready chunk is published up to its first invalid message, whose error then
        // follows the acknowledgements of everything before it.
        let batches = messages.ready_chunks(STREAM_CHUNK).then(move |mut batch| {
            let backbone = self.clone();
            async move {
                let refused = batch.iter().enumerate().find_map(|(i, m)| m.validate().err().map(|e| (i, e)));
                if let Some((i, _)) = refused {
                    batch.truncate(i);
                }
                let acks = if batch.is_empty() { Ok(Vec::new()) } else { backbone.publish_batch(batch).await };
                (acks, refused.map(|(_, e)| e))
            }
        });
        let acks = batches.flat_map(|(acks, refused)| {
            let (acks, failed) = match acks {
                Ok(acks) => (acks, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            futures::stream::iter(acks.into_iter().map(Ok).chain(failed.or(refused).map(Err)))
        });
        Box::pin(until_error(acks))
    }

    /// Opens (creating if needed) a durable consumer on `stream`.
    async fn consumer(&self, stream: &str, config: &ConsumerConfig) -> Result<Box<dyn Consumer>>;

    /// Removes a durable consumer and its position.
    async fn delete_consumer(&self, stream: &str, name: &str) -> Result<()>;

    /// Reads the stream in order without creating durable state: rebuilds, tails, audits.
    async fn replay(&self, stream: &str, options: ReplayOptions) -> Result<MessageStream>;

    /// Removes every message with a sequence below `below` (e.g. what an outbox has forwarded)
    /// and returns how many were removed. Sequences are never reused.
    async fn purge(&self, stream: &str, below: u64) -> Result<u64>;

    /// Reads one message by sequence, `None` when it was never stored or has been removed.
    async fn get(&self, stream: &str, sequence: u64) -> Result<Option<StoredMessage>>;

    /// Opens (creating if needed) a key-value bucket; an existing bucket is used as it is.
    async fn bucket(&self, config: &crate::BucketConfig) -> Result<std::sync::Arc<dyn crate::Bucket>>;
}

/// A handle on a durable consumer.
#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `wait` for at least one message, then returns up to `max` of them without
    /// further waiting. An empty result means nothing arrived in time.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// Messages matching this consumer not yet acknowledged: undelivered plus in flight. This
    /// is the consumer's lag, the figure to alert on.
    async fn pending(&mut self) -> Result<u64>;
}

/// `stream` up to and including its first error; nothing after it is polled.
pub(crate) fn until_error<'a, T: Send + 'a>(
    stream: impl Stream<Item = Result<T>> + Send + 'a,
) -> impl Stream<Item = Result<T>> + Send + 'a {
    futures::stream::unfold((Box::pin(stream), false), |(mut stream, failed)| async move {
        if failed {
            return None;
        }
        let item = stream.next().await?;
        let failed = item.is_err();
        Some((item, (stream, failed)))
    })
}
