//! Hostile and malformed input: every case is an `Err` naming the problem, never a panic.

use serde_json::{json, Value};

use super::samples::*;
use crate::envelope::{DecodeError, EventRecord, MAX_EVENT_BYTES};

fn err(bytes: &[u8]) -> DecodeError {
    match EventRecord::decode(bytes) {
        Ok(record) => panic!("decoded {:?} from {:?}", record, String::from_utf8_lossy(&bytes[..bytes.len().min(300)])),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(e.to_string().len() < 1024, "error message not bounded: {} bytes", e.to_string().len());
            e
        }
    }
}

/// Choria's startup example with `edit` applied.
fn startup_with(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut wire: Value = serde_json::from_str(CHORIA_STARTUP).unwrap();
    edit(&mut wire);
    serde_json::to_vec(&wire).unwrap()
}

/// The sample of `ty` with `edit` applied.
fn sample_with(ty: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let record = samples().into_iter().find(|(t, _)| *t == ty).unwrap().1;
    let mut wire: Value = serde_json::from_slice(&record.encode()).unwrap();
    edit(&mut wire);
    serde_json::to_vec(&wire).unwrap()
}

fn remove(key: &'static str) -> impl FnOnce(&mut Value) {
    move |w| {
        w.as_object_mut().unwrap().remove(key);
    }
}

fn set(key: &'static str, value: Value) -> impl FnOnce(&mut Value) {
    move |w| w[key] = value
}

fn set_data(key: &'static str, value: Value) -> impl FnOnce(&mut Value) {
    move |w| w["data"][key] = value
}

#[test]
fn not_json() {
    for input in
        [&b""[..], b"{", b"{\"specversion\":", b"nul", b"\xff\xfe{}", b"{\"a\":1,}", b"{'a':1}", b"\"\\ud800\""]
    {
        assert_eq!(err(input).code(), "not_json", "{input:?}");
    }
    assert_eq!(err(b"{\"a\":\"\\ud800\"}").code(), "not_json", "lone surrogate");
}

#[test]
fn not_an_object() {
    for input in [&b"[]"[..], b"42", b"\"x\"", b"null", b"true", b"[{\"specversion\":\"1.0\"}]"] {
        assert_eq!(err(input), DecodeError::NotAnObject, "{input:?}");
    }
}

#[test]
fn truncated_encodings_are_rejected() {
    for (ty, record) in samples() {
        let bytes = record.encode();
        for len in 0..bytes.len() {
            assert!(EventRecord::decode(&bytes[..len]).is_err(), "{ty} prefix {len}");
        }
    }
}

#[test]
fn missing_attributes() {
    assert_eq!(err(b"{}"), DecodeError::MissingAttribute("specversion"));
    for name in ["specversion", "id", "source", "type", "data"] {
        assert_eq!(err(&startup_with(remove(name))), DecodeError::MissingAttribute(name), "{name}");
        assert_eq!(err(&startup_with(set(name, Value::Null))), DecodeError::MissingAttribute(name), "{name}: null");
    }
    // A bare document that is not a Choria lifecycle document is not an event at all.
    let bare = br#"{"protocol":"io.choria.machine.v1.transition","identity":"n1"}"#;
    assert_eq!(err(bare), DecodeError::MissingAttribute("specversion"));
}

