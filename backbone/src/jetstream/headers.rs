//! The NATS header map a message is published with.
//!
//! async-nats takes headers as a `HeaderMap` (a hash map of names to value lists). Built
//! with `&str` names, every name is validated and copied into a new allocation, and every
//! value copied again; profiles of the replicator's copy loop put building these maps at
//! about 14% of its CPU per event. Here the names Chorus itself writes are static (no
//! check, no allocation), a name is hashed once where it is new, and values of a message
//! handed over by value are moved, not copied. Names from elsewhere were checked by
//! [`Message::validate`](crate::Message) before they get here.

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::HeaderMap;

use super::{EVENT_ID_HEADER, EXPECTED_LAST_SEQUENCE_HEADER, MSG_ID_HEADER};
use crate::message::{REPLICATED_FROM_HEADER, STORED_TIME_HEADER};
use crate::Message;

/// The header names Chorus writes on every copy or publish, made once, with their text.
const KNOWN: [(&str, HeaderName); 5] = [
    (MSG_ID_HEADER, HeaderName::from_static(MSG_ID_HEADER)),
    (EVENT_ID_HEADER, HeaderName::from_static(EVENT_ID_HEADER)),
    (EXPECTED_LAST_SEQUENCE_HEADER, HeaderName::from_static(EXPECTED_LAST_SEQUENCE_HEADER)),
    (STORED_TIME_HEADER, HeaderName::from_static(STORED_TIME_HEADER)),
    (REPLICATED_FROM_HEADER, HeaderName::from_static(REPLICATED_FROM_HEADER)),
];

/// `name` as a header name: one of [`KNOWN`] without allocating, else parsed.
pub(crate) fn name(name: &str) -> HeaderName {
    if let Some((_, known)) = KNOWN.iter().find(|(text, _)| *text == name) {
        return known.clone();
    }
    name.parse().unwrap_or_else(|_| {
        // Message::validate refuses such names before a publish; this keeps the panic
        // async-nats would raise out of the connection's tasks all the same.
        HeaderName::from_static("Chorus-Invalid-Header-Name")
    })
}

/// The header named [`MSG_ID_HEADER`].
pub(crate) fn msg_id() -> HeaderName {
    KNOWN[0].1.clone()
}

/// The header named [`EVENT_ID_HEADER`].
pub(crate) fn event_id() -> HeaderName {
    KNOWN[1].1.clone()
}

/// The header named [`EXPECTED_LAST_SEQUENCE_HEADER`].
pub(crate) fn expected_last_sequence() -> HeaderName {
    KNOWN[2].1.clone()
}

/// A map of `headers` (as [`Message::headers`] holds them) to which a publish adds its own.
pub(crate) fn map_of<V: Into<HeaderValue>>(headers: impl ExactSizeIterator<Item = (impl AsRef<str>, V)>) -> HeaderMap {
    let mut map = HeaderMap::new();
    let mut names: Vec<HeaderName> = Vec::with_capacity(headers.len());
    for (n, v) in headers {
        let n = name(n.as_ref());
        // A name given before gets the value appended; a new one is inserted, hashed once.
        // (Names are few: comparing with the earlier ones costs less than a lookup.)
        if names.contains(&n) {
            map.append(n, v.into());
        } else {
            map.insert(n.clone(), v.into());
            names.push(n);
        }
    }
    map
}

/// The headers `m` is published with by [`Backbone::publish`](crate::Backbone): its other
/// headers, then its id as `Nats-Msg-Id`.
pub(crate) fn of_message(m: &Message) -> HeaderMap {
    let mut map = map_of(m.headers.iter().map(|(n, v)| (n, HeaderValue::from(v.as_str()))));
    map.insert(msg_id(), m.id.as_str());
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known names and parsed names are the same names; repeated names keep every value.
    #[test]
    fn maps_keep_every_value_under_the_same_names_as_parsing_does() {
        for text in [MSG_ID_HEADER, EVENT_ID_HEADER, EXPECTED_LAST_SEQUENCE_HEADER, STORED_TIME_HEADER, "X-Other"] {
            let parsed: HeaderName = text.parse().unwrap();
            assert_eq!(name(text), parsed, "{text}");
        }
        let headers = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "2".to_string()),
            ("A".to_string(), "3".to_string()),
            ("B".to_string(), "4".to_string()),
            ("B".to_string(), "5".to_string()),
        ];
        let map = map_of(headers.iter().map(|(n, v)| (n, HeaderValue::from(v.as_str()))));
        let values = |n: &str| map.get_all(n).map(|v| v.as_str().to_string()).collect::<Vec<_>>();
        assert_eq!(values("A"), ["1", "3"]);
        assert_eq!(values("B"), ["2", "4", "5"]);
        let mut m = Message::new("id-1", "s", "p").with_headers(headers.clone());
        m.headers.push((STORED_TIME_HEADER.into(), "t".into()));
        let map = of_message(&m);
        assert_eq!(map.get(MSG_ID_HEADER).map(|v| v.as_str()), Some("id-1"));
        assert_eq!(map.get(STORED_TIME_HEADER).map(|v| v.as_str()), Some("t"));
        assert_eq!(map.get_all("B").count(), 3);
    }
}
