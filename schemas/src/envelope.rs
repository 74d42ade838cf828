//! The envelope every Chorus event travels in: a CloudEvents 1.0 structured-mode JSON
//! document, as Choria uses for lifecycle and machine events, plus two extension attributes
//! Choria lacks:
//!
//! * `seq` — a per-producer, monotonically increasing sequence, so consumers detect gaps and
//!   projections apply each event once. `0` means "unsequenced" (every Choria-produced event)
//!   and is left off the wire; Chorus producers therefore start at 1.
//! * `site` — where the event was produced, kept when events are replicated between sites.
//! * `sigkey` and `sig` — an optional Ed25519 signature of the record (key id and base64
//!   signature), see [`crate::signature`]. Decoding keeps them as received; checking them is
//!   the [`crate::signature::Verifier`]'s job.
//!
//! The CloudEvents `id` is the event id and the dedupe key (use it as `Nats-Msg-Id`).
//! Decoding treats its input as hostile: it never panics, bounds size and nesting, and says
//! precisely what is wrong through [`DecodeError`].

use chrono::{DateTime, Datelike, Utc};
use cloudevents::{EventBuilder, EventBuilderV10};
use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::audit::AuditRecord;
use crate::lifecycle::{Alive, Governor, Lifecycle, LifecycleType, Provisioned, Shutdown, Startup, Upgraded};
use crate::machine::{Transition, WatcherDetails, WatcherState};
use crate::rpc::{RpcReply, RpcRequest};
use crate::subject::SubjectError;
use crate::util::{clip, new_event_id, CLIP};
use crate::{audit, lifecycle, machine, rpc};

/// Largest encoded event [`EventRecord::decode`] accepts: 1 MiB, NATS's default max payload.
/// An event larger than this could not have been published, so it is rejected before parsing.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// `datacontenttype` of every Chorus event.
pub const CONTENT_TYPE: &str = "application/json";

/// Name of the sequence extension attribute.
const SEQ: &str = "seq";
/// Name of the site extension attribute.
const SITE: &str = "site";
/// Name of the signature key id extension attribute.
pub(crate) const SIGKEY: &str = "sigkey";
/// Name of the signature extension attribute.
pub(crate) const SIG: &str = "sig";
/// Context attributes defined by CloudEvents 1.0 itself; everything else is an extension.
const CORE_ATTRIBUTES: [&str; 10] =
    ["specversion", "id", "type", "source", "datacontenttype", "dataschema", "subject", "time", "data", "data_base64"];

/// The broad family of an event, for routing and metrics without matching every type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// One of the six lifecycle events.
    Lifecycle,
    /// A machine transition.
    Transition,
    /// A machine watcher state.
    Watcher,
    /// An RPC request record.
    RpcRequest,
    /// An RPC reply record.
    RpcReply,
    /// A signer audit record.
    Audit,
}

impl EventKind {
    /// Stable snake_case name, usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Lifecycle => "lifecycle",
            EventKind::Transition => "transition",
            EventKind::Watcher => "watcher",
            EventKind::RpcRequest => "rpc_request",
            EventKind::RpcReply => "rpc_reply",
            EventKind::Audit => "audit",
        }
    }
}

/// The payload of an [`EventRecord`]: one of the typed documents of this crate. Which one is
/// fixed by the CloudEvents `type`, which always equals the document's `protocol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lifecycle event (`io.choria.lifecycle.v1.*`).
    Lifecycle(Lifecycle),
    /// A machine transition (`io.choria.machine.v1.transition`).
    Transition(Transition),
    /// A machine watcher state (`io.choria.machine.watcher.<type>.v1.state`).
    Watcher(WatcherState),
    /// An RPC request record (`io.choria.rpc.v1.request`).
    RpcRequest(RpcRequest),
    /// An RPC reply record (`io.choria.rpc.v1.reply`).
    RpcReply(RpcReply),
    /// A signer audit record (`io.choria.signer.v1.signature_audit`).
    Audit(AuditRecord),
}

