//! Round trips, Choria wire compatibility and subjects.

use serde_json::Value;

use super::samples::*;
use crate::envelope::{Event, EventKind, EventRecord};
use crate::lifecycle::{Alive, Lifecycle, LifecycleType, Startup};
use crate::machine::{ExecDetails, MachineInstance, WatcherDetails, WatcherState};
use crate::rpc::{JsonObject, RpcReply, RpcRequest};
use crate::{AuditAction, AuditRecord};

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn samples_cover_every_type_in_order() {
    let types: Vec<_> = samples().into_iter().map(|(t, _)| t).collect();
    assert_eq!(types, Event::TYPES);
}

#[test]
fn every_type_round_trips() {
    for (ty, record) in samples() {
        let bytes = record.encode();
        let decoded = EventRecord::decode(&bytes).unwrap_or_else(|e| panic!("{ty}: {e}"));
        assert_eq!(decoded, record, "{ty}");
        assert_eq!(decoded.encode(), bytes, "{ty}: re-encoding changed the bytes");
        // Through the SDK types as well.
        let via_sdk = EventRecord::try_from(cloudevents::Event::from(&record)).unwrap();
        assert_eq!(via_sdk, record, "{ty}");
    }
}

#[test]
fn envelope_carries_the_cloudevents_attributes() {
    for (ty, record) in samples() {
        let wire = json(&record.encode());
        assert_eq!(wire["specversion"], "1.0");
        assert_eq!(wire["type"], ty);
        assert_eq!(wire["data"]["protocol"], ty);
        assert_eq!(wire["id"], record.id.as_str());
        assert_eq!(wire["source"], record.data.source());
        assert_eq!(wire["subject"], record.data.identity());
        assert_eq!(wire["datacontenttype"], "application/json");
        assert_eq!(wire["time"], "2024-04-22T08:00:00Z");
        assert_eq!(wire["seq"], record.seq);
        match &record.site {
            Some(site) => assert_eq!(wire["site"], site.as_str()),
            None => assert!(wire.get("site").is_none()),
        }
        if let Event::Lifecycle(l) = &record.data {
            assert_eq!(wire["data"]["id"], l.id(), "lifecycle inner id is the event id");
        }
    }
}

#[test]
fn encoding_is_deterministic() {
    for (_, record) in samples() {
        let first = record.encode();
        for _ in 0..20 {
            assert_eq!(record.encode(), first);
        }
        // Core attributes first (in the SDK's order), then extensions sorted by name.
        let wire = json(&first);
        let keys: Vec<&str> = wire.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected =
            vec!["specversion", "id", "type", "source", "datacontenttype", "subject", "time", "data", "seq"];
        if record.site.is_some() {
            expected.push("site");
        }
        assert_eq!(keys, expected);
    }
}

#[test]
fn new_records_are_consistent() {
    let startup = Startup::new("n1.example.net", "server", "1.0.0");
    let record = EventRecord::new(startup.clone(), 1);
    assert_eq!(record.id, startup.id, "lifecycle envelope id is the inner id");
    assert_eq!(record.subject, "n1.example.net");
    assert_eq!(record.source, "io.choria.lifecycle");
    assert_eq!(record.time.timestamp(), startup.timestamp);
    assert_eq!(record.data.kind(), EventKind::Lifecycle);

    let request = RpcRequest::new("up=bob", "client1", "choria", "rpcutil", "ping", JsonObject::new());
    let a = EventRecord::new(request.clone(), 1);
    let b = EventRecord::new(request, 2);
    assert_ne!(a.id, b.id, "non-lifecycle records get fresh ids");
    assert_eq!(uuid::Uuid::parse_str(&a.id).unwrap().get_version_num(), 7);
    assert!(a.id < b.id, "UUIDv7 ids sort by creation");
    assert_eq!(a.subject, "client1");
}

#[test]
fn choria_exact_wire_example_decodes() {
    let record = EventRecord::decode(CHORIA_STARTUP.as_bytes()).unwrap();
    assert_eq!(record.id, "01e72410-d734-4611-9485-8c6a2dd2579b");
    assert_eq!(record.source, "io.choria.lifecycle");
    assert_eq!(record.subject, "ginkgo.example.net");
    assert_eq!(record.time.to_rfc3339(), "2018-08-24T10:36:13+00:00");
    assert_eq!(record.seq, 0);
    assert_eq!(record.site, None);
    let Event::Lifecycle(Lifecycle::Startup(s)) = &record.data else { panic!("{:?}", record.data) };
    assert_eq!(
        s,
        &Startup {
            protocol: "io.choria.lifecycle.v1.startup".into(),
            id: "01e72410-d734-4611-9485-8c6a2dd2579b".into(),
            identity: "ginkgo.example.net".into(),
            component: "ginkgo".into(),
            timestamp: 1535106973,
            version: "1.2.3".into(),
        }
    );
    assert_eq!(record.nats_subject().unwrap(), "choria.lifecycle.event.startup.ginkgo");
    // Chorus writes back the same document Choria wrote (seq 0 and no site are left off).
    assert_eq!(json(&record.encode()), json(CHORIA_STARTUP.as_bytes()));
}

