//! Small private helpers shared by the event modules.

use serde::{Deserialize, Deserializer};

/// Current time as Unix seconds (UTC), the unit of every Choria `timestamp`/`time` field.
pub(crate) fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A fresh event id. UUIDv7 rather than Choria's v4: it sorts by creation time, which
/// keeps JetStream's dedupe window and sled keys local, and it is still globally unique.
pub(crate) fn new_event_id() -> String {
    // Encoded into a buffer rather than through `Display` (a third of the cost of making
    // a lifecycle event went to the formatter).
    let mut buffer = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buffer).to_owned()
}

/// Go encodes nil slices and maps as `null`; Choria documents therefore carry `null` where
/// a list is empty. Treat it as the empty value instead of rejecting the event.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// Bound untrusted text before it goes into an error message: a hostile 1 MiB `type`
/// must not turn every log line about it into 1 MiB.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Longest piece of untrusted text quoted in an error.
pub(crate) const CLIP: usize = 128;

/// Implements the accessors every event family needs over an enum whose variants all
/// wrap a struct with the named fields.
macro_rules! each_variant {
    ($value:expr, $enum:ident, $inner:ident => $body:expr, [$($variant:ident),+ $(,)?]) => {
        match $value {
            $($enum::$variant($inner) => $body,)+
        }
    };
}
pub(crate) use each_variant;

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("abcdef", 3), "abc…");
        // 'é' is two bytes; cutting at 1 must back off to 0.
        assert_eq!(clip("éé", 1), "…");
    }
}
