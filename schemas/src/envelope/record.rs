//! One event with its envelope: building, encoding, decoding entry points.

use chrono::{DateTime, Utc};
use cloudevents::{EventBuilder, EventBuilderV10};

use serde_json::Value;

use crate::subject::SubjectError;
use crate::util::{clip, new_event_id, CLIP};

use super::decode::{decode_cloudevent, decode_fast, decode_legacy, time_from_unix};
use super::rfc3339::Rfc3339;
use super::{DecodeError, Event, CONTENT_TYPE, MAX_EVENT_BYTES, SEQ, SIG, SIGCRED, SIGKEY, SITE};

/// The signature carried by a signed [`EventRecord`], as found on the wire.
///
/// Kept as received (the signature text is not checked by decoding), so a record decodes and
/// re-encodes byte for byte; [`crate::signature::Verifier`] judges it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventSignature {
    /// Id of the signing key (extension `sigkey`), see [`chorus_keys::key_id`].
    pub key_id: String,
    /// The 64-byte signature (Ed25519, or P-256 `r || s`) in standard base64 with padding
    /// (extension `sig`).
    pub sig: String,
    /// The producer's credential (extension `sigcred`): an issuer's statement that the key
    /// speaks for the node the event is about. Not covered by `sig` (the issuer signed it).
    pub credential: Option<String>,
}

/// One event with its envelope: what producers publish, streams store and consumers apply.
///
/// Invariants, established by [`EventRecord::new`] and checked by [`EventRecord::decode`]:
/// `source == data.source()`, `subject == data.identity()`, and for lifecycle events the
/// inner `id` equals `id`. `time` must lie in years 0000–9999 (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Event id (UUIDv7 for events Chorus creates): the dedupe key.
    pub id: String,
    /// CloudEvents `source`, fixed per family.
    pub source: String,
    /// CloudEvents `subject`: the node identity ([`Event::identity`]).
    pub subject: String,
    /// When the event happened (CloudEvents `time`).
    pub time: DateTime<Utc>,
    /// Per-producer sequence (extension `seq`); 0 = unsequenced.
    pub seq: u64,
    /// Producing site (extension `site`).
    pub site: Option<String>,
    /// Signature of the record (extensions `sigkey`, `sig`, `sigcred`), if signed; see
    /// [`crate::signature::sign_record`].
    pub signature: Option<EventSignature>,
    /// The typed document (CloudEvents `data`).
    pub data: Event,
}

impl EventRecord {
    /// Wraps `data` in an envelope. The id is the lifecycle event's own id (as Choria does)
    /// or a fresh UUIDv7; `time` is the document's timestamp, so an event replayed from an
    /// outbox keeps its original occurrence time (a timestamp outside years 0000–9999 falls
    /// back to now). `seq` must come from the producer's persistent counter, starting at 1.
    pub fn new(data: impl Into<Event>, seq: u64) -> Self {
        let data = data.into();
        let id = match &data {
            Event::Lifecycle(l) => l.id().to_owned(),
            _ => new_event_id(),
        };
        let time = time_from_unix(data.timestamp()).unwrap_or_else(|| {
            // Second precision, like the timestamp it stands in for.
            let now = Utc::now().timestamp();
            DateTime::from_timestamp(now, 0).unwrap_or_default()
        });
        EventRecord {
            id,
            source: data.source().to_owned(),
            subject: data.identity().to_owned(),
            time,
            seq,
            site: None,
            signature: None,
            data,
        }
    }

    /// Sets the producing site.
    pub fn with_site(mut self, site: impl Into<String>) -> Self {
        self.site = Some(site.into());
        self
    }

    /// The CloudEvents form, built with the CloudEvents SDK, for callers that use an SDK
    /// protocol binding. `type`, `source` and the data's `protocol` are written from the
    /// variant, so they are always canonical and consistent.
    pub fn to_cloudevent(&self) -> cloudevents::Event {
        self.cloudevent(true)
    }

    /// [`EventRecord::to_cloudevent`], with or without the signature attributes.
    fn cloudevent(&self, with_signature: bool) -> cloudevents::Event {
        let mut builder = EventBuilderV10::new()
            .id(self.id.clone())
            .source(self.data.source())
            .ty(self.data.event_type())
            .subject(self.subject.clone())
            .time(self.time)
            .data(CONTENT_TYPE, self.data.to_data());
        if self.seq != 0 {
            builder = match wire_seq(self.seq) {
                Ok(seq) => builder.extension(SEQ, seq),
                Err(seq) => builder.extension(SEQ, seq),
            };
        }
        if let Some(site) = &self.site {
            builder = builder.extension(SITE, site.as_str());
        }
        if let Some(signature) = self.signature.as_ref().filter(|_| with_signature) {
            builder = builder.extension(SIGKEY, signature.key_id.as_str()).extension(SIG, signature.sig.as_str());
            if let Some(credential) = &signature.credential {
                builder = builder.extension(SIGCRED, credential.as_str());
            }
        }
        // build() fails only for a missing id/type/source or an empty source; all are set
        // and the source is a non-empty constant.
        builder.build().expect("all required CloudEvents attributes are set")
    }

