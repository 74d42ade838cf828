//! Reading an event for the rules: only the parts their expressions can reach.
//!
//! Turning a whole CloudEvent into expr values (a string and a map entry per field, at every
//! depth) was most of the reactor's cost per event, though a rule typically reads two fields.
//! The rules' expressions are scanned once for the paths they use from `event` and `data`
//! ([`Needs`]), and each event is read in one pass that converts those paths and skips the
//! rest without allocating. The scan over-approximates: any use it cannot follow (`event`
//! alone, `data[...]`, `?.`, a path through a function) takes the whole value there, so an
//! expression always sees every field it could name. A firing still carries its whole cause:
//! it is read again in full (firings are few, events many).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use chorus_backbone::StoredMessage;
use chorus_schemas::EventRecord;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::template::{from_json, ExprValue, ExprVisitor};

/// The CloudEvents attributes the reactor itself reads of every event (kept apart, borrowed
/// from the message, and in the expressions' map only when an expression names them).
const ATTRIBUTES: [&str; 5] = ["specversion", "id", "type", "time", "subject"];

/// Which parts of an event are read: everything below a node, or some of its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Needs {
    /// The whole value.
    All,
    /// These fields of a map (a value that is not a map is read whole).
    Fields(BTreeMap<String, Needs>),
}

impl Default for Needs {
    /// Nothing.
    fn default() -> Self {
        Needs::Fields(BTreeMap::new())
    }
}

impl Needs {
    /// Adds a path from the event's root; its end is read whole.
    pub fn add(&mut self, path: &[&str]) {
        let mut node = self;
        for field in path {
            match node {
                Needs::All => return,
                Needs::Fields(fields) => {
                    node = fields.entry((*field).to_owned()).or_insert(Needs::Fields(BTreeMap::new()))
                }
            }
        }
        *node = Needs::All;
    }

    /// Adds what an expression in the reactor's language (names `event` and `data`) can
    /// reach.
    pub fn add_expression(&mut self, text: &str) {
        if text.contains("$env") {
            // `$env` is every name the expression can see.
            *self = Needs::All;
        }
        for path in paths(text) {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            self.add(&path);
        }
    }

    /// Reads `payload` (a JSON document) into expr values, only what is needed.
    pub fn read(&self, payload: &[u8]) -> Result<expr::Value, serde_json::Error> {
        self.read_with_attributes(payload).map(|(value, _)| value)
    }

    /// As [`Needs::read`], with the CloudEvents attributes of a JSON object beside.
    fn read_with_attributes<'p>(&self, payload: &'p [u8]) -> Result<(expr::Value, Attributes<'p>), serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(payload);
        let read = Root(self).deserialize(&mut de)?;
        de.end()?;
        Ok(read)
    }
}

/// The attributes the reactor reads itself, by their index in [`ATTRIBUTES`]: `None` when
/// absent, `Some(None)` when present but not text.
type Attributes<'p> = [Option<Option<Cow<'p, str>>>; 5];

/// A seed reading an event's root: the needed fields, and the attributes.
struct Root<'n>(&'n Needs);