#[test]
fn invalid_attributes() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("specversion", startup_with(set("specversion", json!("0.3")))),
        ("specversion", startup_with(set("specversion", json!(1.0)))),
        ("id", startup_with(set("id", json!("")))),
        ("id", startup_with(set("id", json!(5)))),
        ("source", startup_with(set("source", json!("io.choria.machine")))),
        ("source", startup_with(set("source", json!({})))),
        ("type", startup_with(set("type", json!(["x"])))),
        ("type", startup_with(set("type", json!("")))),
        ("subject", startup_with(set("subject", json!(5)))),
        ("datacontenttype", startup_with(set("datacontenttype", json!("text/plain")))),
        ("datacontenttype", startup_with(set("datacontenttype", json!(false)))),
        ("time", startup_with(set("time", json!("yesterday")))),
        ("time", startup_with(set("time", json!(1535106973)))),
        ("time", startup_with(set("time", json!("0000-01-01T00:00:00+01:00")))),
        ("time", startup_with(set("time", json!("9999-12-31T23:59:59-01:00")))),
        ("site", startup_with(set("site", json!(5)))),
        ("data", startup_with(set("data", json!("{\"protocol\":\"x\"}")))),
        ("data", startup_with(set("data", json!([1])))),
        (
            "data_base64",
            startup_with(|w| {
                w.as_object_mut().unwrap().remove("data");
                w["data_base64"] = json!("e30=");
            }),
        ),
    ];
    for (attribute, input) in cases {
        match err(&input) {
            DecodeError::InvalidAttribute { attribute: a, .. } => assert_eq!(a, attribute),
            other => panic!("{attribute}: {other:?}"),
        }
    }
}

#[test]
fn unknown_types() {
    for ty in [
        // A watcher type go-choria does not have (yet).
        "io.choria.machine.watcher.teleport.v1.state",
        "com.example.thing",
        "io.choria.lifecycle.v1.reboot",
        "IO.CHORIA.LIFECYCLE.V1.STARTUP",
    ] {
        assert_eq!(err(&startup_with(set("type", json!(ty)))), DecodeError::UnknownType(ty.into()));
    }
    let legacy = CHORIA_LEGACY_SHUTDOWN.replace("v1.shutdown", "v1.reboot");
    assert_eq!(err(legacy.as_bytes()).code(), "unknown_type");
    let legacy = CHORIA_LEGACY_SHUTDOWN.replace("io.choria.lifecycle.v1.shutdown", "choria:lifecycle:reboot:1");
    assert_eq!(err(legacy.as_bytes()).code(), "unknown_type");
    // A hostile, huge type is clipped in the error.
    let huge = "x".repeat(500_000);
    match err(&startup_with(set("type", json!(huge)))) {
        DecodeError::UnknownType(t) => assert!(t.len() < 200),
        other => panic!("{other:?}"),
    }
}

