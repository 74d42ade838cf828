//! Dead letters: messages a consumer could not process, kept on `CHORUS_DEADLETTER` instead of
//! stopping the consumer or being dropped silently.
//!
//! A projection that stopped on the first malformed event would let one bad producer freeze the
//! whole fleet's inventory; one that skipped it silently would lose the evidence. So the
//! message goes to `chorus.deadletter.<origin>` with the reason and where it came from, the
//! consumer counts it and goes on, and an operator can read, fix and replay it later.
//!
//! Dead letters are published **before** the consumer checkpoints past the message, with an
//! event id derived from (origin, stream, sequence). A consumer that crashes between the two
//! publishes the same id again on restart, which the stream's dedupe window absorbs, so each bad
//! message is normally dead-lettered once; after the window (or after a `--rebuild`) it may be
//! dead-lettered again. Readers that need exactly-once dedupe on
//! [`DeadLetter::origin`]/[`DeadLetter::stream`]/[`DeadLetter::sequence`].

use chorus_backbone::{Backbone, BackboneError, Message, StoredMessage, StreamConfig};
use chorus_schemas::subject::{self, SubjectError, CHORUS_DEADLETTER, CHORUS_DEADLETTER_SUBJECTS};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Payload bytes copied into a dead letter at most. The original stays on its stream (the
/// letter names its sequence); the copy is for reading the letter alone, and a full 1 MiB event
/// plus the envelope would exceed the NATS payload limit.
pub const MAX_PAYLOAD_COPY: usize = 64 * 1024;

/// One message a consumer gave up on, as published (JSON) on `chorus.deadletter.<origin>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The consumer or view that gave up (also the last subject token).
    pub origin: String,
    /// Stream the message was read from.
    pub stream: String,
    /// Its sequence in that stream: with `stream`, the key to find or replay the original.
    pub sequence: u64,
    /// Its subject.
    pub subject: String,
    /// Its event id (the `Nats-Msg-Id` it was published with).
    pub event_id: String,
    /// When the stream stored it.
    pub stream_time: DateTime<Utc>,
    /// Stable machine-readable reason, e.g. a [`chorus_schemas::DecodeError::code`]
    /// (`not_json`, `unknown_type`, ...) or `rejected` when a view refused a decoded event.
    pub code: String,
    /// Human-readable reason.
    pub reason: String,
    /// When the consumer gave up.
    pub dead_lettered_at: DateTime<Utc>,
    /// Size of the original payload, bytes.
    pub payload_bytes: usize,
    /// The payload (up to [`MAX_PAYLOAD_COPY`] bytes) when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The payload (up to [`MAX_PAYLOAD_COPY`] bytes), hex-encoded, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
    /// True when `payload`/`payload_hex` hold only the first [`MAX_PAYLOAD_COPY`] bytes.
    #[serde(default)]
    pub payload_truncated: bool,
}

impl DeadLetter {
    /// A dead letter for `message`, given up on by `origin` for `reason` (`code` is the stable
    /// short form).
    pub fn new(origin: &str, message: &StoredMessage, code: &str, reason: impl Into<String>) -> Self {
        let payload = &message.payload[..];
        let truncated = payload.len() > MAX_PAYLOAD_COPY;
        let mut copy = &payload[..payload.len().min(MAX_PAYLOAD_COPY)];
        // Cutting may split a UTF-8 character; drop the partial tail rather than switch to hex.
        if truncated {
            if let Err(e) = std::str::from_utf8(copy) {
                if e.error_len().is_none() {
                    copy = &copy[..e.valid_up_to()];
                }
            }
        }
        let (text, hex) = match std::str::from_utf8(copy) {
            Ok(s) => (Some(s.to_owned()), None),
            Err(_) => (None, Some(copy.iter().map(|b| format!("{b:02x}")).collect())),
        };
        DeadLetter {
            origin: origin.to_owned(),
            stream: message.stream.clone(),
            sequence: message.sequence,
            subject: message.subject.clone(),
            event_id: message.id.clone(),
            stream_time: message.time,
            code: code.to_owned(),
            reason: reason.into(),
            dead_lettered_at: Utc::now(),
            payload_bytes: payload.len(),
            payload: text,
            payload_hex: hex,
            payload_truncated: truncated,
        }
    }