#[test]
fn choria_machine_events_decode_and_re_encode_identically() {
    for text in [CHORIA_TRANSITION, CHORIA_EXEC_STATE] {
        let record = EventRecord::decode(text.as_bytes()).unwrap();
        assert_eq!(record.seq, 0);
        assert_eq!(json(&record.encode()), json(text.as_bytes()));
    }
    let exec = EventRecord::decode(CHORIA_EXEC_STATE.as_bytes()).unwrap();
    let Event::Watcher(w) = &exec.data else { panic!() };
    assert_eq!(w.id, "1234567890", "machine inner id is the instance id, not the event id");
    assert_eq!(
        w.details,
        WatcherDetails::Exec(ExecDetails {
            command: "/bin/sh".into(),
            previous_outcome: "success".into(),
            previous_run_time: 1_000_000_000
        })
    );
    assert_eq!(exec.nats_subject().unwrap(), "choria.machine.watcher.exec.state");
    let transition = EventRecord::decode(CHORIA_TRANSITION.as_bytes()).unwrap();
    assert_eq!(transition.nats_subject().unwrap(), "choria.machine.transition");
    assert_eq!(transition.data.kind(), EventKind::Transition);
}

#[test]
fn choria_legacy_lifecycle_documents_decode() {
    let record = EventRecord::decode(CHORIA_LEGACY_SHUTDOWN.as_bytes()).unwrap();
    assert_eq!(record.id, "cb6f1dbc-5a8b-4f5b-9f67-1b7d0a3a6c2e");
    assert_eq!(record.seq, 0);
    assert_eq!(record.subject, "dev1.devco.net");
    assert_eq!(record.time.timestamp(), 1575482338);
    assert_eq!(record.data.event_type(), "io.choria.lifecycle.v1.shutdown");

    // The pre-2019 protocol spelling is normalised.
    let legacy = CHORIA_LEGACY_SHUTDOWN.replace("io.choria.lifecycle.v1.shutdown", "choria:lifecycle:shutdown:1");
    let old = EventRecord::decode(legacy.as_bytes()).unwrap();
    assert_eq!(old, record);
    let Event::Lifecycle(l) = &old.data else { panic!() };
    assert_eq!(l.lifecycle_type(), LifecycleType::Shutdown);

    // ...also inside a CloudEvent.
    let wrapped = CHORIA_STARTUP.replacen(
        r#""data":{"protocol":"io.choria.lifecycle.v1.startup""#,
        r#""data":{"protocol":"choria:lifecycle:startup:1""#,
        1,
    );
    assert_eq!(
        EventRecord::decode(wrapped.as_bytes()).unwrap(),
        EventRecord::decode(CHORIA_STARTUP.as_bytes()).unwrap()
    );

    // Re-encoding a legacy document gives the CloudEvents form, which decodes to the same record.
    assert_eq!(EventRecord::decode(&record.encode()).unwrap(), record);
}

#[test]
fn optional_attributes_are_derived_when_absent() {
    let mut wire = json(CHORIA_STARTUP.as_bytes());
    let map = wire.as_object_mut().unwrap();
    map.remove("subject");
    map.remove("time");
    map.remove("datacontenttype");
    let record = EventRecord::decode(&serde_json::to_vec(&wire).unwrap()).unwrap();
    assert_eq!(record, EventRecord::decode(CHORIA_STARTUP.as_bytes()).unwrap());
}