#[test]
fn data_that_does_not_match_its_type() {
    let e = err(&startup_with(set_data("timestamp", json!("x"))));
    assert_eq!(e.code(), "invalid_data");
    let text = e.to_string();
    assert!(
        text.starts_with("data does not match type io.choria.lifecycle.v1.startup: timestamp: invalid type: string"),
        "{text}"
    );

    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "io.choria.lifecycle.v1.startup",
            ".",
            startup_with(|w| {
                w["data"].as_object_mut().unwrap().remove("version");
            }),
        ),
        ("io.choria.lifecycle.v1.startup", "identity", startup_with(set_data("identity", json!(null)))),
        ("io.choria.lifecycle.v1.startup", "identity", startup_with(set_data("identity", json!("")))),
        ("io.choria.lifecycle.v1.startup", "timestamp", startup_with(set_data("timestamp", json!(1.5)))),
        ("io.choria.lifecycle.v1.startup", "timestamp", startup_with(set_data("timestamp", json!(u64::MAX)))),
        (
            "io.choria.lifecycle.v1.alive",
            "interval",
            sample_with("io.choria.lifecycle.v1.alive", set_data("interval", json!(-1))),
        ),
        (
            "io.choria.lifecycle.v1.governor",
            "event_type",
            sample_with("io.choria.lifecycle.v1.governor", set_data("event_type", json!("bogus"))),
        ),
        (
            "io.choria.lifecycle.v1.governor",
            "governor",
            sample_with("io.choria.lifecycle.v1.governor", set_data("governor", json!(""))),
        ),
        (
            "io.choria.lifecycle.v1.governor",
            "sequence",
            sample_with("io.choria.lifecycle.v1.governor", set_data("sequence", json!(-3))),
        ),
        (
            "io.choria.machine.watcher.exec.v1.state",
            "type",
            sample_with("io.choria.machine.watcher.exec.v1.state", |w| {
                // A file watcher's document under the exec type.
                w["data"]["type"] = json!("file");
                w["data"]["path"] = json!("/x");
            }),
        ),
        (
            "io.choria.machine.watcher.exec.v1.state",
            "previous_run_time",
            sample_with("io.choria.machine.watcher.exec.v1.state", set_data("previous_run_time", json!("1s"))),
        ),
        (
            "io.choria.machine.watcher.timer.v1.state",
            "timer",
            sample_with("io.choria.machine.watcher.timer.v1.state", set_data("timer", json!(null))),
        ),
        ("io.choria.rpc.v1.request", "data", sample_with("io.choria.rpc.v1.request", set_data("data", json!([1, 2])))),
        (
            "io.choria.rpc.v1.request",
            "filter.fact[0].operator",
            sample_with("io.choria.rpc.v1.request", |w| {
                w["data"]["filter"]["fact"][0]["operator"] = json!(7);
            }),
        ),
        (
            "io.choria.rpc.v1.request",
            "senderid",
            sample_with("io.choria.rpc.v1.request", set_data("senderid", json!(""))),
        ),
        (
            "io.choria.rpc.v1.reply",
            "statuscode",
            sample_with("io.choria.rpc.v1.reply", set_data("statuscode", json!(9))),
        ),
        (
            "io.choria.rpc.v1.reply",
            "authorized",
            sample_with("io.choria.rpc.v1.reply", set_data("authorized", json!("yes"))),
        ),
        (
            "io.choria.signer.v1.signature_audit",
            "action",
            sample_with("io.choria.signer.v1.signature_audit", set_data("action", json!("maybe"))),
        ),
        (
            "io.choria.signer.v1.signature_audit",
            "request",
            sample_with("io.choria.signer.v1.signature_audit", set_data("request", json!("not json"))),
        ),
        (
            "io.choria.signer.v1.signature_audit",
            "signer",
            sample_with("io.choria.signer.v1.signature_audit", set_data("signer", json!(""))),
        ),
    ];
    for (ty, path, input) in cases {
        match err(&input) {
            DecodeError::InvalidData { ty: t, path: p, message } => {
                assert_eq!((t, p.as_str()), (ty, path), "{message}");
            }
            other => panic!("{ty} {path}: {other:?}"),
        }
    }
}

#[test]
fn mismatches() {
    let e = err(&startup_with(set_data("protocol", json!("io.choria.lifecycle.v1.alive"))));
    assert_eq!(
        e,
        DecodeError::TypeMismatch {
            ty: "io.choria.lifecycle.v1.startup",
            protocol: "io.choria.lifecycle.v1.alive".into()
        }
    );
    let e = err(&sample_with("io.choria.rpc.v1.reply", set_data("protocol", json!("io.choria.rpc.v1.request"))));
    assert_eq!(e.code(), "type_mismatch");
    assert_eq!(err(&startup_with(set("id", json!("other")))).code(), "id_mismatch");
    assert_eq!(err(&startup_with(set("subject", json!("someone.else")))).code(), "subject_mismatch");
    assert_eq!(
        err(&sample_with("io.choria.rpc.v1.request", set("subject", json!("node1.example.net")))).code(),
        "subject_mismatch"
    );
}

