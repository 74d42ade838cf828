//! The fast decode path's reader: one pass over a structured CloudEvent into borrowed
//! attributes and, when `type` comes before `data` (as Chorus and Choria write it), the typed
//! document read straight from the bytes. `data` is otherwise kept raw and read once the type
//! is known. Values it does not read (unknown attributes and `data` fields) are held to the
//! general path's rules by [`super::skipped`] before this runs.

use std::borrow::Cow;
use std::cell::Cell;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::decode::{decode_data, invalid, Attributes, Document, Known};
use super::{DecodeError, Event, EventKind, SEQ, SIG, SIGCRED, SIGKEY, SITE};

/// The attributes of a structured CloudEvent as the fast path reads them. Strings borrow from
/// the input unless they hold escapes. A repeated attribute fails the read (the general path
/// keeps the last), as does anything not of the expected JSON type: the general path then
/// decides.
#[derive(Default)]
pub(super) struct Wire<'a> {
    specversion: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    source: Option<Cow<'a, str>>,
    ty: Option<Cow<'a, str>>,
    datacontenttype: Option<Cow<'a, str>>,
    subject: Option<Cow<'a, str>>,
    time: Option<Cow<'a, str>>,
    seq: Option<u64>,
    site: Option<Cow<'a, str>>,
    sigkey: Option<Cow<'a, str>>,
    sig: Option<Cow<'a, str>>,
    sigcred: Option<Cow<'a, str>>,
    data_base64: bool,
    data: Option<Data<'a>>,
}

impl<'a> Wire<'a> {
    /// Whether the input claims to be a CloudEvent at all.
    pub(super) fn has_specversion(&self) -> bool {
        self.specversion.is_some()
    }

    /// The string attribute numbered `attribute` (see [`attribute`]).
    fn slot(&mut self, attribute: u32) -> Option<&mut Option<Cow<'a, str>>> {
        Some(match attribute {
            0 => &mut self.specversion,
            1 => &mut self.id,
            2 => &mut self.source,
            3 => &mut self.ty,
            4 => &mut self.datacontenttype,
            5 => &mut self.subject,
            6 => &mut self.time,
            7 => &mut self.site,
            8 => &mut self.sigkey,
            9 => &mut self.sig,
            10 => &mut self.sigcred,
            _ => return None,
        })
    }
}

const SEQ_ATTRIBUTE: u32 = 11;
const DATA_BASE64: u32 = 12;
const DATA: u32 = 13;

/// The number of a known attribute: string attributes first, in [`Wire::slot`]'s order.
fn attribute(name: &str) -> Option<u32> {
    Some(match name {
        "specversion" => 0,
        "id" => 1,
        "source" => 2,
        "type" => 3,
        "datacontenttype" => 4,
        "subject" => 5,
        "time" => 6,
        SITE => 7,
        SIGKEY => 8,
        SIG => 9,
        SIGCRED => 10,
        SEQ => SEQ_ATTRIBUTE,
        "data_base64" => DATA_BASE64,
        "data" => DATA,
        _ => return None,
    })
}

/// `data` as read.
// One per decode, on the stack and never in a collection: boxing the large variant would
// only add an allocation per event.
#[allow(clippy::large_enum_variant)]
enum Data<'a> {
    /// `type` came after `data`, was unknown, or names a watcher state (read in two steps).
    Raw(&'a RawValue),
    /// Decoded as it was read.
    Event(Result<Event, DecodeError>),
}

impl<'de> de::Deserialize<'de> for Wire<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only an object is an event (a derived struct would also read an array).
        d.deserialize_map(WireVisitor)
    }
}

struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = Wire<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a CloudEvent")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Wire<'de>, A::Error> {
        let mut wire = Wire::default();
        let mut seen = 0u32;
        // A key with escapes is not borrowed and fails the read: no producer writes one.
        while let Some(key) = map.next_key::<&'de str>()? {
            let Some(n) = attribute(key) else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if seen & (1 << n) != 0 {
                return Err(de::Error::custom(format_args!("duplicate attribute `{key}`")));
            }
            seen |= 1 << n;
            match n {
                SEQ_ATTRIBUTE => wire.seq = map.next_value()?,
                DATA_BASE64 => wire.data_base64 = map.next_value::<Option<&'de RawValue>>()?.is_some(),
                DATA => {
                    // A watcher state is read in two steps (common fields, then its details).
                    let known = wire.ty.as_deref().and_then(Known::resolve).filter(|k| k.kind != EventKind::Watcher);
                    wire.data = match known {
                        Some(known) => Some(Data::Event(map.next_value_seed(TypedData(known))?)),
                        None => map.next_value::<Option<&'de RawValue>>()?.map(Data::Raw),
                    };
                }
                _ => {
                    let value = map.next_value::<Option<Borrowed<'de>>>()?.map(|b| b.0);
                    if let Some(slot) = wire.slot(n) {
                        *slot = value;
                    }
                }
            }
        }
        Ok(wire)
    }
}

/// A string borrowed from the input, or owned when it holds escapes.
struct Borrowed<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Borrowed<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(BorrowedVisitor)
    }
}

struct BorrowedVisitor;

impl<'de> Visitor<'de> for BorrowedVisitor {
    type Value = Borrowed<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Borrowed<'de>, E> {
        Ok(Borrowed(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Borrowed<'de>, E> {
        Ok(Borrowed(Cow::Owned(s.to_owned())))
    }
}

/// Reads `data` as the document of a known type and checks it as [`decode_data`] does. A
/// document that does not deserialize fails the whole read (the reader stopped mid-value);
/// one that breaks a rule is kept as that error for [`Attributes::data`].
struct TypedData(Known);

impl<'de> DeserializeSeed<'de> for TypedData {
    type Value = Result<Event, DecodeError>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let once = Once { reader: Cell::new(Some(d)), failure: Cell::new(None) };
        let event = decode_data(self.0, &once);
        if let Some(failure) = once.failure.into_inner() {
            return Err(failure);
        }
        if once.reader.into_inner().is_some() {
            return Err(de::Error::custom("`data` was not read"));
        }
        Ok(event)
    }
}

/// `data` as a [`Document`] read once, straight from the input.
struct Once<'de, D: Deserializer<'de>> {
    reader: Cell<Option<D>>,
    failure: Cell<Option<D::Error>>,
}

impl<'de, D: Deserializer<'de>> Document for Once<'de, D> {
    fn typed<T: DeserializeOwned>(&self, ty: &'static str) -> Result<T, DecodeError> {
        let unread = || DecodeError::InvalidData { ty, path: ".".into(), message: "not read".into() };
        let reader = self.reader.take().ok_or_else(unread)?;
        T::deserialize(ObjectOnly(reader)).map_err(|e| {
            self.failure.set(Some(e));
            unread()
        })
    }
}

/// A reader that accepts only a JSON object at the top, as `data` must be (a derived struct
/// would also read an array, by position).
struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'a> Attributes<'a> for Wire<'a> {
    fn string(&mut self, name: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError> {
        Ok(attribute(name).and_then(|n| self.slot(n)).and_then(Option::take))
    }

    fn seq(&mut self) -> Result<u64, DecodeError> {
        Ok(self.seq.unwrap_or(0))
    }

    fn has_data_base64(&self) -> bool {
        self.data_base64
    }

    fn data(&mut self, known: Known) -> Result<Event, DecodeError> {
        match self.data.take() {
            None => Err(DecodeError::MissingAttribute("data")),
            Some(Data::Event(event)) => event,
            Some(Data::Raw(raw)) if raw.get().starts_with('{') => decode_data(known, raw),
            Some(Data::Raw(_)) => Err(invalid("data", "must be a JSON object".into())),
        }
    }
}