impl Event {
    /// Every CloudEvents `type` Chorus decodes, in a stable order. Each has a JSON Schema
    /// named `<type>.json`.
    pub const TYPES: [&'static str; 14] = [
        Startup::PROTOCOL,
        Alive::PROTOCOL,
        Shutdown::PROTOCOL,
        Provisioned::PROTOCOL,
        Upgraded::PROTOCOL,
        Governor::PROTOCOL,
        Transition::PROTOCOL,
        "io.choria.machine.watcher.exec.v1.state",
        "io.choria.machine.watcher.file.v1.state",
        "io.choria.machine.watcher.schedule.v1.state",
        "io.choria.machine.watcher.timer.v1.state",
        RpcRequest::PROTOCOL,
        RpcReply::PROTOCOL,
        AuditRecord::PROTOCOL,
    ];

    /// The CloudEvents `type` (= protocol), e.g. `io.choria.lifecycle.v1.alive`. Derived from
    /// the variant, not from the `protocol` field, so it is always canonical.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::Lifecycle(l) => l.lifecycle_type().protocol(),
            Event::Transition(_) => Transition::PROTOCOL,
            Event::Watcher(w) => w.details.protocol(),
            Event::RpcRequest(_) => RpcRequest::PROTOCOL,
            Event::RpcReply(_) => RpcReply::PROTOCOL,
            Event::Audit(_) => AuditRecord::PROTOCOL,
        }
    }

    /// The family of this event.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Lifecycle(_) => EventKind::Lifecycle,
            Event::Transition(_) => EventKind::Transition,
            Event::Watcher(_) => EventKind::Watcher,
            Event::RpcRequest(_) => EventKind::RpcRequest,
            Event::RpcReply(_) => EventKind::RpcReply,
            Event::Audit(_) => EventKind::Audit,
        }
    }

    /// The CloudEvents `source` of the family (`io.choria.lifecycle`, `io.choria.machine`,
    /// `io.choria.rpc` or `io.choria.aaa`).
    pub fn source(&self) -> &'static str {
        kind_source(self.kind())
    }

    /// The node the event is about, which is also the CloudEvents `subject`: the emitting
    /// node for lifecycle and machine events, the sending host (`senderid`) for an RPC
    /// request, the replying node for a reply, and the signer for an audit record.
    pub fn identity(&self) -> &str {
        match self {
            Event::Lifecycle(l) => l.identity(),
            Event::Transition(t) => &t.identity,
            Event::Watcher(w) => &w.identity,
            Event::RpcRequest(r) => &r.senderid,
            Event::RpcReply(r) => &r.identity,
            Event::Audit(a) => &a.signer,
        }
    }

    /// When the event happened, Unix seconds (the document's `timestamp` or `time`).
    pub fn timestamp(&self) -> i64 {
        match self {
            Event::Lifecycle(l) => l.timestamp(),
            Event::Transition(t) => t.timestamp,
            Event::Watcher(w) => w.timestamp,
            Event::RpcRequest(r) => r.time,
            Event::RpcReply(r) => r.time,
            Event::Audit(a) => a.time,
        }
    }

    fn protocol_field(&self) -> &str {
        match self {
            Event::Lifecycle(l) => l.protocol_field(),
            Event::Transition(t) => &t.protocol,
            Event::Watcher(w) => &w.protocol,
            Event::RpcRequest(r) => &r.protocol,
            Event::RpcReply(r) => &r.protocol,
            Event::Audit(a) => &a.protocol,
        }
    }

    /// Name of the field [`Event::identity`] reads, for error messages.
    fn identity_field(&self) -> &'static str {
        match self {
            Event::RpcRequest(_) => "senderid",
            Event::Audit(_) => "signer",
            _ => "identity",
        }
    }

    /// The CloudEvents `data` document, with `protocol` set to the canonical type.
    fn to_data(&self) -> Value {
        let value = match self {
            Event::Lifecycle(l) => Ok(l.to_value()),
            Event::Transition(t) => serde_json::to_value(t),
            Event::Watcher(w) => serde_json::to_value(w),
            Event::RpcRequest(r) => serde_json::to_value(r),
            Event::RpcReply(r) => serde_json::to_value(r),
            Event::Audit(a) => serde_json::to_value(a),
        };
        // Structs of strings, integers and JSON objects with string keys always serialize.
        let mut value = value.expect("event documents always serialize");
        if let Value::Object(map) = &mut value {
            // Replacing an existing key keeps its position, so `protocol` stays first.
            map.insert("protocol".into(), Value::String(self.event_type().into()));
        }
        value
    }
}

