//! Decoding hostile bytes into an [`EventRecord`](super::EventRecord): the fast path for
//! well-formed CloudEvents, the general path that reports every error, and Choria's
//! legacy lifecycle format.

use chrono::{DateTime, Datelike, Utc};
use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::lifecycle;
use crate::lifecycle::{Lifecycle, LifecycleType};
use crate::machine::{Transition, WatcherDetails, WatcherState};
use crate::reaction::Reaction;
use crate::registration::Registration;
use crate::rpc::{RpcReply, RpcRequest};
use crate::util::{clip, CLIP};

use super::event::kind_source;
use super::skipped;
use super::wire::Wire;
use super::{DecodeError, Event, EventKind, EventRecord, EventSignature, SEQ, SIG, SIGCRED, SIGKEY, SITE};

/// The CloudEvents `source` that goes with a known `type`.
pub(crate) fn source_for_type(ty: &str) -> Option<&'static str> {
    Known::resolve(ty).map(|known| kind_source(known.kind))
}

/// What the CloudEvents `type` resolved to.
#[derive(Clone, Copy)]
pub(super) struct Known {
    pub(super) ty: &'static str,
    pub(super) kind: EventKind,
}

impl Known {
    pub(super) fn resolve(ty: &str) -> Option<Known> {
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
        } else if ty == Registration::PROTOCOL {
            EventKind::Registration
        } else if ty == Reaction::PROTOCOL {
            EventKind::Reaction
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
pub(super) fn decode_fast(bytes: &[u8]) -> Option<EventRecord> {
    // Skipped strings are not checked for UTF-8; the tree checks every string.
    let text = std::str::from_utf8(bytes).ok()?;
    // Unknown attributes and data fields are skipped unparsed below; the tree refuses some of
    // them (a number out of range, a lone surrogate, nesting over 128).
    if !skipped::tree_accepts(text) {
        return None;
    }
    let wire: Wire<'_> = serde_json::from_str(text).ok()?;
    if !wire.has_specversion() {
        return None;
    }
    decode_cloudevent(wire).ok()
}

/// Where [`decode_cloudevent`] takes the attributes from: a parsed JSON object (the general
/// path) or [`Wire`] (the fast path). One sequence of checks serves both.
pub(super) trait Attributes<'a> {
    /// A string attribute; `null` is absent. Borrowed from the input where it can be, so
    /// attributes that are only checked cost no allocation.
    fn string(&mut self, name: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError>;
    /// The `seq` extension; absent is 0.
    fn seq(&mut self) -> Result<u64, DecodeError>;
    /// Whether a non-null `data_base64` is present.
    fn has_data_base64(&self) -> bool;
    /// `data`, decoded as the document of `known`.
    fn data(&mut self, known: Known) -> Result<Event, DecodeError>;
}

impl Attributes<'static> for Map<String, Value> {
    fn string(&mut self, name: &'static str) -> Result<Option<Cow<'static, str>>, DecodeError> {
        match self.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(Cow::Owned(s))),
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

pub(super) fn decode_cloudevent<'a>(mut map: impl Attributes<'a>) -> Result<EventRecord, DecodeError> {
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
        let media = ct.split(';').next().unwrap_or("").trim().as_bytes();
        let json = media.eq_ignore_ascii_case(b"application/json")
            || media.eq_ignore_ascii_case(b"text/json")
            || media.len() >= 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json");
        if !json {
            return Err(invalid("datacontenttype", format!("\"{}\" is not JSON", clip(&ct, CLIP))));
        }
    }
    let subject = map.string("subject")?;
    let time = map.string("time")?.map(|t| parse_time(&t)).transpose()?;
    let seq = map.seq()?;
    let site = map.string(SITE)?;
    let credential = map.string(SIGCRED)?;
    let signature = match (map.string(SIGKEY)?, map.string(SIG)?) {
        (None, None) if credential.is_some() => {
            return Err(invalid(SIGCRED, "present without `sigkey` and `sig`".into()))
        }
        (None, None) => None,
        (Some(key_id), Some(sig)) => {
            if key_id.is_empty() {
                return Err(invalid(SIGKEY, "must not be empty".into()));
            }
            if sig.is_empty() {
                return Err(invalid(SIG, "must not be empty".into()));
            }
            if credential.as_deref().is_some_and(str::is_empty) {
                return Err(invalid(SIGCRED, "must not be empty".into()));
            }
            Some(EventSignature {
                key_id: key_id.into_owned(),
                sig: sig.into_owned(),
                credential: credential.map(Cow::into_owned),
            })
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
        Some(s) if s == event.identity() => s.into_owned(),
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
    Ok(EventRecord {
        id: id.into_owned(),
        source: source.into_owned(),
        subject,
        time,
        seq,
        site: site.map(Cow::into_owned),
        signature,
        data: event,
    })
}

pub(super) fn decode_legacy(map: Map<String, Value>) -> Result<EventRecord, DecodeError> {
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
pub(super) fn decode_data(known: Known, data: &(impl Document + ?Sized)) -> Result<Event, DecodeError> {
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
        EventKind::Registration => Event::Registration(data.typed(ty)?),
        EventKind::Reaction => Event::Reaction(data.typed(ty)?),
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
    if let Event::Reaction(r) = &event {
        // Both name subject tokens and the dedupe key.
        for (field, value) in [("rule", &r.rule), ("firing", &r.firing)] {
            if value.is_empty() {
                return Err(rule(field, "must not be empty".into()));
            }
        }
    }
    Ok(event)
}

/// A watcher state in two steps — common fields with the `type` tag, then the details of
/// the type the CloudEvents `type` names — instead of through serde's `flatten`, which loses
/// the path of a failing field.
pub(super) fn decode_watcher(ty: &'static str, data: &(impl Document + ?Sized)) -> Result<WatcherState, DecodeError> {
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
        "nagios" => WatcherDetails::Nagios(data.typed(ty)?),
        "kv" => WatcherDetails::Kv(data.typed(ty)?),
        "expression" => WatcherDetails::Expression(data.typed(ty)?),
        "metric" => WatcherDetails::Metric(data.typed(ty)?),
        "archive" => WatcherDetails::Archive(data.typed(ty)?),
        "machines" => WatcherDetails::Machines(data.typed(ty)?),
        "plugins" => WatcherDetails::Plugins(data.typed(ty)?),
        "gossip" => WatcherDetails::Gossip(data.typed(ty)?),
        "httpswitch" => WatcherDetails::HttpSwitch(data.typed(ty)?),
        "ccm_manifest" => WatcherDetails::CcmManifest(data.typed(ty)?),
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
pub(super) trait Document {
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

pub(super) fn invalid(attribute: &'static str, reason: String) -> DecodeError {
    DecodeError::InvalidAttribute { attribute, reason }
}

/// A required, non-empty string attribute; CloudEvents treats `null` as absent.
pub(super) fn required_string<'a>(
    map: &mut impl Attributes<'a>,
    name: &'static str,
) -> Result<Cow<'a, str>, DecodeError> {
    let value = map.string(name)?.ok_or(DecodeError::MissingAttribute(name))?;
    if value.is_empty() {
        return Err(invalid(name, "must not be empty".into()));
    }
    Ok(value)
}

pub(super) fn parse_seq(value: Option<Value>) -> Result<u64, DecodeError> {
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

pub(super) fn parse_time(text: &str) -> Result<DateTime<Utc>, DecodeError> {
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
pub(super) fn time_from_unix(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0).filter(representable)
}

pub(super) fn representable(time: &DateTime<Utc>) -> bool {
    (0..=9999).contains(&time.year())
}

pub(super) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
