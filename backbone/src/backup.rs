//! The backup format of `chorus replay` and `chorus restore`: one stored message per line of
//! JSON, byte-exact for any payload.
//!
//! ```json
//! {"sequence":7,"time":"2026-11-30T10:00:00Z","subject":"choria.lifecycle.event.alive.server","id":"0193…","payload":{"specversion":"1.0",…}}
//! {"sequence":8,"time":"2026-11-30T10:00:01Z","subject":"legacy.subject","id":"…","payload_base64":"AAEC…"}
//! ```
//!
//! A payload that is exactly one JSON object (every CloudEvent, with no whitespace around
//! it) is written as JSON, readable with `jq`; any other payload (a JSON string, text, bytes
//! that are not UTF-8, JSON with surrounding whitespace) is written as standard base64, so
//! restoring gives back the same bytes whatever they were. Headers other than the id are
//! kept (`headers`, by name).
//!
//! Every line has an id: a message stored without one (go-choria publishes without
//! `Nats-Msg-Id`) gets one derived from its stream, sequence and store time
//! ([`StoredMessage::copy_id`]), so restoring a file twice stores each message once.
//! A restore carries each message's original store time in the `Chorus-Stored-Time` header
//! and a replay reports that time, so replay → restore (into an empty stream) → replay writes
//! the same file, byte for byte.

use std::io::{BufRead, Write};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use crate::message::STORED_TIME_HEADER;
use crate::message::{copy_headers, derived_id, Headers};
use crate::{Message, StoredMessage};

/// One line of a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupLine {
    /// The message's sequence in the stream it was read from.
    pub sequence: u64,
    /// When it was first stored (a restored message keeps its original's time).
    pub time: DateTime<Utc>,
    /// Its subject.
    pub subject: String,
    /// Its id (`Nats-Msg-Id`, or derived when it was stored without one), the dedupe key
    /// of a restore.
    pub id: String,
    /// Its other headers, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Headers,
    /// The payload, when it is exactly one JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    /// The payload in standard base64, otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

/// Why a backup line cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A line is not a backup line.
    #[error("line {line}: {source}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A line has both or neither of `payload` and `payload_base64`, or bad base64.
    #[error("line {line}: {reason}")]
    Payload {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl BackupLine {
    /// The line for `message`.
    pub fn of(message: &StoredMessage) -> BackupLine {
        let (payload, payload_base64) = match as_json_object(&message.payload) {
            Some(raw) => (Some(raw), None),
            None => (None, Some(base64::engine::general_purpose::STANDARD.encode(&message.payload))),
        };
        let original = message.carried_store_time();
        let headers = match original {
            Some(_) => message.headers.iter().filter(|(name, _)| name != STORED_TIME_HEADER).cloned().collect(),
            None => message.headers.clone(),
        };
        BackupLine {
            sequence: message.sequence,
            time: original.unwrap_or(message.time),
            subject: message.subject.clone(),
            id: message.copy_id(),
            headers,
            payload,
            payload_base64,
        }
    }

    /// The payload bytes as they were stored.
    pub fn payload_bytes(&self) -> Result<Bytes, String> {
        match (&self.payload, &self.payload_base64) {
            (Some(raw), None) => Ok(Bytes::copy_from_slice(raw.get().as_bytes())),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Bytes::from)
                .map_err(|e| format!("payload_base64: {e}")),
            _ => Err("exactly one of payload and payload_base64 must be given".into()),
        }
    }

    /// The message to publish on restore: its id (derived, for a line written without one
    /// by an older replay), headers less the directives meant for the original's stream,
    /// and its original store time.
    pub fn to_message(&self) -> Result<Message, String> {
        let id = if self.id.is_empty() { derived_id("restore", self.sequence, self.time) } else { self.id.clone() };
        let headers = copy_headers(self.headers.clone(), self.time);
        Ok(Message::new(id, self.subject.clone(), self.payload_bytes()?).with_headers(headers))
    }
}

/// `bytes` as a raw JSON value when they are exactly one JSON object and nothing else.
fn as_json_object(bytes: &[u8]) -> Option<Box<RawValue>> {
    if bytes.first() != Some(&b'{') || bytes.last() != Some(&b'}') {
        return None;
    }
    let raw: Box<RawValue> = serde_json::from_slice(bytes).ok()?;
    (raw.get().as_bytes() == bytes).then_some(raw)
}