macro_rules! into_event {
    ($($ty:ty => |$v:ident| $body:expr),+ $(,)?) => {
        $(impl From<$ty> for Event {
            fn from($v: $ty) -> Self {
                $body
            }
        })+
    };
}

into_event! {
    Lifecycle => |v| Event::Lifecycle(v),
    Startup => |v| Event::Lifecycle(v.into()),
    Alive => |v| Event::Lifecycle(v.into()),
    Shutdown => |v| Event::Lifecycle(v.into()),
    Provisioned => |v| Event::Lifecycle(v.into()),
    Upgraded => |v| Event::Lifecycle(v.into()),
    Governor => |v| Event::Lifecycle(v.into()),
    Transition => |v| Event::Transition(v),
    WatcherState => |v| Event::Watcher(v),
    RpcRequest => |v| Event::RpcRequest(v),
    RpcReply => |v| Event::RpcReply(v),
    AuditRecord => |v| Event::Audit(v),
}

fn kind_source(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Lifecycle => lifecycle::SOURCE,
        EventKind::Transition | EventKind::Watcher => machine::SOURCE,
        EventKind::RpcRequest | EventKind::RpcReply => rpc::SOURCE,
        EventKind::Audit => audit::SOURCE,
    }
}

/// Why bytes could not be decoded into an [`EventRecord`]. Every variant names the offending
/// part so a dead-letter entry or log line is actionable; quoted input is clipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Input larger than [`MAX_EVENT_BYTES`].
    #[error("event is {size} bytes, over the {max} byte limit")]
    Oversize {
        /// Size of the input, bytes.
        size: usize,
        /// The limit, bytes.
        max: usize,
    },
    /// Not valid JSON (including nesting deeper than the parser's limit of 128).
    #[error("event is not JSON: {0}")]
    NotJson(String),
    /// Valid JSON, but not an object.
    #[error("event is not a JSON object")]
    NotAnObject,
    /// A required CloudEvents attribute is absent or null.
    #[error("missing CloudEvents attribute `{0}`")]
    MissingAttribute(&'static str),
    /// A CloudEvents attribute has the wrong type or value.
    #[error("invalid CloudEvents attribute `{attribute}`: {reason}")]
    InvalidAttribute {
        /// Attribute name.
        attribute: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The CloudEvents `type` (or legacy `protocol`) is not one Chorus knows.
    #[error("unknown event type \"{0}\"")]
    UnknownType(String),
    /// `data` does not deserialize as the document of the type (or breaks one of its rules).
    #[error("data does not match type {ty}: {path}: {message}")]
    InvalidData {
        /// The event type the data was decoded as.
        ty: &'static str,
        /// JSON path of the offending field inside `data` (`.` for the document itself).
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The document's `protocol` is not the CloudEvents `type`.
    #[error("CloudEvents type \"{ty}\" does not match data protocol \"{protocol}\"")]
    TypeMismatch {
        /// The CloudEvents type.
        ty: &'static str,
        /// The data's protocol.
        protocol: String,
    },
    /// A lifecycle event whose inner `id` is not the CloudEvents `id` (Choria keeps them equal).
    #[error("CloudEvents id \"{id}\" does not match lifecycle data id \"{data_id}\"")]
    IdMismatch {
        /// The CloudEvents id.
        id: String,
        /// The lifecycle document's id.
        data_id: String,
    },
    /// The CloudEvents `subject` is not the node identity in the data.
    #[error("CloudEvents subject \"{subject}\" does not match the event's node identity \"{identity}\"")]
    SubjectMismatch {
        /// The CloudEvents subject.
        subject: String,
        /// The identity in the data ([`Event::identity`]).
        identity: String,
    },
    /// The `seq` extension is not an unsigned 64-bit integer.
    #[error("invalid seq extension: {0}")]
    BadSeq(String),
}

impl DecodeError {
    /// Stable snake_case name of the variant, for metric labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Oversize { .. } => "oversize",
            DecodeError::NotJson(_) => "not_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::MissingAttribute(_) => "missing_attribute",
            DecodeError::InvalidAttribute { .. } => "invalid_attribute",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::InvalidData { .. } => "invalid_data",
            DecodeError::TypeMismatch { .. } => "type_mismatch",
            DecodeError::IdMismatch { .. } => "id_mismatch",
            DecodeError::SubjectMismatch { .. } => "subject_mismatch",
            DecodeError::BadSeq(_) => "bad_seq",
        }
    }
}

