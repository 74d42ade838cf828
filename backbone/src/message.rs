//! Messages as published, stored and delivered.

use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, Utc};

/// A message to publish: the event id is the dedupe key, so publishing the same id twice
/// (a retry, a replicated copy) stores it once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Event id, the dedupe key: 1..=256 characters without white space.
    pub id: String,
    /// Subject to publish on; it decides which stream stores the message.
    pub subject: String,
    /// Body, stored and delivered unchanged.
    pub payload: Bytes,
}

impl Message {
    /// A message to publish; id and subject are checked when it is published, not here.
    pub fn new(id: impl Into<String>, subject: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message { id: id.into(), subject: subject.into(), payload: payload.into() }
    }

    /// Rejects what neither engine can store faithfully.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.id.is_empty() || self.id.len() > 256 || self.id.chars().any(|c| c.is_whitespace()) {
            return Err(crate::BackboneError::InvalidMessage(format!(
                "event id {:?} must be 1..=256 characters without white space",
                self.id
            )));
        }
        crate::subject::validate_publish_subject(&self.subject)
    }
}

/// The outcome of a publish: where the message is stored, and whether it was already there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishAck {
    /// Stream that stored the message (the one capturing its subject).
    pub stream: String,
    /// Sequence the stream gave the message.
    pub sequence: u64,
    /// True when the id was already stored within the stream's dedupe window; `sequence` is then
    /// the sequence of the original (embedded) or 0 where the engine does not say (JetStream).
    pub duplicate: bool,
}

/// A message as stored in a stream, with the sequence and time the stream gave it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Stream the message is stored in.
    pub stream: String,
    /// Position in the stream: 1 for the first message, increasing with each one stored.
    pub sequence: u64,
    /// When the stream stored it (stream time, not the event's own time).
    pub time: DateTime<Utc>,
    /// Event id it was published with (the dedupe key).
    pub id: String,
    /// Subject it was published on.
    pub subject: String,
    /// Body as published.
    pub payload: Bytes,
}

impl fmt::Debug for StoredMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredMessage")
            .field("stream", &self.stream)
            .field("sequence", &self.sequence)
            .field("time", &self.time)
            .field("id", &self.id)
            .field("subject", &self.subject)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Counters of a stream, as both engines report them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StreamInfo {
    /// Stream name.
    pub name: String,
    /// Subject filters the stream captures.
    pub subjects: Vec<String>,
    /// Messages currently stored.
    pub messages: u64,
    /// Bytes currently stored, as the engine counts them against `max_bytes`.
    pub bytes: u64,
    /// Lowest sequence still stored (0 when empty and never written).
    pub first_sequence: u64,
    /// Highest sequence ever assigned; never goes back, even when retention removes messages.
    pub last_sequence: u64,
    /// Durable consumers of the stream.
    pub consumers: usize,
}

/// Acknowledges one delivery back to its engine.
#[async_trait::async_trait]
pub(crate) trait Acker: Send + Sync {
    async fn ack(&self) -> crate::Result<()>;
    async fn nak(&self, delay: Option<std::time::Duration>) -> crate::Result<()>;
}

/// A message handed to a durable consumer; it is redelivered after the consumer's `ack_wait`
/// unless acknowledged, which is what makes processing at-least-once.
pub struct Delivery {
    /// The stored message being delivered.
    pub message: StoredMessage,
    /// How many times this message has been delivered to this consumer (1 on first delivery).
    pub delivered: u32,
    pub(crate) acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery").field("message", &self.message).field("delivered", &self.delivered).finish()
    }
}

impl Delivery {
    /// Marks the message processed: it will not be delivered to this consumer again.
    pub async fn ack(&self) -> crate::Result<()> {
        self.acker.ack().await
    }

    /// Asks for redelivery now (or after `delay`), e.g. when a downstream sink is down.
    pub async fn nak(&self, delay: Option<std::time::Duration>) -> crate::Result<()> {
        self.acker.nak(delay).await
    }
}
