//! A quick, deterministic fuzz loop that runs with the unit tests: random bytes, byte-level
//! mutations of valid encodings, and structural mutations (a random JSON node replaced by a
//! random value). Decode must never panic, and whatever decodes must re-encode to a record
//! that decodes back equal — the same property as the cargo-fuzz target, without the tooling.
//! Every input also holds the fast decode path to the general one.

use serde_json::{json, Value};

use super::rng::Rng;
use super::samples::*;
use crate::envelope::EventRecord;

const INTERESTING_BYTES: &[u8] = b"{}[]\",:0-1.eE\\u \t\n\x00\xff.*>";

fn interesting_value(rng: &mut Rng) -> Value {
    match rng.below(22) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(0),
        3 => json!(-1),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1.5),
        7 => json!(1e300),
        8 => json!(""),
        9 => json!("x"),
        10 => json!("a.b*c>"),
        11 => json!("io.choria.lifecycle.v1.startup"),
        12 => json!("choria:lifecycle:alive:1"),
        13 => json!("io.choria.machine.watcher.timer.v1.state"),
        14 => json!("1.0"),
        15 => json!("2018-08-24T10:36:13Z"),
        16 => json!("9999-12-31T23:59:59-01:00"),
        17 => json!([]),
        18 => json!({}),
        19 => {
            json!({"protocol": "io.choria.lifecycle.v1.shutdown", "id": "x", "identity": "n", "component": "c", "timestamp": 1})
        }
        20 => {
            let mut v = json!(1);
            for _ in 0..rng.below(140) {
                v = json!([v]);
            }
            v
        }
        _ => json!("9223372036854775808"),
    }
}

/// Replaces, removes or adds one node somewhere in `value`.
fn mutate_tree(value: &mut Value, rng: &mut Rng) {
    match value {
        Value::Object(map) if !map.is_empty() && !rng.chance(4) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.below(keys.len())];
            match rng.below(6) {
                0 => {
                    map.remove(key);
                }
                1 => {
                    map.insert(key.clone(), interesting_value(rng));
                }
                2 => {
                    let names = [
                        "seq",
                        "site",
                        "subject",
                        "time",
                        "data_base64",
                        "type",
                        "protocol",
                        "id",
                        "identity",
                        "specversion",
                        "extra",
                    ];
                    map.insert(names[rng.below(names.len())].into(), interesting_value(rng));
                }
                _ => mutate_tree(map.get_mut(key).expect("key exists"), rng),
            }
        }
        Value::Array(items) if !items.is_empty() && !rng.chance(4) => {
            let i = rng.below(items.len());
            mutate_tree(&mut items[i], rng);
        }
        other => *other = interesting_value(rng),
    }
}

fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..=rng.below(4) {
        if bytes.is_empty() {
            bytes.push(INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())]);
            continue;
        }
        let at = rng.below(bytes.len());
        match rng.below(6) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())],
            2 => bytes.insert(at, INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())]),
            3 => {
                bytes.remove(at);
            }
            4 => bytes.truncate(at),
            _ => {
                // Duplicate a slice (repeats keys, tokens, braces).
                let end = (at + rng.below(16)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                let to = rng.below(bytes.len());
                bytes.splice(to..to, chunk);
            }
        }
    }
}

/// Decode must not panic; success must survive a re-encode; the fast path must give what
/// the general path gives (record or error).
fn check(bytes: &[u8]) -> bool {
    let decoded = EventRecord::decode(bytes);
    assert_eq!(
        decoded,
        EventRecord::decode_general(bytes),
        "the fast path differs from the general path; input: {}",
        String::from_utf8_lossy(bytes)
    );
    match decoded {
        Ok(record) => {
            let again = EventRecord::decode(&record.encode()).unwrap_or_else(|e| {
                panic!("re-encoded event does not decode: {e}\ninput: {}", String::from_utf8_lossy(bytes))
            });
            assert_eq!(again, record, "round trip changed the record; input: {}", String::from_utf8_lossy(bytes));
            true
        }
        Err(e) => {
            std::hint::black_box((e.code(), e.to_string()));
            false
        }
    }
}