/// The signature carried by a signed [`EventRecord`], as found on the wire.
///
/// Kept as received (the signature text is not checked by decoding), so a record decodes and
/// re-encodes byte for byte; [`crate::signature::Verifier`] judges it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventSignature {
    /// Id of the signing key (extension `sigkey`), see [`crate::signature::key_id`].
    pub key_id: String,
    /// The 64-byte Ed25519 signature in standard base64 with padding (extension `sig`).
    pub sig: String,
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
    /// Signature of the record (extensions `sigkey` and `sig`), if signed; see
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
        let mut builder = EventBuilderV10::new()
            .id(self.id.clone())
            .source(self.data.source())
            .ty(self.data.event_type())
            .subject(self.subject.clone())
            .time(self.time)
            .data(CONTENT_TYPE, self.data.to_data());
        if self.seq != 0 {
            // CloudEvents integers are JSON numbers; the SDK holds them as i64, so the (never
            // expected) top half of u64 goes out as a decimal string, which decode accepts.
            builder = match i64::try_from(self.seq) {
                Ok(seq) => builder.extension(SEQ, seq),
                Err(_) => builder.extension(SEQ, self.seq.to_string()),
            };
        }
        if let Some(site) = &self.site {
            builder = builder.extension(SITE, site.as_str());
        }
        if let Some(signature) = &self.signature {
            builder = builder.extension(SIGKEY, signature.key_id.as_str()).extension(SIG, signature.sig.as_str());
        }
        // build() fails only for a missing id/type/source or an empty source; all are set
        // and the source is a non-empty constant.
        builder.build().expect("all required CloudEvents attributes are set")
    }

    /// Encodes as CloudEvents 1.0 structured-mode JSON. The output is deterministic (the same
    /// record always gives the same bytes), with extensions after the core attributes.
    ///
    /// Encoding does not enforce [`MAX_EVENT_BYTES`]: a producer carrying large RPC data should
    /// check the length and dead-letter or truncate, since consumers will refuse the event.
    pub fn encode(&self) -> Vec<u8> {
        let event = self.to_cloudevent();
        // The SDK keeps extensions in a HashMap; re-order them so output does not vary
        // between calls (hash chains, caches and tests compare bytes).
        let wire = serde_json::to_value(&event).expect("a CloudEvent always serializes to JSON");
        let out = match wire {
            Value::Object(map) => {
                let mut core = Map::with_capacity(map.len());
                let mut extensions = Vec::new();
                for (key, value) in map {
                    if CORE_ATTRIBUTES.contains(&key.as_str()) {
                        core.insert(key, value);
                    } else {
                        extensions.push((key, value));
                    }
                }
                extensions.sort_by(|a, b| a.0.cmp(&b.0));
                core.extend(extensions);
                Value::Object(core)
            }
            other => other,
        };
        serde_json::to_vec(&out).expect("a JSON value always serializes")
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

/// The CloudEvents `source` that goes with a known `type`.
pub(crate) fn source_for_type(ty: &str) -> Option<&'static str> {
    Known::resolve(ty).map(|known| kind_source(known.kind))
}

/// What the CloudEvents `type` resolved to.
#[derive(Clone, Copy)]
struct Known {
    ty: &'static str,
    kind: EventKind,
}

impl Known {
    fn resolve(ty: &str) -> Option<Known> {
        let ty = Event::TYPES.into_iter().find(|t| *t == ty)?;
        let kind = if ty.starts_with("io.choria.lifecycle.") {
            EventKind::Lifecycle
        } else if ty == Transition::PROTOCOL {
            EventKind::Transition
        } else if ty.starts_with("io.choria.machine.watcher.") {
            EventKind::Watcher
        } else if ty == RpcRequest::PROTOCOL {
            EventKind::RpcRequest
        } else if ty == RpcReply::PROTOCOL {
            EventKind::RpcReply
        } else {
            EventKind::Audit
        };
        Some(Known { ty, kind })
    }
}

