//! `chorus replay` then `chorus restore`, run as an operator runs them: a stream written out
//! and published into another store comes back with every message's subject, id and payload
//! bytes (CloudEvents, JSON strings, text, bytes that are not UTF-8, JSON with whitespace
//! around it), in order; restoring the same file again stores nothing twice.

use std::path::Path;
use std::sync::Arc;

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