    /// The id the letter is published with: the same for the same origin and message, so a
    /// consumer that re-publishes it after a crash is deduplicated by the stream.
    pub fn event_id_for(origin: &str, stream: &str, sequence: u64) -> String {
        format!("deadletter-{origin}-{stream}-{sequence}")
    }

    /// The backbone message carrying this letter on `chorus.deadletter.<origin>`.
    pub fn to_message(&self) -> Result<Message, SubjectError> {
        let subject = subject::deadletter(&self.origin)?;
        let body = serde_json::to_vec(self).expect("a dead letter always serializes");
        Ok(Message::new(Self::event_id_for(&self.origin, &self.stream, self.sequence), subject, body))
    }

    /// Reads a letter back from a `CHORUS_DEADLETTER` message.
    pub fn from_message(message: &StoredMessage) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(&message.payload)
    }
}

/// Creates the `CHORUS_DEADLETTER` stream when it does not exist, and leaves it alone when it
/// does: an operator's limits (replicas, retention) must not be reset by a consumer starting.
pub async fn ensure_stream(backbone: &dyn Backbone) -> Result<(), BackboneError> {
    match backbone.stream_info(CHORUS_DEADLETTER).await {
        Ok(_) => Ok(()),
        Err(BackboneError::NotFound { .. }) => {
            let subjects = CHORUS_DEADLETTER_SUBJECTS.iter().map(|s| s.to_string()).collect();
            backbone.ensure_stream(&StreamConfig::new(CHORUS_DEADLETTER, subjects)).await.map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// Publishes letters and waits until they are stored.
pub async fn publish(backbone: &dyn Backbone, letters: &[DeadLetter]) -> Result<(), BackboneError> {
    if letters.is_empty() {
        return Ok(());
    }
    let messages = letters
        .iter()
        .map(|l| l.to_message().map_err(|e| BackboneError::InvalidMessage(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    backbone.publish_batch(messages).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(payload: &[u8]) -> StoredMessage {
        StoredMessage {
            stream: "CHORUS_LIFECYCLE".into(),
            sequence: 7,
            time: Utc::now(),
            id: "evt-1".into(),
            subject: "choria.lifecycle.event.alive.server".into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            headers: Vec::new(),
        }
    }

    #[test]
    fn letters_carry_origin_reason_and_payload() {
        let l = DeadLetter::new("inventory", &stored(b"not json"), "not_json", "event is not JSON");
        let m = l.to_message().unwrap();
        assert_eq!(m.subject, "chorus.deadletter.inventory");
        assert_eq!(m.id, "deadletter-inventory-CHORUS_LIFECYCLE-7");
        let back: DeadLetter = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(back, l);
        assert_eq!((back.sequence, back.payload.as_deref()), (7, Some("not json")));
        assert!(!back.payload_truncated);
    }

    #[test]
    fn binary_and_oversized_payloads_are_bounded() {
        let l = DeadLetter::new("v", &stored(&[0xff, 0x00, 0x10]), "not_json", "x");
        assert_eq!((l.payload.as_deref(), l.payload_hex.as_deref()), (None, Some("ff0010")));
        let mut big = vec![b'a'; MAX_PAYLOAD_COPY - 1];
        big.extend("é and more".as_bytes()); // a 2-byte character across the cut
        let l = DeadLetter::new("v", &stored(&big), "oversize", "x");
        assert!(l.payload_truncated);
        assert_eq!(l.payload.as_ref().unwrap().len(), MAX_PAYLOAD_COPY - 1);
        assert_eq!(l.payload_bytes, big.len());
    }

    #[test]
    fn origin_must_be_a_subject_token() {
        assert!(DeadLetter::new("a.b", &stored(b"x"), "c", "r").to_message().is_err());
    }
}
