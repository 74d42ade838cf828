//! The checked-in schema files and fuzz seeds: regenerated and compared (rewritten with
//! `CHORUS_BLESS=1`), and the schemas exercised with the `jsonschema` validator.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::samples::*;
use crate::envelope::{Event, EventRecord};
use crate::schema::{event_schema, json_schemas, schema_file, ENVELOPE_SCHEMA_FILE, SCHEMA_BASE_URL};

fn bless() -> bool {
    std::env::var_os("CHORUS_BLESS").is_some_and(|v| v == "1")
}

fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("json")
}

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/decode_event")
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap() + "\n"
}

/// Compares `expected` (file name → content) with the `*.json` files of `dir`; with
/// CHORUS_BLESS=1 rewrites the directory instead.
fn check_dir(dir: &Path, expected: &[(String, String)], what: &str) {
    if bless() {
        // Replace files atomically: other tests read them concurrently.
        std::fs::create_dir_all(dir).unwrap();
        for (name, content) in expected {
            let temporary = dir.join(format!(".{name}.tmp"));
            std::fs::write(&temporary, content).unwrap();
            std::fs::rename(&temporary, dir.join(name)).unwrap();
        }
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap_or_default();
            if name.ends_with(".json") && !expected.iter().any(|(e, _)| *e == name) {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
        return;
    }
    let mut problems = Vec::new();
    for (name, content) in expected {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(found) if &found == content => {}
            Ok(_) => problems.push(format!("{name} differs")),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.ends_with(".json")).collect()
        })
        .unwrap_or_default();
    on_disk.retain(|n| !expected.iter().any(|(e, _)| e == n));
    for stale in on_disk {
        problems.push(format!("{stale} is not generated any more"));
    }
    assert!(
        problems.is_empty(),
        "{what} in {} are out of date ({}); run `CHORUS_BLESS=1 cargo test -p chorus-schemas` and commit the result",
        dir.display(),
        problems.join(", ")
    );
}

#[test]
fn checked_in_schemas_are_current() {
    let expected: Vec<(String, String)> = json_schemas().iter().map(|(n, s)| (n.clone(), pretty(s))).collect();
    assert_eq!(expected.len(), Event::TYPES.len() + 1);
    check_dir(&schema_dir(), &expected, "JSON Schemas");
}