/// Writes `message` as one line.
pub fn write_line(out: &mut impl Write, message: &StoredMessage) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, &BackupLine::of(message))?;
    out.write_all(b"\n")
}

/// Reads every line of a backup, in order.
pub fn read_lines(input: impl BufRead) -> impl Iterator<Item = Result<BackupLine, BackupError>> {
    input.lines().enumerate().map(|(i, line)| {
        let line_no = i + 1;
        let text = line?;
        let parsed: BackupLine =
            serde_json::from_str(&text).map_err(|source| BackupError::Line { line: line_no, source })?;
        parsed.payload_bytes().map_err(|reason| BackupError::Payload { line: line_no, reason })?;
        Ok(parsed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(payload: &[u8]) -> StoredMessage {
        StoredMessage {
            stream: "S".into(),
            sequence: 3,
            time: DateTime::from_timestamp(1_700_000_000, 5).unwrap(),
            id: "id-3".into(),
            subject: "a.b".into(),
            payload: Bytes::copy_from_slice(payload),
            headers: Vec::new(),
        }
    }

    #[test]
    fn every_payload_comes_back_byte_for_byte() {
        let payloads: [&[u8]; 8] = [
            br#"{"specversion":"1.0","id":"x"}"#,
            br#"  {"a":1}  "#,
            br#""a JSON string""#,
            b"plain text",
            &[0xff, 0xfe, 0x00, 0x80],
            b"",
            b"{not json}",
            br#"{"a":1}{"b":2}"#,
        ];
        let mut file = Vec::new();
        for p in payloads {
            write_line(&mut file, &stored(p)).unwrap();
        }
        let text = String::from_utf8(file.clone()).unwrap();
        assert!(text.lines().next().unwrap().contains(r#""payload":{"specversion":"1.0","id":"x"}"#), "{text}");
        let lines: Vec<BackupLine> = read_lines(&file[..]).collect::<Result<_, _>>().unwrap();
        assert_eq!(lines.len(), payloads.len());
        for (line, p) in lines.iter().zip(payloads) {
            assert_eq!(line.payload_bytes().unwrap().as_ref(), p);
            let m = line.to_message().unwrap();
            assert_eq!((m.id.as_str(), m.subject.as_str()), ("id-3", "a.b"));
        }
    }

    #[test]
    fn ids_are_derived_and_headers_and_store_time_travel_through_a_restore() {
        let mut original = stored(b"{}");
        original.id = String::new();
        original.headers = vec![("Nats-Expected-Stream".into(), "OLD".into()), ("X-A".into(), "1".into())];
        let line = BackupLine::of(&original);
        assert_eq!(line.id, "S-3-1700000000000000005", "derived from stream, sequence and store time");
        assert_eq!(line.headers, original.headers, "a replay shows every header");
        let message = line.to_message().unwrap();
        assert_eq!(message.id, line.id);
        assert_eq!(
            message.headers,
            vec![
                (STORED_TIME_HEADER.to_string(), "2023-11-14T22:13:20.000000005Z".to_string()),
                ("X-A".into(), "1".into())
            ],
            "less the directive, plus the original store time"
        );
        // Stored again (later, elsewhere), it reads back as the line it came from.
        let restored = StoredMessage {
            stream: "T".into(),
            time: Utc::now(),
            id: message.id.clone(),
            headers: message.headers.clone(),
            ..original.clone()
        };
        let again = BackupLine::of(&restored);
        assert_eq!(
            serde_json::to_string(&again).unwrap(),
            serde_json::to_string(&BackupLine {
                headers: vec![("X-A".into(), "1".into())],
                ..BackupLine::of(&original)
            })
            .unwrap()
        );
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let file = b"{\"sequence\":1,\"time\":\"2026-01-01T00:00:00Z\",\"subject\":\"a\",\"id\":\"i\"}\nnot json\n";
        let errors: Vec<String> = read_lines(&file[..]).filter_map(Result::err).map(|e| e.to_string()).collect();
        assert!(errors[0].starts_with("line 1: exactly one of payload"), "{errors:?}");
        assert!(errors[1].starts_with("line 2: "), "{errors:?}");
    }
}