/// The fast path of [`EventRecord::decode`] for well-formed CloudEvents: one pass over the
/// bytes into borrowed attributes and the typed document, with no JSON tree in between (the
/// tree costs most of a decode, and projections decode every event they replay). Any input it
/// does not accept in full goes to the general path, which alone reports errors; a test holds
/// the two to the same results.
fn decode_fast(bytes: &[u8]) -> Option<EventRecord> {
    // A derived struct also reads a JSON array positionally; only objects are events.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    // Skipped strings are not checked for UTF-8; the tree checks every string.
    let text = std::str::from_utf8(bytes).ok()?;
    // Unknown attributes and data fields are skipped unparsed below; the tree refuses some of
    // them (a number out of range, a bad escape, nesting over 128), so the whole input is
    // first read the way the tree reads it.
    serde_json::from_str::<Validated>(text).ok()?;
    let wire: Wire<'_> = serde_json::from_str(text).ok()?;
    wire.specversion.as_ref()?;
    decode_cloudevent(wire).ok()
}

/// Any JSON value, read the way building a [`Value`] reads it (every number parsed, every
/// string unescaped, the same nesting limit) but not kept: it refuses exactly what the tree
/// refuses, at a fraction of the cost.
struct Validated;

impl<'de> serde::Deserialize<'de> for Validated {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValidatedVisitor)
    }
}

struct ValidatedVisitor;