/// Seeds for `fuzz/fuzz_targets/decode_event.rs`: every sample plus Choria's own encodings.
#[test]
fn checked_in_fuzz_seeds_are_current() {
    let mut expected: Vec<(String, String)> =
        samples().into_iter().map(|(ty, r)| (schema_file(ty), String::from_utf8(r.encode()).unwrap())).collect();
    for (name, text) in [
        ("choria-startup.json", CHORIA_STARTUP),
        ("choria-legacy-shutdown.json", CHORIA_LEGACY_SHUTDOWN),
        ("choria-transition.json", CHORIA_TRANSITION),
        ("choria-exec-state.json", CHORIA_EXEC_STATE),
    ] {
        expected.push((name.into(), text.into()));
    }
    for (name, content) in &expected {
        assert!(EventRecord::decode(content.as_bytes()).is_ok(), "seed {name} does not decode");
    }
    check_dir(&seed_dir(), &expected, "fuzz seeds");
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(schema_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn validator(name: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&load(name)).unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

#[test]
fn schema_ids_and_protocol_constants() {
    for ty in Event::TYPES {
        let schema = load(&schema_file(ty));
        assert_eq!(schema["$id"], format!("{SCHEMA_BASE_URL}{}", schema_file(ty)));
        assert_eq!(schema["title"], ty);
        assert_eq!(schema["properties"]["protocol"]["const"], ty);
        assert!(schema["description"].is_string(), "{ty} has no description");
        assert_eq!(Some(schema), event_schema(ty));
    }
    assert_eq!(load(ENVELOPE_SCHEMA_FILE)["$id"], format!("{SCHEMA_BASE_URL}{ENVELOPE_SCHEMA_FILE}"));
    assert_eq!(event_schema("io.choria.machine.watcher.teleport.v1.state"), None);
}

/// Encoded samples of every type (and Choria's own events) validate against the checked-in
/// files: the envelope against envelope.json, `data` against `<type>.json`.
#[test]
fn encoded_events_validate_against_checked_in_schemas() {
    let envelope = validator(ENVELOPE_SCHEMA_FILE);
    let mut encodings: Vec<Vec<u8>> = samples().into_iter().map(|(_, r)| r.encode()).collect();
    for text in [CHORIA_STARTUP, CHORIA_TRANSITION, CHORIA_EXEC_STATE] {
        encodings.push(text.as_bytes().to_vec());
    }
    for bytes in encodings {
        let wire: Value = serde_json::from_slice(&bytes).unwrap();
        let ty = wire["type"].as_str().unwrap().to_owned();
        assert_eq!(errors(&envelope, &wire), Vec::<String>::new(), "{ty} envelope");
        assert_eq!(errors(&validator(&schema_file(&ty)), &wire["data"]), Vec::<String>::new(), "{ty} data");
    }
}

/// A value of the wrong JSON type for a property.
fn wrong_type(value: &Value) -> Value {
    match value {
        Value::String(_) => json!(12345),
        Value::Number(_) => json!("not a number"),
        Value::Bool(_) => json!("true"),
        Value::Null => json!(1),
        Value::Array(_) | Value::Object(_) => json!("wrong"),
    }
}

/// Every field of every sample, given a value of the wrong type, fails the schema — and
/// decode rejects the same event, so schema and code agree.
#[test]
fn wrong_field_types_fail_schema_and_decode() {
    let envelope = validator(ENVELOPE_SCHEMA_FILE);
    for (ty, record) in samples() {
        let schema = validator(&schema_file(ty));
        let wire: Value = serde_json::from_slice(&record.encode()).unwrap();
        let data = wire["data"].as_object().unwrap();
        for (field, value) in data {
            let mut broken = wire.clone();
            broken["data"][field] = wrong_type(value);
            assert!(!schema.is_valid(&broken["data"]), "{ty}: schema accepts a wrong-typed {field}");
            assert!(
                EventRecord::decode(&serde_json::to_vec(&broken).unwrap()).is_err(),
                "{ty}: decode accepts a wrong-typed {field}"
            );
        }
        for attribute in
            ["specversion", "id", "type", "source", "datacontenttype", "subject", "time", "data", "seq", "site"]
        {
            let Some(value) = wire.get(attribute) else {
                continue;
            };
            let mut broken = wire.clone();
            broken[attribute] = wrong_type(value);
            assert!(!envelope.is_valid(&broken), "{ty}: envelope schema accepts a wrong-typed {attribute}");
            assert!(
                EventRecord::decode(&serde_json::to_vec(&broken).unwrap()).is_err(),
                "{ty}: decode accepts a wrong-typed {attribute}"
            );
        }
        // A type paired with another family's source fails both too.
        let mut broken = wire.clone();
        broken["source"] = json!(if ty.starts_with("io.choria.rpc") { "io.choria.aaa" } else { "io.choria.rpc" });
        assert!(!envelope.is_valid(&broken), "{ty}: envelope schema accepts a foreign source");
        assert!(EventRecord::decode(&serde_json::to_vec(&broken).unwrap()).is_err());
    }
}

#[test]
fn a_wrong_typed_startup_fails_validation() {
    let schema = validator("io.choria.lifecycle.v1.startup.json");
    let mut data: Value = serde_json::from_str::<Value>(CHORIA_STARTUP).unwrap()["data"].clone();
    assert!(schema.is_valid(&data));
    data["timestamp"] = json!("2018-08-24T10:36:13Z");
    let found = errors(&schema, &data);
    assert!(found.iter().any(|e| e.starts_with("/timestamp")), "{found:?}");
}

/// Empty strings: whatever the schema accepts, decode accepts (the schemas describe what
/// Chorus writes, decode is at least as lenient), and the fields decode insists on are
/// marked non-empty in the schema too.
#[test]
fn empty_strings_agree_between_schema_and_decode() {
    let mut rejected = std::collections::BTreeSet::new();
    for (ty, record) in samples() {
        let schema = validator(&schema_file(ty));
        let wire: Value = serde_json::from_slice(&record.encode()).unwrap();
        for (field, value) in wire["data"].as_object().unwrap() {
            if !value.is_string() {
                continue;
            }
            let mut edited = wire.clone();
            edited["data"][field] = json!("");
            let schema_ok = schema.is_valid(&edited["data"]);
            let decode_ok = EventRecord::decode(&serde_json::to_vec(&edited).unwrap()).is_ok();
            assert_eq!(schema_ok, decode_ok, "{ty}: empty {field}: schema {schema_ok}, decode {decode_ok}");
            if !decode_ok {
                rejected.insert(field.clone());
            }
        }
    }
    let rejected: Vec<_> = rejected.into_iter().collect();
    // (`action` and `event_type` are enums in the audit and governor documents.)
    assert_eq!(
        rejected,
        [
            "action",
            "event_type",
            "firing",
            "governor",
            "id",
            "identity",
            "outcome",
            "protocol",
            "reactor",
            "rule",
            "senderid",
            "signer",
            "type"
        ]
    );
}