impl<'de> DeserializeSeed<'de> for Root<'_> {
    type Value = (expr::Value, Attributes<'de>);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Root<'_> {
    type Value = (expr::Value, Attributes<'de>);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut attributes: Attributes<'de> = Default::default();
        let mut entries = Vec::new();
        while let Some(Text(key)) = map.next_key::<Text>()? {
            let attribute = ATTRIBUTES.iter().position(|a| *a == key);
            let needed = match self.0 {
                Needs::All => Some(&Needs::All),
                Needs::Fields(fields) => fields.get(key.as_ref()),
            };
            match (needed, attribute) {
                (Some(needs), _) => {
                    let value = map.next_value_seed(Pick(needs))?;
                    if let Some(i) = attribute {
                        attributes[i] = Some(value.as_string().map(|s| Cow::Owned(s.to_owned())));
                    }
                    entries.push((key.into_owned(), value));
                }
                (None, Some(i)) => attributes[i] = Some(map.next_value::<MaybeText>()?.0),
                (None, None) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((expr::Value::Map(entries.into_iter().collect()), attributes))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Ok((ExprVisitor.visit_seq(seq)?.0, Default::default()))
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok((expr::Value::Bool(v), Default::default()))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok((ExprVisitor.visit_i64(v)?.0, Default::default()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok((ExprVisitor.visit_u64(v)?.0, Default::default()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok((ExprVisitor.visit_f64(v)?.0, Default::default()))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((ExprVisitor.visit_str(v)?.0, Default::default()))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok((expr::Value::Nil, Default::default()))
    }
}

/// The paths from the event's root an expression uses, over-approximated: `data.x.y` is
/// `[data, x, y]`, `event.subject` is `[subject]`, `event` alone is `[]` (everything).
fn paths(text: &str) -> Vec<Vec<String>> {
    let bytes = text.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ident_at = |i: usize| -> usize {
        let mut j = i;
        while j < bytes.len() && is_ident(bytes[j]) {
            j += 1;
        }
        j
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_ident(bytes[i]) || (i > 0 && is_ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let end = ident_at(i);
        let word = &text[i..end];
        i = end;
        let mut path = match word {
            "event" => Vec::new(),
            "data" => vec!["data".to_owned()],
            _ => continue,
        };
        // Follows `.name` steps; anything else ends the path there (read whole).
        while i + 1 < bytes.len() && bytes[i] == b'.' && is_ident(bytes[i + 1]) && !bytes[i + 1].is_ascii_digit() {
            let end = ident_at(i + 1);
            path.push(text[i + 1..end].to_owned());
            i = end;
        }
        out.push(path);
    }
    out
}

/// A seed reading one value with its [`Needs`].
struct Pick<'n>(&'n Needs);

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = expr::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<expr::Value, D::Error> {
        match self.0 {
            Needs::All => ExprValue::deserialize(deserializer).map(|v| v.0),
            Needs::Fields(fields) => deserializer.deserialize_any(PickFields(fields)),
        }
    }
}

struct PickFields<'n>(&'n BTreeMap<String, Needs>);

/// A string, borrowed from the input when it has no escapes.
struct Text<'de>(Cow<'de, str>);

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.to_owned().into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TextVisitor).map(Text)
    }
}

/// Any value; kept when it is a string.
struct MaybeText<'de>(Option<Cow<'de, str>>);

