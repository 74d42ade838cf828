//! Messages as published, stored and delivered.

use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, Utc};

/// Message headers other than the event id, in name order (NATS keeps no order between
/// names; a name may appear more than once). Events Chorus publishes have none; other
/// publishers' messages keep theirs through every engine, replay, restore and replication.
pub type Headers = Vec<(String, String)>;

/// The header a copied message (restore, replication) carries its original's store time in
/// (RFC 3339, ns): the time the event was first stored, which a copy keeps.
pub const STORED_TIME_HEADER: &str = "Chorus-Stored-Time";

/// The header every copy by the replicator's copier carries: `<link> <source stream>
/// <source sequence>`. It tells the copier (and a native source taking over from it), after
/// any failure or crash, exactly how far the target got. Named here, beside the other
/// headers of copies, so the engines write it without parsing it for every copy.
pub const REPLICATED_FROM_HEADER: &str = "Chorus-Replicated-From";

/// Headers that instruct the stream that stores a message (optimistic concurrency, rollups,
/// per-message TTL) rather than describe it: a copy of a stored message (restore,
/// replication) leaves them out, since they were meant for the stream that stored the
/// original and would refuse or roll up the copy.
const DIRECTIVES: [&str; 3] = ["Nats-Expected-", "Nats-Rollup", "Nats-TTL"];

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
    /// Headers besides the id, stored and delivered unchanged (empty for Chorus's events).
    pub headers: Headers,
}

impl Message {
    /// A message to publish; id and subject are checked when it is published, not here.
    pub fn new(id: impl Into<String>, subject: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message { id: id.into(), subject: subject.into(), payload: payload.into(), headers: Headers::new() }
    }

    /// The same message with `headers` (sorted by name, as they are stored).
    pub fn with_headers(mut self, mut headers: Headers) -> Self {
        headers.sort();
        self.headers = headers;
        self
    }

    /// Rejects what neither engine can store faithfully.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.id.is_empty() || self.id.len() > 256 || has_white_space(&self.id) {
            return Err(crate::BackboneError::InvalidMessage(format!(
                "event id {:?} must be 1..=256 characters without white space",
                self.id
            )));
        }
        for (name, value) in &self.headers {
            let bad_name = name.is_empty()
                || name.len() > u16::MAX as usize
                || name.eq_ignore_ascii_case(crate::jetstream::MSG_ID_HEADER)
                || name == crate::jetstream::EVENT_ID_HEADER
                || name.bytes().any(|b| b == b':' || !b.is_ascii_graphic());
            if bad_name || value.len() > u16::MAX as usize || value.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(crate::BackboneError::InvalidMessage(format!(
                    "header {name:?}: {value:?} cannot be stored (names are printable ASCII without ':', \
                     values have no line breaks, the id goes in the id)"
                )));
            }
        }
        crate::subject::validate_publish_subject(&self.subject)
    }

    /// Bytes of the headers as both engines count them against `max_bytes`.
    pub(crate) fn headers_size(&self) -> usize {
        self.headers.iter().map(|(n, v)| n.len() + v.len()).sum()
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
    /// Event id it was published with (the dedupe key); empty when its publisher gave none,
    /// as go-choria does (see [`StoredMessage::copy_id`]).
    pub id: String,
    /// Subject it was published on.
    pub subject: String,
    /// Body as published.
    pub payload: Bytes,
    /// Headers besides the id, as published.
    pub headers: Headers,
}

impl StoredMessage {
    /// The id a copy of this message is published with (restore, replication): its own, or,
    /// for a message stored without one, one derived from where and when it was stored
    /// (`<stream>-<sequence>-<store time ns>`), so copying it again (a resumed restore, a
    /// restarted replicator) stores it once, while two stored copies of one event (a
    /// publisher that sent it twice) stay two, as they were.
    pub fn copy_id(&self) -> String {
        self.id_or_derived(self.id.clone())
    }

    /// `id`, or where it is empty, the id derived from where and when this was stored.
    fn id_or_derived(&self, id: String) -> String {
        if id.is_empty() {
            derived_id(&self.stream, self.sequence, self.time)
        } else {
            id
        }
    }

    /// The original store time this message carries in [`STORED_TIME_HEADER`] when it is
    /// a copy (restored, replicated); `None` otherwise.
    pub fn carried_store_time(&self) -> Option<DateTime<Utc>> {
        self.headers
            .iter()
            .find(|(name, _)| name == STORED_TIME_HEADER)
            .and_then(|(_, value)| DateTime::parse_from_rfc3339(value).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    /// When the event was first stored: [`StoredMessage::carried_store_time`], else this
    /// stream's store time.
    pub fn first_stored(&self) -> DateTime<Utc> {
        self.carried_store_time().unwrap_or(self.time)
    }

    /// The headers a copy of this message is published with (see [`copy_headers`]), stamped
    /// with [`StoredMessage::first_stored`].
    pub fn copy_headers(&self) -> Headers {
        copy_headers(self.headers.clone(), self.first_stored())
    }

    /// The message that publishes a copy of this one: [`StoredMessage::copy_id`], the same
    /// subject and payload, and [`StoredMessage::copy_headers`].
    pub fn to_copy(&self) -> Message {
        self.clone().into_copy()
    }

    /// [`StoredMessage::to_copy`], moving this message's parts instead of copying them (a
    /// copier makes one per event).
    pub fn into_copy(mut self) -> Message {
        let first_stored = self.first_stored();
        let id = std::mem::take(&mut self.id);
        let id = self.id_or_derived(id);
        Message::new(id, self.subject, self.payload).with_headers(copy_headers(self.headers, first_stored))
    }
}

/// The id of a message stored without one, from where and when it was stored.
pub fn derived_id(stream: &str, sequence: u64, time: DateTime<Utc>) -> String {
    format!("{stream}-{sequence}-{}", time.timestamp_nanos_opt().unwrap_or_default())
}

/// [`STORED_TIME_HEADER`]'s value for `time`.
pub fn stored_time_value(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// The headers a copy of a message first stored at `first_stored` is published with: its
/// `headers` less the directives meant for the stream that stored the original, with
/// [`STORED_TIME_HEADER`] set to `first_stored` (replacing any it carried).
pub fn copy_headers(mut headers: Headers, first_stored: DateTime<Utc>) -> Headers {
    headers.retain(|(name, _)| !is_directive(name) && name != STORED_TIME_HEADER);
    headers.push((STORED_TIME_HEADER.into(), stored_time_value(first_stored)));
    headers
}

fn is_directive(name: &str) -> bool {
    DIRECTIVES.iter().any(|d| name.as_bytes().get(..d.len()).is_some_and(|p| p.eq_ignore_ascii_case(d.as_bytes())))
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
            .field("headers", &self.headers)
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

/// Whether `s` holds white space (Unicode's definition); byte by byte for ASCII, as ids are.
fn has_white_space(s: &str) -> bool {
    if s.is_ascii() {
        s.bytes().any(|b| (b as char).is_whitespace())
    } else {
        s.chars().any(char::is_whitespace)
    }
}
