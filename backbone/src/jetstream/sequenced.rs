//! Sequenced publishes: how a writer that owns a stream appends to it without waiting for an
//! acknowledgement per message and without the stream remembering an id per message.
//!
//! Every message carries the stream sequence it must follow (`Nats-Expected-Last-Sequence`);
//! the server stores it only if the stream's last sequence is that one. So if any message of
//! a batch is refused or lost on the way, every later one is refused too: the stream holds a
//! prefix of what was sent, never a gap or a repeat, whatever happens to the connection, the
//! server or the writer. All but the last message of a batch go out as plain publishes; the
//! last asks for the acknowledgement, which says how far the stream got. The event id travels
//! as `Chorus-Event-Id` (read back as the message's id) instead of `Nats-Msg-Id`, so the
//! stream's dedupe window does not hold it: exactly-once rests on the sequence, not on
//! memory the server keeps per event.

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage as Publish;

use super::{headers, JetStreamBackbone};
use crate::{BackboneError, Message, Result};

/// The header with the stream sequence a message must follow.
pub const EXPECTED_LAST_SEQUENCE_HEADER: &str = "Nats-Expected-Last-Sequence";

/// The header carrying a sequenced message's event id (read back as its id).
pub const EVENT_ID_HEADER: &str = "Chorus-Event-Id";

/// The acknowledgement of a sequenced batch, awaited apart from sending it so batches can be
/// pipelined.
#[must_use = "a sequenced batch is only known stored once its acknowledgement says so"]
pub struct SequencedAck {
    ack: PublishAckFuture,
    stream: String,
    last: u64,
}

impl SequencedAck {
    /// The sequence of the batch's last message once the stream stored the whole batch; an
    /// error when it did not (then it holds a prefix of it: see the module).
    pub async fn stored(self) -> Result<u64> {
        let ack = self.ack.await.map_err(|e| BackboneError::Refused {
            operation: format!("appending to stream {} after sequence {}", self.stream, self.last - 1),
            source: Box::new(e),
        })?;
        if ack.sequence != self.last || ack.stream != self.stream {
            return Err(BackboneError::Refused {
                operation: format!("appending to stream {}", self.stream),
                source: format!(
                    "the batch's last message was stored in {} at sequence {}, not in {} at {}",
                    ack.stream, ack.sequence, self.stream, self.last
                )
                .into(),
            });
        }
        Ok(ack.sequence)
    }
}

impl JetStreamBackbone {
    /// Sends `messages` to be stored in `stream` at sequences `last + 1 ..`; see the module.
    /// Returns once they are sent; [`SequencedAck::stored`] says whether they were stored.
    /// The messages are taken by value: their headers move into the publishes uncopied.
    pub async fn publish_sequenced(&self, stream: &str, messages: Vec<Message>, last: u64) -> Result<SequencedAck> {
        if messages.is_empty() {
            return Err(BackboneError::InvalidMessage("a sequenced batch needs at least one message".into()));
        }
        for m in &messages {
            m.validate()?;
        }
        let nats = |e: &dyn std::fmt::Display| BackboneError::Nats { transient: true, source: e.to_string().into() };
        let count = messages.len() as u64;
        let final_index = messages.len() - 1;
        let mut number = itoa::Buffer::new();
        for (i, m) in messages.into_iter().enumerate() {
            let expected = last + i as u64;
            let mut map = headers::map_of(m.headers.into_iter());
            if expected == 0 {
                // nats-server 2.9 does not check an expected sequence of 0: the first message
                // into an empty stream carries its id too, so a repeat of it (an earlier
                // attempt stored after all) is dropped by the dedupe window.
                map.insert(headers::msg_id(), m.id.as_str());
            }
            map.insert(headers::event_id(), m.id);
            map.insert(headers::expected_last_sequence(), number.format(expected));
            if i < final_index {
                self.client.publish_with_headers(m.subject, map, m.payload).await.map_err(|e| nats(&e))?;
            } else {
                let publish = Publish::build().headers(map).payload(m.payload);
                let ack = self.js.send_publish(m.subject, publish).await.map_err(|e| nats(&e))?;
                return Ok(SequencedAck { ack, stream: stream.to_string(), last: last + count });
            }
        }
        unreachable!("the loop returns at the last message")
    }
}