#[test]
fn bad_seq() {
    for seq in [
        json!(-1),
        json!(1.5),
        json!(1e3),
        json!("abc"),
        json!(""),
        json!("-1"),
        json!("+1"),
        json!(" 1"),
        json!(true),
        json!([1]),
        json!({}),
        json!("99999999999999999999999"),
    ] {
        assert_eq!(err(&startup_with(set("seq", seq.clone()))).code(), "bad_seq", "{seq}");
    }
    // Numbers JSON allows but u64 cannot hold, written as raw text.
    for raw in ["18446744073709551616", "-0.0", "1e400", "12345678901234567890123"] {
        let text = CHORIA_STARTUP.replacen("{\"specversion\"", &format!("{{\"seq\":{raw},\"specversion\""), 1);
        let e = EventRecord::decode(text.as_bytes()).unwrap_err();
        assert!(matches!(e.code(), "bad_seq" | "not_json"), "{raw}: {e}");
    }
}

#[test]
fn legacy_documents_with_bad_fields() {
    let e = err(CHORIA_LEGACY_SHUTDOWN.replace("1575482338", "\"now\"").as_bytes());
    assert_eq!(e.code(), "invalid_data");
    let e = err(CHORIA_LEGACY_SHUTDOWN.replace("1575482338", "9223372036854775807").as_bytes());
    assert!(matches!(e, DecodeError::InvalidData { ref path, .. } if path == "timestamp"), "{e:?}");
    let e = err(CHORIA_LEGACY_SHUTDOWN.replace("cb6f1dbc-5a8b-4f5b-9f67-1b7d0a3a6c2e", "").as_bytes());
    assert!(matches!(e, DecodeError::InvalidData { ref path, .. } if path == "id"), "{e:?}");
    assert_eq!(err(br#"{"protocol":"io.choria.lifecycle.v1.startup"}"#).code(), "invalid_data");
    // The CloudEvents path refuses an absent time whose timestamp cannot be written either.
    let e = err(&startup_with(|w| {
        w.as_object_mut().unwrap().remove("time");
        w["data"]["timestamp"] = json!(i64::MIN);
    }));
    assert!(matches!(e, DecodeError::InvalidAttribute { attribute: "time", .. }), "{e:?}");
}

#[test]
fn oversize_input_is_refused_before_parsing() {
    let input = vec![b' '; MAX_EVENT_BYTES + 1];
    assert_eq!(err(&input), DecodeError::Oversize { size: MAX_EVENT_BYTES + 1, max: MAX_EVENT_BYTES });
    // Exactly at the limit is parsed (and here fails for another reason).
    let mut input = vec![b' '; MAX_EVENT_BYTES];
    input[0] = b'{';
    input[MAX_EVENT_BYTES - 1] = b'}';
    assert_eq!(err(&input).code(), "missing_attribute");
}

#[test]
fn huge_nesting_is_refused() {
    for depth in [129usize, 1_000, 100_000] {
        assert_eq!(err(&"[".repeat(depth).into_bytes()).code(), "not_json");
        assert_eq!(err("{\"a\":".repeat(depth).as_bytes()).code(), "not_json");
        let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let text =
            CHORIA_STARTUP.replacen("\"version\":\"1.2.3\"", &format!("\"version\":\"1.2.3\",\"x\":{nested}"), 1);
        assert_eq!(err(text.as_bytes()).code(), "not_json", "depth {depth}");
    }
}

#[test]
fn every_error_has_a_distinct_code() {
    let errors = [
        DecodeError::Oversize { size: 1, max: 0 },
        DecodeError::NotJson(String::new()),
        DecodeError::NotAnObject,
        DecodeError::MissingAttribute("id"),
        DecodeError::InvalidAttribute { attribute: "id", reason: String::new() },
        DecodeError::UnknownType(String::new()),
        DecodeError::InvalidData { ty: "t", path: String::new(), message: String::new() },
        DecodeError::TypeMismatch { ty: "t", protocol: String::new() },
        DecodeError::IdMismatch { id: String::new(), data_id: String::new() },
        DecodeError::SubjectMismatch { subject: String::new(), identity: String::new() },
        DecodeError::BadSeq(String::new()),
    ];
    let codes: std::collections::BTreeSet<_> = errors.iter().map(DecodeError::code).collect();
    assert_eq!(codes.len(), errors.len());
}