#[test]
fn seq_and_site_extensions() {
    let base = json(CHORIA_STARTUP.as_bytes());
    for (seq, expect) in [
        (serde_json::json!(7), 7u64),
        (serde_json::json!("7"), 7),
        (serde_json::json!(u64::MAX), u64::MAX),
        (serde_json::json!(u64::MAX.to_string()), u64::MAX),
        (Value::Null, 0),
    ] {
        let mut wire = base.clone();
        wire["seq"] = seq;
        wire["site"] = "tokyo".into();
        let record = EventRecord::decode(&serde_json::to_vec(&wire).unwrap()).unwrap();
        assert_eq!((record.seq, record.site.as_deref()), (expect, Some("tokyo")));
        assert_eq!(EventRecord::decode(&record.encode()).unwrap(), record);
    }
    // Seq beyond i64 goes out as a string, and back in.
    let mut record = EventRecord::decode(CHORIA_STARTUP.as_bytes()).unwrap();
    record.seq = u64::MAX;
    assert_eq!(json(&record.encode())["seq"], u64::MAX.to_string());
    record.seq = i64::MAX as u64;
    assert_eq!(json(&record.encode())["seq"], i64::MAX);
    // Unknown extensions are ignored.
    let mut wire = base;
    wire["traceparent"] = "00-abc-def-01".into();
    assert!(EventRecord::decode(&serde_json::to_vec(&wire).unwrap()).is_ok());
}

#[test]
fn times_round_trip_exactly() {
    let base = json(CHORIA_STARTUP.as_bytes());
    for time in [
        "2018-08-24T10:36:13.123456789Z",
        "2018-08-24T12:36:13+02:00",
        "2016-12-31T23:59:60Z",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999999999Z",
    ] {
        let mut wire = base.clone();
        wire["time"] = time.into();
        let record = EventRecord::decode(&serde_json::to_vec(&wire).unwrap()).unwrap_or_else(|e| panic!("{time}: {e}"));
        assert_eq!(EventRecord::decode(&record.encode()).unwrap(), record, "{time}");
    }
}

#[test]
fn accessors() {
    let by_type: Vec<_> = samples().into_iter().map(|(_, r)| r).collect();
    let kinds: Vec<_> = by_type.iter().map(|r| r.data.kind()).collect();
    assert_eq!(kinds[..6], [EventKind::Lifecycle; 6]);
    assert_eq!(
        kinds[6..],
        [
            EventKind::Transition,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::Watcher,
            EventKind::RpcRequest,
            EventKind::RpcReply,
            EventKind::Audit,
            EventKind::Registration,
            EventKind::Reaction
        ]
    );
    assert_eq!(by_type[21].data.identity(), "client1.example.net");
    assert_eq!(by_type[22].data.identity(), "node1.example.net");
    assert_eq!(by_type[23].data.identity(), "aaa1.example.net");
    assert_eq!(by_type[24].data.identity(), "node1.example.net");
    assert_eq!(by_type[25].data.identity(), "reactor1");
    for r in &by_type {
        assert_eq!(r.data.timestamp() / 10, super::samples::T / 10);
        assert_eq!(r.subject, r.data.identity());
    }
}

#[test]
fn nats_subjects_of_samples() {
    let subjects: Vec<_> = samples().into_iter().map(|(_, r)| r.nats_subject().unwrap()).collect();
    assert_eq!(
        subjects,
        [
            "choria.lifecycle.event.startup.server",
            "choria.lifecycle.event.alive.server",
            "choria.lifecycle.event.shutdown.server",
            "choria.lifecycle.event.provisioned.provision_mode_server",
            "choria.lifecycle.event.upgraded.server",
            "choria.lifecycle.event.governor.CLI",
            "choria.machine.transition",
            "choria.machine.watcher.exec.state",
            "choria.machine.watcher.file.state",
            "choria.machine.watcher.schedule.state",
            "choria.machine.watcher.timer.state",
            "choria.machine.watcher.nagios.state",
            "choria.machine.watcher.kv.state",
            "choria.machine.watcher.expression.state",
            "choria.machine.watcher.metric.state",
            "choria.machine.watcher.archive.state",
            "choria.machine.watcher.machines.state",
            "choria.machine.watcher.plugins.state",
            "choria.machine.watcher.gossip.state",
            "choria.machine.watcher.httpswitch.state",
            "choria.machine.watcher.ccm_manifest.state",
            "chorus.rpc.request.choria.service",
            "chorus.rpc.reply.choria.service",
            "chorus.audit.deny.london",
            "choria.registration.node1.example.net",
            "chorus.reactor.succeeded.restart_nginx",
        ]
    );
}

#[test]
fn invalid_subject_tokens_are_typed_errors() {
    let record = EventRecord::new(Alive::new("n1", "web.prod", "1", None), 1);
    assert!(matches!(record.nats_subject(), Err(crate::SubjectError::InvalidToken { field: "component", .. })));
    let record = EventRecord::new(Alive::new("n1", "", "1", None), 1);
    assert_eq!(record.nats_subject(), Err(crate::SubjectError::Empty { field: "component" }));
    let audit = AuditRecord::new("aaa1", "", "up=bob", AuditAction::Allow, JsonObject::new());
    assert!(EventRecord::new(audit, 1).nats_subject().is_err());
    let req = RpcRequest::new("up=bob", "c1", "choria", "rpc util", "ping", JsonObject::new());
    assert!(EventRecord::new(RpcReply::new(&req, "n1", crate::StatusCode::Ok, JsonObject::new()), 1)
        .nats_subject()
        .is_err());
}