    /// The JSON document of the event without its signature attributes (`sigkey`, `sig`,
    /// `sigcred`): what a signature covers, once put in canonical form. Built directly, not by
    /// encoding and parsing again (signing is on the path of every recorded RPC).
    pub(crate) fn unsigned_value(&self) -> Value {
        serde_json::to_value(self.cloudevent(false)).expect("a CloudEvent always serializes to JSON")
    }

    /// Encodes as CloudEvents 1.0 structured-mode JSON. The output is deterministic (the same
    /// record always gives the same bytes), with extensions after the core attributes.
    ///
    /// Encoding does not enforce [`MAX_EVENT_BYTES`]: a producer carrying large RPC data should
    /// check the length and dead-letter or truncate, since consumers will refuse the event.
    pub fn encode(&self) -> Vec<u8> {
        // Written directly rather than through the SDK's event and a JSON tree of it (three
        // times the work on every event a producer stores); `encoded_through_the_sdk` in the
        // tests is the reference it must match byte for byte.
        let mut out = Vec::with_capacity(512);
        let wire = Wire { record: self };
        serde_json::to_writer(&mut out, &wire).expect("a JSON document always serializes");
        out
    }

    /// Decodes untrusted bytes: a CloudEvents 1.0 structured JSON event of a known type, or
    /// Choria's legacy bare lifecycle document (`{"protocol":"io.choria.lifecycle.v1.startup",
    /// ...}` or `choria:lifecycle:startup:1`), which gets `seq` 0 and no site. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() <= MAX_EVENT_BYTES {
            if let Some(record) = decode_fast(bytes) {
                return Ok(record);
            }
        }
        Self::decode_general(bytes)
    }

    /// Decoding through a JSON tree: every input, and the errors. [`EventRecord::decode`]
    /// comes here whenever its fast path does not succeed, so both give the same results.
    /// Public for the fuzz target and tests that compare the two paths.
    #[doc(hidden)]
    pub fn decode_general(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(DecodeError::Oversize { size: bytes.len(), max: MAX_EVENT_BYTES });
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::NotJson(clip(&e.to_string(), CLIP)))?;
        Self::from_value(value)
    }

    /// The NATS subject to publish this event on (see [`crate::subject`]).
    pub fn nats_subject(&self) -> Result<String, SubjectError> {
        crate::subject::for_event(&self.data)
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let Value::Object(map) = value else {
            return Err(DecodeError::NotAnObject);
        };
        if map.get("specversion").is_some_and(|v| !v.is_null()) {
            return decode_cloudevent(map);
        }
        match map.get("protocol") {
            Some(Value::String(p)) if p.starts_with("io.choria.lifecycle") || p.starts_with("choria:lifecycle:") => {
                decode_legacy(map)
            }
            _ => Err(DecodeError::MissingAttribute("specversion")),
        }
    }
}

impl From<&EventRecord> for cloudevents::Event {
    fn from(record: &EventRecord) -> Self {
        record.to_cloudevent()
    }
}

impl TryFrom<cloudevents::Event> for EventRecord {
    type Error = DecodeError;

    /// Applies the same checks as [`EventRecord::decode`] to an event received through a
    /// CloudEvents SDK binding.
    fn try_from(event: cloudevents::Event) -> Result<Self, DecodeError> {
        let value = serde_json::to_value(&event).map_err(|e| DecodeError::NotJson(clip(&e.to_string(), CLIP)))?;
        EventRecord::from_value(value)
    }
}

/// The `seq` extension as it goes out: CloudEvents integers are JSON numbers held as i64, so
/// the (never expected) top half of u64 goes out as a decimal string, which decode accepts.
fn wire_seq(seq: u64) -> Result<i64, String> {
    i64::try_from(seq).map_err(|_| seq.to_string())
}

/// The encoded form of a record: the CloudEvents core attributes in the SDK's order, `data`,
/// then the extensions sorted by name (`seq`, `sig`, `sigcred`, `sigkey`, `site`), so the
/// same record always gives the same bytes.
struct Wire<'a> {
    record: &'a EventRecord,
}

/// The `data` of a record, written straight from the typed document.
struct Data<'a>(&'a Event);

impl serde::Serialize for Data<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_data(serializer)
    }
}

impl serde::Serialize for Wire<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.record;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("specversion", "1.0")?;
        map.serialize_entry("id", &r.id)?;
        map.serialize_entry("type", r.data.event_type())?;
        map.serialize_entry("source", r.data.source())?;
        map.serialize_entry("datacontenttype", CONTENT_TYPE)?;
        map.serialize_entry("subject", &r.subject)?;
        match Rfc3339::of(&r.time) {
            Some(time) => map.serialize_entry("time", time.as_str())?,
            None => map.serialize_entry("time", &r.time)?,
        }
        map.serialize_entry("data", &Data(&r.data))?;
        if r.seq != 0 {
            match wire_seq(r.seq) {
                Ok(seq) => map.serialize_entry(SEQ, &seq)?,
                Err(seq) => map.serialize_entry(SEQ, &seq)?,
            }
        }
        if let Some(signature) = &r.signature {
            map.serialize_entry(SIG, &signature.sig)?;
            if let Some(credential) = &signature.credential {
                map.serialize_entry(SIGCRED, credential)?;
            }
            map.serialize_entry(SIGKEY, &signature.key_id)?;
        }
        if let Some(site) = &r.site {
            map.serialize_entry(SITE, site)?;
        }
        map.end()
    }
}
