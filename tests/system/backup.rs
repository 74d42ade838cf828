//! `chorus replay` then `chorus restore`, run as an operator runs them: a stream written out
//! and published into another store comes back with every message's subject, id and payload
//! bytes (CloudEvents, JSON strings, text, bytes that are not UTF-8, JSON with whitespace
//! around it), in order; restoring the same file again stores nothing twice.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::{Backbone, Message};
use chorus_platform::{ensure_platform_streams, BackboneSink, StreamLimits};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_testkit::conformance::read_all;

/// Runs `chorus ARGS`, which must succeed, and returns what it printed (it reports counts
/// on standard error).
fn chorus(args: &[&str]) -> String {
    let (ok, said) = crate::cli::chorus(args);
    assert!(ok, "chorus {args:?} failed: {said}");
    said
}

async fn open(data: &Path) -> Arc<dyn Backbone> {
    let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(data.join("streams")).unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_restore_gives_back_every_message_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("source"), dir.path().join("target"));
    let original = {
        let b = open(&source).await;
        let sim = Simulator::new(SimConfig::new(50), Arc::new(BackboneSink(b.clone()))).unwrap();
        sim.startup_storm().await.unwrap();
        let odd: [(&str, &[u8]); 5] = [
            ("json-string", br#""a JSON string""#),
            ("text", b"plain text, not JSON"),
            ("not-utf8", &[0xff, 0xfe, 0x00, 0x80, b'{']),
            ("padded", b"  {\"a\": 1}\n"),
            ("empty", b""),
        ];
        for (id, payload) in odd {
            b.publish(Message::new(id, "choria.lifecycle.event.alive.odd", payload)).await.unwrap();
        }
        sim.shutdown_all().await.unwrap();
        read_all(&*b, CHORUS_LIFECYCLE).await
    }; // the store is closed: the chorus processes below open it
    assert_eq!(original.len(), 105);

    let file = dir.path().join("lifecycle.jsonl");
    let (file_arg, source_arg, target_arg) =
        (file.to_str().unwrap(), source.to_str().unwrap(), target.to_str().unwrap());
    let said = chorus(&["replay", CHORUS_LIFECYCLE, "--data", source_arg, "--out", file_arg]);
    assert!(said.contains("105 events of CHORUS_LIFECYCLE"), "{said}");
    let said = chorus(&["restore", file_arg, "--data", target_arg]);
    assert!(said.contains("105 events restored, 0 already present"), "{said}");
    let said = chorus(&["restore", file_arg, "--data", target_arg]);
    assert!(said.contains("0 events restored, 105 already present"), "a second restore stores nothing: {said}");

    let restored = read_all(&*open(&target).await, CHORUS_LIFECYCLE).await;
    let shape = |m: &chorus_backbone::StoredMessage| (m.sequence, m.subject.clone(), m.id.clone(), m.payload.clone());
    assert_eq!(restored.iter().map(shape).collect::<Vec<_>>(), original.iter().map(shape).collect::<Vec<_>>());
}

/// A Choria lifecycle event as go-choria publishes it: its own JSON, no `Nats-Msg-Id`.
fn choria_alive(identity: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "protocol": "io.choria.lifecycle.v1.alive",
        "id": "2Qm3pE8Sb0OMhzQyPqcyBsLvnYh",
        "identity": identity,
        "component": "server",
        "timestamp": 1_764_500_000,
        "version": "0.29.4",
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_restore_replay_on_nats_is_byte_identical_for_every_kind_of_message() {
    use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
    use chorus_testkit::nats::NatsServer;

    let (source, target) = (NatsServer::start().unwrap(), NatsServer::start().unwrap());
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([source.url()])).await.unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    // Chorus-published events (with ids)...
    let sim = Simulator::new(SimConfig::new(20), Arc::new(BackboneSink(b.clone()))).unwrap();
    sim.startup_storm().await.unwrap();
    // ...and what other publishers store: no id, one event twice, odd payloads, headers.
    let js = async_nats::jetstream::new(async_nats::connect(source.url()).await.unwrap());
    let subject = "choria.lifecycle.event.alive.server";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    headers.append("X-Choria", "one");
    headers.append("X-Choria", "two");
    let odd: [&[u8]; 5] =
        [br#""a JSON string""#, &[0xff, 0xfe, 0x00, 0x80, b'{'], b"  {\"a\": 1}\n", b"", b"plain text"];
    let alive = choria_alive("choria-1.example.net");
    for payload in [&alive[..], &alive[..]].into_iter().chain(odd) {
        js.publish(subject, Bytes::copy_from_slice(payload)).await.unwrap().await.unwrap();
    }
    js.publish_with_headers(subject, headers, Bytes::from_static(b"{\"with\":\"headers\"}"))
        .await
        .unwrap()
        .await
        .unwrap();
    sim.shutdown_all().await.unwrap();
    let stored = read_all(&*b, CHORUS_LIFECYCLE).await;
    assert_eq!(stored.len(), 48, "20 startups, 20 shutdowns, 8 from other publishers");
    assert_eq!(stored.iter().filter(|m| m.id.is_empty()).count(), 8);

    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first.jsonl"), dir.path().join("second.jsonl"));
    let (first_arg, second_arg) = (first.to_str().unwrap(), second.to_str().unwrap());
    let (source_url, target_url) = (source.url(), target.url());
    chorus(&["replay", CHORUS_LIFECYCLE, "--nats", &source_url, "--out", first_arg]);
    let said = chorus(&["restore", first_arg, "--nats", &target_url]);
    assert!(said.contains("48 events restored, 0 already present"), "{said}");
    let said = chorus(&["restore", first_arg, "--nats", &target_url]);
    assert!(said.contains("0 events restored, 48 already present"), "ids derived where none existed: {said}");
    chorus(&["replay", CHORUS_LIFECYCLE, "--nats", &target_url, "--out", second_arg]);
    let (a, z) = (std::fs::read(&first).unwrap(), std::fs::read(&second).unwrap());
    let (a_text, z_text) = (String::from_utf8_lossy(&a), String::from_utf8_lossy(&z));
    for (i, (x, y)) in a_text.lines().zip(z_text.lines()).enumerate() {
        assert_eq!(x, y, "line {} differs", i + 1);
    }
    assert!(a == z, "replay, restore, replay: the same bytes");

    // The restored stream holds the same payload bytes, subjects and headers (plus the
    // original store time), and the two copies of the Choria event stay two.
    let t: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([target.url()])).await.unwrap());
    let restored = read_all(&*t, CHORUS_LIFECYCLE).await;
    assert_eq!(restored.len(), stored.len());
    for (r, s) in restored.iter().zip(&stored) {
        assert_eq!((&r.subject, &r.payload), (&s.subject, &s.payload));
        let original: Vec<_> =
            r.headers.iter().filter(|(n, _)| n != chorus_backbone::backup::STORED_TIME_HEADER).cloned().collect();
        assert_eq!(original, s.headers);
    }
    assert_eq!(restored.iter().filter(|m| m.payload[..] == alive[..]).count(), 2);
}
