//! Feeds arbitrary bytes to `EventRecord::decode`, which consumers run on untrusted input.
//!
//! Properties checked:
//! * decode never panics (libFuzzer reports any panic as a crash);
//! * whatever decodes re-encodes to bytes that decode to an equal record, so a consumer that
//!   republishes an event (replication, dead-letter replay) never changes or loses it;
//! * the re-encoding is a fixed point: encoding the re-decoded record gives the same bytes;
//! * the fast decode path gives what the general (JSON tree) path gives, record or error.
//!
//! Run: `cargo fuzz run decode_event fuzz/seeds/decode_event` (seeds are valid encodings of
//! every event type plus Choria's own wire examples).

#![no_main]

use chorus_schemas::EventRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = EventRecord::decode(data);
    assert_eq!(decoded, EventRecord::decode_general(data), "fast and general decode differ");
    let Ok(record) = decoded else {
        return;
    };
    let encoded = record.encode();
    let again = match EventRecord::decode(&encoded) {
        Ok(again) => again,
        Err(e) => panic!("re-encoded event does not decode: {e}\nencoded: {}", String::from_utf8_lossy(&encoded)),
    };
    assert_eq!(again, record, "decode(encode(record)) != record");
    assert_eq!(again.encode(), encoded, "encoding is not a fixed point");
});