#[test]
fn random_and_mutated_input_never_panics() {
    let mut corpus: Vec<Vec<u8>> = samples().into_iter().map(|(_, r)| r.encode()).collect();
    for text in [CHORIA_STARTUP, CHORIA_LEGACY_SHUTDOWN, CHORIA_TRANSITION, CHORIA_EXEC_STATE] {
        corpus.push(text.as_bytes().to_vec());
    }
    let trees: Vec<Value> = corpus.iter().map(|b| serde_json::from_slice(b).unwrap()).collect();

    // CHORUS_FUZZ_ITERATIONS / CHORUS_FUZZ_SEED run a longer or different loop by hand.
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let iterations = env("CHORUS_FUZZ_ITERATIONS").unwrap_or(20_000);
    let mut rng = Rng(env("CHORUS_FUZZ_SEED").filter(|s| *s != 0).unwrap_or(0x9e37_79b9_7f4a_7c15));
    let (mut decoded, mut total) = (0usize, 0usize);
    for i in 0..iterations {
        let input = match i % 4 {
            0 => (0..rng.below(256)).map(|_| rng.next() as u8).collect(),
            1 => {
                let mut bytes = corpus[rng.below(corpus.len())].clone();
                mutate_bytes(&mut bytes, &mut rng);
                bytes
            }
            _ => {
                let mut tree = trees[rng.below(trees.len())].clone();
                for _ in 0..=rng.below(3) {
                    mutate_tree(&mut tree, &mut rng);
                }
                serde_json::to_vec(&tree).unwrap()
            }
        };
        total += 1;
        if check(&input) {
            decoded += 1;
        }
    }
    // The structural mutations must exercise the success path too, not only rejections.
    assert!(decoded > total / 50, "only {decoded} of {total} inputs decoded");
}

/// Inputs the fast path skips over without building values (unknown attributes and data
/// fields) must still be refused exactly when the general path refuses them.
#[test]
fn skipped_values_decode_alike_on_both_paths() {
    let odd = [
        "1e400",
        "-1e400",
        "123456789012345678901234567890",
        "18446744073709551616",
        "\"\\ud800\"",
        "\"\\udc00x\"",
        "\"\\u00zz\"",
        "\"tab\there\"",
        "01",
        "-",
        "1.",
        "[1,]",
        "{\"a\":1,}",
        "nul",
        "[[[[[[[[[[1]]]]]]]]]]",
        "{\"k\":{\"k\":{\"k\":[]}}}",
        "1E400",
        "0.5e400",
        "1e5",
        "\"\\\\u\"",
        "\"\\u0041\"",
        // serde_json's raw-value marker as a first key: the tree reads the string as JSON
        // (or refuses the object); plain and escaped, valid and not.
        "{\"$serde_json::private::RawValue\":0}",
        "{\"$serde_json::private::RawValue\":\"{\\\"x\\\":1}\"}",
        "{\"$serde_json::private::RawValue\":\"5\",\"more\":1}",
        "{\"$serde_json::private::RawValu\\u0065\":\"[\"}",
        "{\"a\":1,\"$serde_json::private::RawValue\":0}",
    ];
    let long = "9".repeat(400);
    let deep: Vec<String> = (125..=129).map(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n))).collect();
    let odd = odd.into_iter().chain([long.as_str()]).chain(deep.iter().map(String::as_str));
    // The marker as the first key of `data` itself, the real fields after it.
    check(CHORIA_STARTUP.replacen("\"data\":{", "\"data\":{\"$serde_json::private::RawValue\":\"1\",", 1).as_bytes());
    for value in odd {
        for text in [
            CHORIA_STARTUP.replacen("\"specversion\"", &format!("\"extra\":{value},\"specversion\""), 1),
            CHORIA_STARTUP.replacen("\"version\":\"1.2.3\"", &format!("\"version\":\"1.2.3\",\"x\":{value}"), 1),
            CHORIA_STARTUP.replacen("\"1.0\"", value, 1),
            // First key of `data`, before the real fields.
            CHORIA_STARTUP.replacen("\"data\":{", &format!("\"data\":{{\"x\":{value},"), 1),
        ] {
            check(text.as_bytes());
        }
    }
}

/// The fast path reads `data` typed when `type` precedes it and raw otherwise: every order
/// and shape of the two decodes as the general path decodes it.
#[test]
fn data_before_or_after_type_decodes_alike_on_both_paths() {
    for (ty, record) in samples() {
        let encoded = String::from_utf8(record.encode()).unwrap();
        let tree: Value = serde_json::from_str(&encoded).unwrap();
        let data = serde_json::to_string(&tree["data"]).unwrap();
        let without_data = encoded.replacen(&format!(",\"data\":{data}"), "", 1);
        assert_ne!(without_data, encoded, "{ty}: data is not where it was expected");
        let body = without_data.strip_prefix('{').unwrap();
        let data_first = format!("{{\"data\":{data},{body}");
        assert_eq!(EventRecord::decode(data_first.as_bytes()).as_ref(), Ok(&record), "{ty}: data first");
        assert_eq!(EventRecord::decode(encoded.as_bytes()).as_ref(), Ok(&record), "{ty}: type first");
        let end = without_data.len() - 1;
        for odd in ["[]", "null", "\"x\"", "{}", "[{}]", "1"] {
            check(format!("{},\"data\":{odd}}}", &without_data[..end]).as_bytes());
        }
        for repeated in [format!(",\"type\":\"{ty}\""), format!(",\"data\":{data}"), ",\"id\":\"x\"".into()] {
            check(format!("{}{repeated}}}", &encoded[..encoded.len() - 1]).as_bytes());
        }
        check(encoded.replacen("\"type\"", "\"typ\\u0065\"", 1).as_bytes());
    }
}