impl<'de> Deserialize<'de> for MaybeText<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeText<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeText(Some(v.into())))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MaybeText(Some(v.to_owned().into())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeText(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeText(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeText(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeText(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MaybeText(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeText(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeText(None))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Visitor<'de> for PickFields<'_> {
    type Value = expr::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<expr::Value, A::Error> {
        let mut entries = Vec::with_capacity(self.0.len());
        while let Some(Text(key)) = map.next_key::<Text>()? {
            match self.0.get(key.as_ref()) {
                Some(needs) => entries.push((key.into_owned(), map.next_value_seed(Pick(needs))?)),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(expr::Value::Map(entries.into_iter().collect()))
    }
    // A value that is not a map is read whole.
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<expr::Value, A::Error> {
        ExprVisitor.visit_seq(seq).map(|v| v.0)
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<expr::Value, E> {
        ExprVisitor.visit_bool(v).map(|v| v.0)
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<expr::Value, E> {
        ExprVisitor.visit_i64(v).map(|v| v.0)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<expr::Value, E> {
        ExprVisitor.visit_u64(v).map(|v| v.0)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<expr::Value, E> {
        ExprVisitor.visit_f64(v).map(|v| v.0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<expr::Value, E> {
        ExprVisitor.visit_str(v).map(|v| v.0)
    }
    fn visit_unit<E>(self) -> Result<expr::Value, E> {
        Ok(expr::Value::Nil)
    }
}

/// An event as the rules see it.
pub struct ReadEvent<'p> {
    /// The CloudEvent, the parts the rules' expressions need.
    pub value: expr::Value,
    /// Its `id`.
    pub id: Cow<'p, str>,
    /// Its `type`.
    pub event_type: Cow<'p, str>,
    /// Its `subject` (empty when it has none).
    pub subject: Cow<'p, str>,
    /// Its `time` (or the stored time), Unix milliseconds.
    pub time_ms: i64,
    /// Whether `value` is the whole event (no need to read it again for a firing).
    pub complete: bool,
}

impl ReadEvent<'_> {
    /// The event as rules see it, read from `message`.
    pub fn seen<'a>(&'a self, message: &'a StoredMessage) -> super::rules::Seen<'a> {
        super::rules::Seen {
            stream: &message.stream,
            sequence: message.sequence,
            nats_subject: &message.subject,
            id: &self.id,
            event_type: &self.event_type,
            subject: &self.subject,
            event: &self.value,
            payload: &message.payload,
            complete: self.complete,
            time_ms: self.time_ms,
        }
    }
}

/// Why a message is not an event: a dead-letter code and the reason.
pub type NotAnEvent = (String, String);

/// Reads a stored message as a CloudEvent (or Choria's bare lifecycle document, as one),
/// only what `needs` names.
pub fn read<'p>(message: &'p StoredMessage, needs: &Needs) -> Result<ReadEvent<'p>, NotAnEvent> {
    // Skipped parts are not checked for UTF-8 by the reader: the whole is, here, so what is
    // an event does not depend on what the rules read.
    if let Err(e) = std::str::from_utf8(&message.payload) {
        return Err(("not_json".into(), format!("not UTF-8: {e}")));
    }
    if let Ok((value, [Some(_), id, event_type, time, subject])) = needs.read_with_attributes(&message.payload) {
        let (Some(Some(id)), Some(Some(event_type))) = (id, event_type) else {
            return Err(("not_cloudevent".into(), "a CloudEvent needs a string id and type".into()));
        };
        let time_ms = time
            .flatten()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.timestamp_millis())
            .unwrap_or_else(|| message.time.timestamp_millis());
        return Ok(ReadEvent {
            value,
            id,
            event_type,
            subject: subject.flatten().unwrap_or_default(),
            time_ms,
            complete: *needs == Needs::All,
        });
    }
    match EventRecord::decode(&message.payload) {
        // Choria's bare lifecycle documents, as a CloudEvent.
        Ok(record) => {
            let value = from_json(&serde_json::to_value(record.to_cloudevent()).unwrap_or_default());
            let text = |name: &str| -> Cow<'p, str> {
                let text = value.as_map().and_then(|m| m.get(name)).and_then(expr::Value::as_string);
                Cow::Owned(text.unwrap_or_default().to_owned())
            };
            Ok(ReadEvent {
                id: text("id"),
                event_type: text("type"),
                subject: text("subject"),
                time_ms: record.time.timestamp_millis(),
                complete: true,
                value,
            })
        }
        Err(e) => Err((e.code().to_owned(), e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"n1","time":"2024-04-22T08:00:00Z",
        "data":{"version":"1.0","identity":"n1","nested":{"a":1,"b":[1,2]}},"seq":2,"site":"london"}"#;

    fn needs(expressions: &[&str]) -> Needs {
        let mut n = Needs::default();
        for e in expressions {
            n.add_expression(e);
        }
        n
    }

    fn full() -> expr::Value {
        Needs::All.read(EVENT.as_bytes()).unwrap()
    }

    fn field<'a>(v: &'a expr::Value, path: &[&str]) -> Option<&'a expr::Value> {
        path.iter().try_fold(v, |v, k| v.as_map()?.get(*k))
    }

    #[test]
    fn paths_are_followed_and_over_approximated() {
        assert_eq!(
            paths(r#"data.version == "1" && event.subject endsWith ".x""#),
            [vec!["data", "version"], vec!["subject"]]
        );
        assert_eq!(paths("event.data.nested.a > 0"), [vec!["data", "nested", "a"]]);
        assert_eq!(paths("len(event) > 0 || data?.x"), [vec![], vec!["data"]]);
        assert_eq!(paths(r#"data["version"]"#), [vec!["data"]]);
        assert_eq!(paths("mydata.x + event_count + data2"), Vec::<Vec<String>>::new());
        assert_eq!(needs(&["$env.event.site == 1"]), Needs::All);
    }

    #[test]
    fn only_what_the_expressions_reach_is_read() {
        let v = needs(&["data.version == \"1.0\""]).read(EVENT.as_bytes()).unwrap();
        assert_eq!(field(&v, &["data", "version"]), field(&full(), &["data", "version"]));
        assert!(field(&v, &["subject"]).is_none(), "attributes are kept apart unless named");
        assert!(field(&v, &["data", "identity"]).is_none() && field(&v, &["site"]).is_none());
        let v = needs(&["event.data.nested.b[0] == 1"]).read(EVENT.as_bytes()).unwrap();
        assert_eq!(field(&v, &["data", "nested", "b"]), field(&full(), &["data", "nested", "b"]));
        assert!(field(&v, &["data", "nested", "a"]).is_none());
    }

    #[test]
    fn an_expression_naming_the_event_or_data_whole_reads_them_whole() {
        assert_eq!(needs(&["event != nil"]), Needs::All);
        assert_eq!(needs(&["event != nil"]).read(EVENT.as_bytes()).unwrap(), full());
        let v = needs(&["data != nil"]).read(EVENT.as_bytes()).unwrap();
        assert_eq!(field(&v, &["data"]), field(&full(), &["data"]));
    }

    #[test]
    fn expressions_see_the_same_over_a_partial_and_a_whole_event() {
        use super::super::template::{EventContext, Expression};
        for text in [
            r#"data.version == "1.0" && event.subject endsWith "1""#,
            "data.nested.b[1] == 2",
            "len(data.nested.b) == 2 && event.seq == 2",
            r#"data.missing == nil && event.site == "london""#,
            "data.nested == nil",
        ] {
            let e = Expression::compile(text).unwrap();
            let partial = needs(&[text]).read(EVENT.as_bytes()).unwrap();
            let whole = full();
            let at = |v: &expr::Value| e.eval(&EventContext::new(v, "S", 1, "x")).map_err(|_| ());
            assert_eq!(at(&partial), at(&whole), "{text}");
        }
    }

    fn message(payload: &str) -> StoredMessage {
        StoredMessage {
            stream: "S".into(),
            sequence: 1,
            time: chrono::DateTime::from_timestamp_millis(5).unwrap(),
            id: String::new(),
            subject: "x".into(),
            payload: payload.as_bytes().to_vec().into(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn attributes_are_read_beside_what_expressions_need() {
        let m = message(EVENT);
        let e = read(&m, &needs(&["event.subject == \"n1\""])).unwrap();
        assert_eq!((&*e.id, &*e.event_type, &*e.subject), ("e1", "t", "n1"));
        assert_eq!(e.time_ms, 1_713_772_800_000);
        assert_eq!(field(&e.value, &["subject"]), Some(&expr::Value::String("n1".into())));
        assert!(!e.complete && read(&m, &Needs::All).unwrap().complete);
        let untimed = message(r#"{"specversion":"1.0","id":"a","type":"t","time":3}"#);
        let e = read(&untimed, &Needs::default()).unwrap();
        assert_eq!((e.time_ms, &*e.subject), (5, ""), "the stored time, no subject");
        let bad = message(r#"{"specversion":"1.0","id":7,"type":"t"}"#);
        assert_eq!(read(&bad, &Needs::default()).err().unwrap().0, "not_cloudevent");
        assert!(read(&message("[1]"), &Needs::default()).is_err());
        let mut latin1 = message(r#"{"specversion":"1.0","id":"a","type":"t","site":"x"}"#);
        latin1.payload = [&latin1.payload[..45], b"\xe9", &latin1.payload[45..]].concat().into();
        assert_eq!(read(&latin1, &Needs::default()).err().unwrap().0, "not_json", "even in a part no rule reads");
    }

    #[test]
    fn malformed_json_is_an_error_even_where_it_is_skipped() {
        assert!(Needs::default().read(br#"{"id":"x","site":[1,}"#).is_err());
        assert!(Needs::default().read(br#"{"id":"x"} trailing"#).is_err());
    }
}