impl<'de> serde::de::Visitor<'de> for ValidatedVisitor {
    type Value = Validated;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_str<E>(self, _: &str) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_unit<E>(self) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_none<E>(self) -> Result<Validated, E> {
        Ok(Validated)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Validated, D::Error> {
        serde::Deserialize::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Validated, A::Error> {
        while seq.next_element::<Validated>()?.is_some() {}
        Ok(Validated)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Validated, A::Error> {
        while map.next_entry::<Validated, Validated>()?.is_some() {}
        Ok(Validated)
    }
}

/// The attributes of a structured CloudEvent as [`decode_fast`] reads them. Strings borrow
/// from the input unless they hold escapes; a repeated attribute fails (the general path
/// keeps the last), as does anything not of the expected JSON type.
#[derive(serde::Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    specversion: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "type")]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow)]
    datacontenttype: Option<Cow<'a, str>>,
    #[serde(borrow)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Option<Cow<'a, str>>,
    seq: Option<u64>,
    #[serde(borrow)]
    site: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sigkey: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sig: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data_base64: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Where [`decode_cloudevent`] takes the attributes from: a parsed JSON object (the general
/// path) or [`Wire`] (the fast path). One sequence of checks serves both.
trait Attributes {
    /// A string attribute; `null` is absent.
    fn string(&mut self, name: &'static str) -> Result<Option<String>, DecodeError>;
    /// The `seq` extension; absent is 0.
    fn seq(&mut self) -> Result<u64, DecodeError>;
    /// Whether a non-null `data_base64` is present.
    fn has_data_base64(&self) -> bool;
    /// `data`, decoded as the document of `known`.
    fn data(&mut self, known: Known) -> Result<Event, DecodeError>;
}

impl Attributes for Map<String, Value> {
    fn string(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        match self.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(name, format!("must be a string, got {}", json_kind(&other)))),
        }
    }

    fn seq(&mut self) -> Result<u64, DecodeError> {
        parse_seq(self.remove(SEQ))
    }

    fn has_data_base64(&self) -> bool {
        self.get("data_base64").is_some_and(|v| !v.is_null())
    }

    fn data(&mut self, known: Known) -> Result<Event, DecodeError> {
        match self.remove("data") {
            None | Some(Value::Null) => Err(DecodeError::MissingAttribute("data")),
            Some(data @ Value::Object(_)) => decode_data(known, &data),
            Some(other) => Err(invalid("data", format!("must be a JSON object, got {}", json_kind(&other)))),
        }
    }
}

impl Attributes for Wire<'_> {
    fn string(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        let field = match name {
            "specversion" => &mut self.specversion,
            "id" => &mut self.id,
            "source" => &mut self.source,
            "type" => &mut self.ty,
            "datacontenttype" => &mut self.datacontenttype,
            "subject" => &mut self.subject,
            "time" => &mut self.time,
            SITE => &mut self.site,
            SIGKEY => &mut self.sigkey,
            SIG => &mut self.sig,
            _ => return Ok(None),
        };
        Ok(field.take().map(Cow::into_owned))
    }

    fn seq(&mut self) -> Result<u64, DecodeError> {
        Ok(self.seq.unwrap_or(0))
    }

    fn has_data_base64(&self) -> bool {
        self.data_base64.is_some()
    }

    fn data(&mut self, known: Known) -> Result<Event, DecodeError> {
        match self.data {
            None => Err(DecodeError::MissingAttribute("data")),
            Some(raw) if raw.get().starts_with('{') => decode_data(known, raw),
            Some(_) => Err(invalid("data", "must be a JSON object".into())),
        }
    }
}

fn decode_cloudevent(mut map: impl Attributes) -> Result<EventRecord, DecodeError> {
    let specversion = required_string(&mut map, "specversion")?;
    if specversion != "1.0" {
        return Err(invalid(
            "specversion",
            format!("\"{}\" is not supported; expected \"1.0\"", clip(&specversion, CLIP)),
        ));
    }
    let id = required_string(&mut map, "id")?;
    let source = required_string(&mut map, "source")?;
    let ty = required_string(&mut map, "type")?;
    let known = Known::resolve(&ty).ok_or_else(|| DecodeError::UnknownType(clip(&ty, CLIP)))?;
    let expected_source = kind_source(known.kind);
    if source != expected_source {
        return Err(invalid(
            "source",
            format!("\"{}\" is not the source of {}; expected \"{expected_source}\"", clip(&source, CLIP), known.ty),
        ));
    }
    if let Some(ct) = map.string("datacontenttype")? {
        let media = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if media != "application/json" && media != "text/json" && !media.ends_with("+json") {
            return Err(invalid("datacontenttype", format!("\"{}\" is not JSON", clip(&ct, CLIP))));
        }
    }
    let subject = map.string("subject")?;
    let time = map.string("time")?.map(|t| parse_time(&t)).transpose()?;
    let seq = map.seq()?;
    let site = map.string(SITE)?;
    let signature = match (map.string(SIGKEY)?, map.string(SIG)?) {
        (None, None) => None,
        (Some(key_id), Some(sig)) => {
            if key_id.is_empty() {
                return Err(invalid(SIGKEY, "must not be empty".into()));
            }
            if sig.is_empty() {
                return Err(invalid(SIG, "must not be empty".into()));
            }
            Some(EventSignature { key_id, sig })
        }
        (Some(_), None) => return Err(invalid(SIG, "absent while `sigkey` is set; they go together".into())),
        (None, Some(_)) => return Err(invalid(SIGKEY, "absent while `sig` is set; they go together".into())),
    };
    if map.has_data_base64() {
        return Err(invalid("data_base64", "binary data is not accepted; Chorus events carry JSON `data`".into()));
    }
    let event = map.data(known)?;
    if let Event::Lifecycle(l) = &event {
        if l.id() != id {
            return Err(DecodeError::IdMismatch { id: clip(&id, CLIP), data_id: clip(l.id(), CLIP) });
        }
    }
    let subject = match subject {
        None => event.identity().to_owned(),
        Some(s) if s == event.identity() => s,
        Some(s) => {
            return Err(DecodeError::SubjectMismatch {
                subject: clip(&s, CLIP),
                identity: clip(event.identity(), CLIP),
            })
        }
    };
    let time = match time {
        Some(t) => t,
        None => time_from_unix(event.timestamp()).ok_or_else(|| {
            invalid("time", format!("absent, and the data timestamp {} is outside years 0000-9999", event.timestamp()))
        })?,
    };
    Ok(EventRecord { id, source, subject, time, seq, site, signature, data: event })
}

fn decode_legacy(map: Map<String, Value>) -> Result<EventRecord, DecodeError> {
    let protocol = match map.get("protocol") {
        Some(Value::String(p)) => p.clone(),
        _ => return Err(DecodeError::MissingAttribute("specversion")),
    };
    let lifecycle_type =
        LifecycleType::from_protocol(&protocol).ok_or_else(|| DecodeError::UnknownType(clip(&protocol, CLIP)))?;
    let known = Known { ty: lifecycle_type.protocol(), kind: EventKind::Lifecycle };
    let event = decode_data(known, &Value::Object(map))?;
    let time = time_from_unix(event.timestamp()).ok_or_else(|| DecodeError::InvalidData {
        ty: known.ty,
        path: "timestamp".into(),
        message: format!("{} is outside years 0000-9999", event.timestamp()),
    })?;
    let id = match &event {
        Event::Lifecycle(l) => l.id().to_owned(),
        _ => String::new(),
    };
    Ok(EventRecord {
        id,
        source: lifecycle::SOURCE.to_owned(),
        subject: event.identity().to_owned(),
        time,
        seq: 0,
        site: None,
        signature: None,
        data: event,
    })
}

/// Deserializes `data` as the document of `known` and checks the rules serde cannot express.
fn decode_data(known: Known, data: &(impl Document + ?Sized)) -> Result<Event, DecodeError> {
    let ty = known.ty;
    let mut event = match known.kind {
        EventKind::Lifecycle => {
            let lifecycle_type = LifecycleType::from_protocol(ty).ok_or_else(|| DecodeError::UnknownType(ty.into()))?;
            Event::Lifecycle(match lifecycle_type {
                LifecycleType::Startup => Lifecycle::Startup(data.typed(ty)?),
                LifecycleType::Alive => Lifecycle::Alive(data.typed(ty)?),
                LifecycleType::Shutdown => Lifecycle::Shutdown(data.typed(ty)?),
                LifecycleType::Provisioned => Lifecycle::Provisioned(data.typed(ty)?),
                LifecycleType::Upgraded => Lifecycle::Upgraded(data.typed(ty)?),
                LifecycleType::Governor => Lifecycle::Governor(data.typed(ty)?),
            })
        }
        EventKind::Transition => Event::Transition(data.typed(ty)?),
        EventKind::Watcher => Event::Watcher(decode_watcher(ty, data)?),
        EventKind::RpcRequest => Event::RpcRequest(data.typed(ty)?),
        EventKind::RpcReply => Event::RpcReply(data.typed(ty)?),
        EventKind::Audit => Event::Audit(data.typed(ty)?),
    };

    let rule = |path: &str, message: String| DecodeError::InvalidData { ty, path: path.into(), message };

    // protocol must be the type; lifecycle also accepts Choria's legacy spelling of it.
    if event.protocol_field() != ty {
        match &mut event {
            Event::Lifecycle(l) if LifecycleType::from_protocol(l.protocol_field()) == Some(l.lifecycle_type()) => {
                *l.protocol_mut() = ty.to_owned();
            }
            other => {
                return Err(DecodeError::TypeMismatch { ty, protocol: clip(other.protocol_field(), CLIP) });
            }
        }
    }
    if let Event::Watcher(w) = &event {
        if w.details.protocol() != ty {
            return Err(rule("type", format!("watcher type \"{}\" is not the type of {ty}", w.watcher_type())));
        }
    }
    if event.identity().is_empty() {
        return Err(rule(event.identity_field(), "must not be empty".into()));
    }
    if let Event::Lifecycle(l) = &event {
        if l.id().is_empty() {
            return Err(rule("id", "must not be empty".into()));
        }
        if let Lifecycle::Governor(g) = l {
            if g.governor.is_empty() {
                return Err(rule("governor", "must not be empty".into()));
            }
        }
    }
    Ok(event)
}

/// A watcher state in two steps — common fields with the `type` tag, then the details of
/// the type the CloudEvents `type` names — instead of through serde's `flatten`, which loses
/// the path of a failing field.
fn decode_watcher(ty: &'static str, data: &(impl Document + ?Sized)) -> Result<WatcherState, DecodeError> {
    #[derive(serde::Deserialize)]
    struct Common {
        protocol: String,
        identity: String,
        id: String,
        version: String,
        timestamp: i64,
        machine: String,
        name: String,
        #[serde(rename = "type")]
        watcher_type: String,
    }
    let common: Common = data.typed(ty)?;
    let expected =
        ty.strip_prefix("io.choria.machine.watcher.").and_then(|t| t.strip_suffix(".v1.state")).unwrap_or_default();
    if common.watcher_type != expected {
        return Err(DecodeError::InvalidData {
            ty,
            path: "type".into(),
            message: format!("watcher type \"{}\" is not the type of {ty}", clip(&common.watcher_type, CLIP)),
        });
    }
    let details = match expected {
        "exec" => WatcherDetails::Exec(data.typed(ty)?),
        "file" => WatcherDetails::File(data.typed(ty)?),
        "schedule" => WatcherDetails::Schedule(data.typed(ty)?),
        "timer" => WatcherDetails::Timer(data.typed(ty)?),
        _ => return Err(DecodeError::UnknownType(ty.into())),
    };
    Ok(WatcherState {
        protocol: common.protocol,
        identity: common.identity,
        id: common.id,
        version: common.version,
        timestamp: common.timestamp,
        machine: common.machine,
        name: common.name,
        details,
    })
}

/// An event's `data`, parsed (general path) or still raw (fast path).
trait Document {
    /// Deserializes as `T`, the document of type `ty`.
    fn typed<T: DeserializeOwned>(&self, ty: &'static str) -> Result<T, DecodeError>;
}

impl Document for Value {
    /// serde, with the JSON path of the failing field in the error.
    fn typed<T: DeserializeOwned>(&self, ty: &'static str) -> Result<T, DecodeError> {
        serde_path_to_error::deserialize(self).map_err(|e| DecodeError::InvalidData {
            ty,
            path: clip(&e.path().to_string(), CLIP),
            message: clip(&e.inner().to_string(), 2 * CLIP),
        })
    }
}

impl Document for RawValue {
    /// Without the path: on failure the general path decodes again and reports it.
    fn typed<T: DeserializeOwned>(&self, ty: &'static str) -> Result<T, DecodeError> {
        serde_json::from_str(self.get()).map_err(|e| DecodeError::InvalidData {
            ty,
            path: ".".into(),
            message: clip(&e.to_string(), 2 * CLIP),
        })
    }
}

fn invalid(attribute: &'static str, reason: String) -> DecodeError {
    DecodeError::InvalidAttribute { attribute, reason }
}

/// A required, non-empty string attribute; CloudEvents treats `null` as absent.
fn required_string(map: &mut impl Attributes, name: &'static str) -> Result<String, DecodeError> {
    let value = map.string(name)?.ok_or(DecodeError::MissingAttribute(name))?;
    if value.is_empty() {
        return Err(invalid(name, "must not be empty".into()));
    }
    Ok(value)
}

fn parse_seq(value: Option<Value>) -> Result<u64, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| {
            DecodeError::BadSeq(format!("{} is not an unsigned 64-bit integer", clip(&n.to_string(), CLIP)))
        }),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().map_err(|_| DecodeError::BadSeq(format!("\"{}\" does not fit in 64 bits", clip(&s, CLIP))))
        }
        Some(Value::String(s)) => Err(DecodeError::BadSeq(format!("\"{}\" is not a decimal integer", clip(&s, CLIP)))),
        Some(other) => Err(DecodeError::BadSeq(format!("expected an integer, got {}", json_kind(&other)))),
    }
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, DecodeError> {
    let time = DateTime::parse_from_rfc3339(text)
        .map_err(|e| invalid("time", format!("\"{}\" is not an RFC 3339 timestamp: {e}", clip(text, CLIP))))?
        .with_timezone(&Utc);
    // An offset can push a valid local time outside what RFC 3339 can write in UTC; such a
    // time could not be re-encoded, so it is refused here.
    if !representable(&time) {
        return Err(invalid("time", format!("\"{}\" is outside years 0000-9999 in UTC", clip(text, CLIP))));
    }
    Ok(time)
}

/// Unix seconds as a time RFC 3339 can express.
fn time_from_unix(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0).filter(representable)
}

fn representable(time: &DateTime<Utc>) -> bool {
    (0..=9999).contains(&time.year())
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