#[test]
fn watcher_constructor_sets_protocol_from_details() {
    let instance = MachineInstance { identity: "n1".into(), id: "i".into(), machine: "m".into(), version: "1".into() };
    let w = WatcherState::new(
        &instance,
        "w",
        WatcherDetails::Exec(ExecDetails {
            command: "c".into(),
            previous_outcome: "unknown".into(),
            previous_run_time: 0,
        }),
    );
    assert_eq!(w.protocol, "io.choria.machine.watcher.exec.v1.state");
    let wire = json(&EventRecord::new(w, 1).encode());
    assert_eq!(wire["data"]["type"], "exec");
}

#[test]
fn encode_writes_canonical_protocol() {
    let mut startup = Startup::new("n1", "server", "1");
    startup.protocol = "choria:lifecycle:startup:1".into();
    let record = EventRecord::new(startup, 1);
    let wire = json(&record.encode());
    assert_eq!(wire["data"]["protocol"], "io.choria.lifecycle.v1.startup");
    let Event::Lifecycle(l) = EventRecord::decode(&record.encode()).unwrap().data else { panic!() };
    assert_eq!(l.lifecycle_type(), LifecycleType::Startup);
}

#[test]
fn nesting_within_the_parser_limit_round_trips() {
    // 120 levels inside rpc data: the re-encoded document is exactly as deep as the input.
    let mut wire = json(&samples()[11].1.encode());
    let mut deep = Value::Null;
    for _ in 0..120 {
        deep = Value::Array(vec![deep]);
    }
    wire["data"]["data"]["deep"] = deep;
    let record = EventRecord::decode(&serde_json::to_vec(&wire).unwrap()).unwrap();
    assert_eq!(EventRecord::decode(&record.encode()).unwrap(), record);
}

#[test]
fn unwritable_timestamps_fall_back_to_now() {
    let mut startup = Startup::new("n1", "server", "1");
    startup.timestamp = i64::MAX;
    let record = EventRecord::new(startup, 1);
    assert!((record.time.timestamp() - chrono::Utc::now().timestamp()).abs() < 5);
    assert_eq!(EventRecord::decode(&record.encode()).unwrap(), record);
}

#[test]
fn the_direct_encoder_writes_what_the_sdk_writes() {
    let mut records: Vec<EventRecord> = samples().into_iter().map(|(_, r)| r).collect();
    for wire in [CHORIA_STARTUP, CHORIA_TRANSITION, CHORIA_EXEC_STATE, CHORIA_LEGACY_SHUTDOWN] {
        records.push(EventRecord::decode(wire.as_bytes()).unwrap());
    }
    let base = records.clone();
    for (n, mut r) in base.into_iter().enumerate() {
        r.site = Some(format!("site \"{n}\" ü\u{1}"));
        r.seq = if n % 2 == 0 { u64::MAX - n as u64 } else { 0 };
        r.time = chrono::DateTime::from_timestamp(1_713_772_800 + n as i64, (n as u32 * 123_456_789) % 1_000_000_000)
            .unwrap();
        r.signature = Some(crate::EventSignature {
            key_id: format!("key{n}"),
            sig: "c2lnbmF0dXJl".into(),
            credential: (n % 3 != 0).then(|| format!("cred.{n}")),
        });
        records.push(r);
    }
    for r in &records {
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            String::from_utf8(encoded_through_the_sdk(r)).unwrap(),
            "{r:?}"
        );
    }
}

/// [`EventRecord::encode`] the long way, as it was written before the direct encoder: the
/// SDK's CloudEvent as a JSON tree, the core attributes in the SDK's order, then the
/// extensions sorted by name.
fn encoded_through_the_sdk(record: &EventRecord) -> Vec<u8> {
    const CORE_ATTRIBUTES: [&str; 10] = [
        "specversion",
        "id",
        "type",
        "source",
        "datacontenttype",
        "dataschema",
        "subject",
        "time",
        "data",
        "data_base64",
    ];
    let Value::Object(map) = serde_json::to_value(record.to_cloudevent()).unwrap() else { panic!("not an object") };
    let mut core = serde_json::Map::new();
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
    serde_json::to_vec(&Value::Object(core)).unwrap()
}
