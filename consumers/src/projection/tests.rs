use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::Message;
use chorus_backbone::{Backbone, ReplayOptions};
use chorus_platform::deadletter::DeadLetter;
use chorus_schemas::lifecycle::{Alive, Startup};
use chorus_schemas::EventRecord;
use futures::StreamExt;

/// Counts applications per event id and events per node.
struct Counting;

impl View for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn apply(&mut self, _seq: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        if record.subject == "reject.me" {
            return Err(ViewError::Reject("node is on the reject list".into()));
        }
        let key = format!("id/{}", record.id);
        let n: u64 = txn.get_json(key.as_bytes())?.unwrap_or(0);
        txn.insert_json(key.as_bytes(), &(n + 1))?;
        let key = format!("node/{}", record.subject);
        let n: u64 = txn.get_json(key.as_bytes())?.unwrap_or(0);
        txn.insert_json(key.as_bytes(), &(n + 1))
    }
}

async fn backbone() -> (tempfile::TempDir, Arc<dyn Backbone>) {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("bb")).unwrap());
    chorus_platform::ensure_platform_streams(&*b, &Default::default()).await.unwrap();
    (dir, b)
}

fn event(i: usize) -> Message {
    let r = if i.is_multiple_of(3) {
        EventRecord::new(Startup::new(format!("n{}", i % 7), "server", "1.0"), 1)
    } else {
        EventRecord::new(Alive::new(format!("n{}", i % 7), "server", "1.0", Some(60)), i as u64)
    };
    chorus_platform::to_message(&r).unwrap()
}

#[test]
fn txn_reads_its_own_writes_and_guards_reserved_keys() {
    let store = Store::temporary().unwrap();
    let state = store.state("v").unwrap();
    let mut txn = Txn::for_tests(&state);
    assert!(txn.get(b"a").unwrap().is_none());
    txn.insert(b"a", &b"1"[..]).unwrap();
    assert_eq!(txn.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    txn.remove(b"a").unwrap();
    assert!(txn.get(b"a").unwrap().is_none());
    txn.insert(b"b", &b"2"[..]).unwrap();
    assert!(matches!(txn.insert(b"\0checkpoint", &b"x"[..]), Err(ViewError::ReservedKey(_))));
    assert!(matches!(txn.insert(b"", &b"x"[..]), Err(ViewError::ReservedKey(_))));
    state.commit(txn.into_staged(), 9, 0);
    assert_eq!(state.checkpoint().unwrap(), 9);
    assert_eq!(state.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
    assert!(state.get(b"a").unwrap().is_none());
    let keys: Vec<_> = state.scan_prefix(b"").map(|kv| kv.unwrap().0.to_vec()).collect();
    assert_eq!(keys, vec![b"b".to_vec()], "framework keys are not view entries");
}

#[test]
fn reset_starts_an_empty_generation() {
    let store = Store::temporary().unwrap();
    let state = store.state("v").unwrap();
    let mut txn = Txn::for_tests(&state);
    txn.insert(b"k", &b"v"[..]).unwrap();
    state.commit(txn.into_staged(), 5, 1);
    assert_eq!(store.state("v").unwrap().checkpoint().unwrap(), 5);
    let fresh = store.reset("v").unwrap();
    assert_eq!((fresh.checkpoint().unwrap(), fresh.dead_letters().unwrap()), (0, 0));
    assert!(fresh.dump().unwrap().is_empty());
    assert!(store.state("v").unwrap().get(b"k").unwrap().is_none());
}

#[tokio::test]
async fn resumes_after_checkpoint_and_rebuild_gives_the_same_state() {
    let (_dir, b) = backbone().await;
    let store = Store::temporary().unwrap();
    let mut total = 0;
    for round in 0..4 {
        let batch: Vec<Message> = (total..total + 50 + round * 13).map(event).collect();
        total += batch.len();
        b.publish_batch(batch).await.unwrap();
        // A new projector each round: a restart.
        let mut p =
            Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap().with_options(ProjectorOptions {
                max_batch: 17,
                snapshot_every: std::time::Duration::from_secs([0, 3_600, 1][round % 3]),
                ..Default::default()
            });
        let stats = p.catch_up().await.unwrap();
        assert_eq!(stats.checkpoint, total as u64);
        assert_eq!(p.progress().snapshot().lag, 0);
    }
    let incremental = store.state("counting").unwrap();
    for (k, v) in incremental.dump().unwrap() {
        if k.starts_with(b"id/") {
            assert_eq!(v, b"1", "event {} applied once", String::from_utf8_lossy(&k));
        }
    }
    let incremental = incremental.dump().unwrap();
    let other = Store::temporary().unwrap();
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &other, Counting).unwrap();
    p.catch_up().await.unwrap();
    assert_eq!(p.state().dump().unwrap(), incremental);
    // And a rebuild in place.
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
    p.rebuild().unwrap();
    assert_eq!(p.state().checkpoint().unwrap(), 0);
    p.catch_up().await.unwrap();
    assert_eq!(p.state().dump().unwrap(), incremental);
}

#[tokio::test]
async fn malformed_and_rejected_events_are_dead_lettered_and_passed() {
    let (_dir, b) = backbone().await;
    let store = Store::temporary().unwrap();
    let subject = "choria.lifecycle.event.alive.server";
    let mut batch = vec![event(1), Message::new("bad-1", subject, &b"{not json"[..]), event(2)];
    let rejected = EventRecord::new(Alive::new("reject.me", "server", "1", None), 1);
    batch.push(chorus_platform::to_message(&rejected).unwrap());
    batch.push(Message::new("bad-2", subject, &br#"{"specversion":"1.0","id":"x","source":"s","type":"nope"}"#[..]));
    batch.push(event(4));
    b.publish_batch(batch).await.unwrap();
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
    let stats = p.catch_up().await.unwrap();
    assert_eq!((stats.applied, stats.dead_lettered, stats.checkpoint), (3, 3, 6));
    assert_eq!(p.state().dead_letters().unwrap(), 3);
    let letters: Vec<DeadLetter> = {
        let mut r = b.replay("CHORUS_DEADLETTER", ReplayOptions::default()).await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = r.next().await {
            let m = m.unwrap();
            assert_eq!(m.subject, "chorus.deadletter.counting");
            out.push(DeadLetter::from_message(&m).unwrap());
        }
        out
    };
    let summary: Vec<_> = letters.iter().map(|l| (l.sequence, l.code.as_str(), l.stream.as_str())).collect();
    assert_eq!(
        summary,
        vec![
            (2, "not_json", "CHORUS_LIFECYCLE"),
            (4, "rejected", "CHORUS_LIFECYCLE"),
            (5, "unknown_type", "CHORUS_LIFECYCLE")
        ]
    );
    assert!(letters[2].reason.contains("nope"), "{}", letters[2].reason);
    assert_eq!(letters[0].payload.as_deref(), Some("{not json"));
    // A restart does not dead-letter them again: the checkpoint is past them.
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
    assert_eq!(p.catch_up().await.unwrap(), RunStats { checkpoint: 6, ..Default::default() });
    assert_eq!(b.stream_info("CHORUS_DEADLETTER").await.unwrap().messages, 3);
}

#[tokio::test]
async fn with_a_verifier_unsigned_forged_and_misattributed_events_are_dead_lettered_and_passed() {
    use chorus_identity::{Credential, CredentialSpec, Issuers};
    use chorus_keys::{Algorithm, FileSigner, Signer as _};
    use chorus_schemas::signature::Verifier;
    let (_dir, b) = backbone().await;
    let store = Store::temporary().unwrap();
    let issuer = FileSigner::random(Algorithm::Ed25519);
    // A node key and credential per node, from the trusted issuer or from a stranger.
    let node = |identity: &str, issuer: &FileSigner| {
        let key = FileSigner::random(Algorithm::Ed25519);
        let spec = CredentialSpec::node(identity, key.public_key().clone(), std::time::Duration::from_secs(3600));
        let credential = Credential::issue(issuer, &spec, chrono::Utc::now().timestamp() - 60).unwrap();
        (key, credential.token().to_string())
    };
    let alive = |n: &str| EventRecord::new(Alive::new(n, "server", "1", None), 1);
    let sign = |r: EventRecord, (key, cred): &(FileSigner, String)| r.signed(key, Some(cred)).unwrap();
    let (n1, n2, n4) = (node("n1", &issuer), node("n2", &issuer), node("n4", &issuer));
    let mut forged = sign(alive("n2"), &n2);
    if let chorus_schemas::Event::Lifecycle(chorus_schemas::Lifecycle::Alive(a)) = &mut forged.data {
        a.version = "6.6.6".into();
    }
    let batch = [
        sign(alive("n1"), &n1),
        alive("n2"),
        forged,
        sign(alive("n3"), &node("n3", &FileSigner::random(Algorithm::Ed25519))),
        sign(alive("n4"), &n4),
        sign(alive("n5"), &n4),
    ];
    b.publish_batch(batch.iter().map(|r| chorus_platform::to_message(r).unwrap()).collect()).await.unwrap();
    let verifier = Arc::new(Verifier::new(Arc::new(Issuers::new().with(issuer.public_key().clone()))));
    let options = ProjectorOptions { verifier: Some(verifier), ..Default::default() };
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap().with_options(options);
    let stats = p.catch_up().await.unwrap();
    assert_eq!((stats.applied, stats.dead_lettered, stats.checkpoint), (2, 4, 6));
    let mut r = b.replay("CHORUS_DEADLETTER", ReplayOptions::default()).await.unwrap();
    let mut summary = Vec::new();
    while let Some(m) = r.next().await {
        let l = DeadLetter::from_message(&m.unwrap()).unwrap();
        summary.push((l.sequence, l.code));
    }
    let expected = [(2, "unsigned"), (3, "bad_signature"), (4, "unknown_issuer"), (6, "wrong_identity")];
    assert_eq!(summary, expected.map(|(s, c)| (s, c.to_owned())));
}

#[tokio::test]
async fn run_follows_new_events_until_shutdown() {
    let (_dir, b) = backbone().await;
    let store = Store::temporary().unwrap();
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
    let progress = p.progress();
    let state = p.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        p.run(async {
            stopped.await.ok();
        })
        .await
    });
    b.publish_batch((0..10).map(event).collect()).await.unwrap();
    progress.wait_for(10).await;
    b.publish_batch((10..25).map(event).collect()).await.unwrap();
    progress.wait_for(25).await;
    assert_eq!(state.checkpoint().unwrap(), 25);
    stop.send(()).unwrap();
    let stats = task.await.unwrap().unwrap();
    assert_eq!((stats.applied, stats.checkpoint), (25, 25));
    assert_eq!(progress.snapshot().applied_sequence, 25);
}

#[tokio::test]
async fn view_names_must_be_subject_tokens() {
    struct Bad;
    impl View for Bad {
        fn name(&self) -> &str {
            "bad.name"
        }
        fn apply(&mut self, _: u64, _: &EventRecord, _: &mut Txn<'_>) -> Result<(), ViewError> {
            Ok(())
        }
    }
    let (_dir, b) = backbone().await;
    let store = Store::temporary().unwrap();
    assert!(matches!(Projector::new(b, "CHORUS_LIFECYCLE", &store, Bad), Err(ProjectionError::InvalidName { .. })));
}

/// The same CloudEvent stored under several message ids (as go-choria publishes, without
/// `Nats-Msg-Id`): the view applies it once, a changed copy is a dead-lettered conflict, and
/// a projector started later (restart) still knows the identities before its checkpoint.
#[tokio::test]
async fn an_event_is_applied_once_per_source_and_id_whoever_stores_it_and_however_often() {
    let (_dir, b) = backbone().await;
    let record = EventRecord::new(Alive::new("n1", "server", "1.0", Some(60)), 1);
    let payload = record.encode();
    // The same event id, another version: a changed copy.
    let changed = EventRecord::decode(
        String::from_utf8(payload.clone()).unwrap().replace(r#""version":"1.0""#, r#""version":"2.0""#).as_bytes(),
    )
    .unwrap();
    assert_eq!(changed.id, record.id);
    let copy =
        |n: usize, payload: Vec<u8>| Message::new(format!("copy-{n}"), "choria.lifecycle.event.alive.server", payload);
    b.publish_batch(vec![copy(1, payload.clone()), copy(2, payload.clone()), copy(3, changed.encode())]).await.unwrap();
    b.publish_batch((0..4).map(event).collect()).await.unwrap();

    let store = Store::temporary().unwrap();
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
    let stats = p.catch_up().await.unwrap();
    assert_eq!((stats.applied, stats.duplicates, stats.conflicts, stats.dead_lettered), (5, 1, 1, 1), "{stats:?}");
    let applied = |p: &Projector<Counting>| p.state().get_json::<u64>(format!("id/{}", record.id).as_bytes()).unwrap();
    assert_eq!(applied(&p), Some(1));
    let snapshot = p.progress().snapshot();
    assert_eq!((snapshot.duplicates, snapshot.conflicts), (1, 1));
    let letters: Vec<DeadLetter> = {
        let mut r = b.replay("CHORUS_DEADLETTER", ReplayOptions::default()).await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = r.next().await {
            out.push(serde_json::from_slice(&m.unwrap().payload).unwrap());
        }
        out
    };
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].code.as_str(), letters[0].sequence), ("conflict", 3));
    assert!(letters[0].reason.contains("applied at sequence 1"), "{}", letters[0].reason);

    // Restarted: the identities before the checkpoint are read again from the stream.
    drop(p);
    b.publish(copy(4, payload.clone())).await.unwrap();
    b.publish(copy(5, changed.encode())).await.unwrap();
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
    let stats = p.catch_up().await.unwrap();
    assert_eq!((stats.applied, stats.duplicates, stats.conflicts), (0, 1, 1), "{stats:?}");
    assert_eq!(applied(&p), Some(1));

    // A rebuild decides the same way.
    p.rebuild().unwrap();
    let stats = p.catch_up().await.unwrap();
    assert_eq!((stats.applied, stats.duplicates, stats.conflicts), (5, 2, 2), "{stats:?}");

    // With the check off, every copy is applied (what the stream's own dedupe alone gives).
    let off = ProjectorOptions { remember_events: 0, ..Default::default() };
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &Store::temporary().unwrap(), Counting)
        .unwrap()
        .with_options(off);
    p.catch_up().await.unwrap();
    assert_eq!(applied(&p), Some(5));
}

/// An event stamped years ahead is applied at the time the stream stored it, and counted.
#[tokio::test]
async fn an_event_from_the_future_is_applied_at_its_store_time() {
    let (_dir, b) = backbone().await;
    let mut future = EventRecord::new(Alive::new("n1", "server", "1.0", Some(60)), 1);
    future.time = chrono::Utc::now() + chrono::Duration::days(3650);
    let mut recent = EventRecord::new(Alive::new("n1", "server", "1.0", Some(60)), 2);
    recent.time = chrono::Utc::now() - chrono::Duration::seconds(10);
    b.publish_batch(vec![chorus_platform::to_message(&future).unwrap(), chorus_platform::to_message(&recent).unwrap()])
        .await
        .unwrap();

    /// Keeps the latest event time it was given.
    struct Latest;
    impl View for Latest {
        fn name(&self) -> &str {
            "latest"
        }
        fn apply(&mut self, _seq: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
            let latest: Option<chrono::DateTime<chrono::Utc>> = txn.get_json(b"latest")?;
            txn.insert_json(b"latest", &latest.map_or(record.time, |l| l.max(record.time)))
        }
    }
    let store = Store::temporary().unwrap();
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Latest).unwrap();
    p.catch_up().await.unwrap();
    let latest: chrono::DateTime<chrono::Utc> = p.state().get_json(b"latest").unwrap().unwrap();
    assert!(latest <= chrono::Utc::now(), "the future event was applied at its store time: {latest}");
    assert_eq!(p.progress().snapshot().clock_skewed, 1);
}

/// Applies nothing.
struct Noop;

impl View for Noop {
    fn name(&self) -> &str {
        "noop"
    }
    fn apply(&mut self, _: u64, _: &EventRecord, _: &mut Txn<'_>) -> Result<(), ViewError> {
        Ok(())
    }
}

/// Counting, slowly: applying costs more than reading.
struct SlowCounting;

impl View for SlowCounting {
    fn name(&self) -> &str {
        "slow_counting"
    }
    fn apply(&mut self, seq: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        // Busy work (no clock involved): far more than decoding an event costs.
        let mut x = seq;
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        std::hint::black_box(x);
        Counting.apply(seq, record, txn)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_moves_to_its_own_task_only_when_applying_costs_more() {
    let (_dir, b) = backbone().await;
    // Enough groups of events (256 each) for the projector to measure both before deciding.
    let events = 20_000;
    b.publish_batch((0..events).map(event).collect()).await.unwrap();
    let options = ProjectorOptions { max_batch: 2_000, remember_events: 0, ..Default::default() };
    let store = Store::temporary().unwrap();
    let mut light = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Noop).unwrap().with_options(options.clone());
    let light_stats = light.catch_up().await.unwrap();
    let mut slow =
        Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, SlowCounting).unwrap().with_options(options.clone());
    let slow_stats = slow.catch_up().await.unwrap();
    assert!(!light_stats.read_ahead, "a view that does nothing reads on the projector's task");
    assert!(slow_stats.read_ahead, "a costly view reads ahead, on a task of its own");
    // Either way every event is applied once.
    for stats in [&light_stats, &slow_stats] {
        assert_eq!((stats.applied, stats.checkpoint), (events as u64, events as u64));
    }
    let state = store.state("slow_counting").unwrap();
    for i in 0..7 {
        let n: u64 = state.get_json(format!("node/n{i}").as_bytes()).unwrap().unwrap();
        assert_eq!(n, (0..events).filter(|j| j % 7 == i).count() as u64, "n{i}");
    }
}

/// Counting, but failing (not rejecting) at one sequence.
struct FailingAt(u64);

impl View for FailingAt {
    fn name(&self) -> &str {
        "counting"
    }
    fn apply(&mut self, seq: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        if seq == self.0 {
            return Err(ViewError::Corrupt { key: "x".into(), reason: "the view broke".into() });
        }
        Counting.apply(seq, record, txn)
    }
}

/// Reads the view `name` as a new process would: from the snapshot on disk.
fn reopened(path: &std::path::Path, name: &str) -> (u64, u64, BTreeMap<Vec<u8>, Vec<u8>>) {
    let store = Store::open(path).unwrap();
    let state = store.state(name).unwrap();
    let counted = state.scan_json::<u64>(b"node/").map(Result::unwrap).sum();
    (state.checkpoint().unwrap(), counted, state.dump().unwrap())
}

#[tokio::test]
async fn snapshots_hold_the_state_at_their_checkpoint_and_a_failed_view_keeps_the_batches_before_it() {
    let (_dir, b) = backbone().await;
    b.publish_batch((0..300).map(event).collect()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views");
    // Batches of 10, snapshotted only when the run ends (or at the head of the stream).
    let options =
        ProjectorOptions { max_batch: 10, snapshot_every: std::time::Duration::from_secs(3_600), ..Default::default() };
    {
        let store = Store::open(&path).unwrap();
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, FailingAt(257))
            .unwrap()
            .with_options(options.clone());
        let err = p.catch_up().await.unwrap_err();
        assert!(matches!(err, ProjectionError::View { sequence: 257, .. }), "{err}");
        // The batches before the failed one are committed, and queries see them.
        let state = store.state("counting").unwrap();
        let checkpoint = state.checkpoint().unwrap();
        assert!((250..257).contains(&checkpoint), "{checkpoint}");
        let counted: u64 = state.scan_json::<u64>(b"node/").map(Result::unwrap).sum();
        assert_eq!(counted, checkpoint);
        assert!(p.progress().snapshot().applied_sequence == checkpoint, "reported once flushed");
    }
    // A new process reads the same state from the snapshot.
    let (checkpoint, counted, _) = reopened(&path, "counting");
    assert!((250..257).contains(&checkpoint));
    assert_eq!(counted, checkpoint, "the snapshot holds exactly the events up to its checkpoint");

    let store = Store::open(&path).unwrap();
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap().with_options(options);
    let stats = p.catch_up().await.unwrap();
    assert_eq!((stats.checkpoint, stats.applied), (300, 300 - checkpoint));
    assert!(stats.snapshots <= 2 && stats.batches >= 4, "{stats:?}");
    let state = store.state("counting").unwrap();
    let ids: Vec<u64> = state.scan_json(b"id/").map(Result::unwrap).collect();
    assert_eq!(ids.len(), 300);
    assert!(ids.iter().all(|n| *n == 1), "every event applied once");
    let dump = state.dump().unwrap();
    drop((p, state, store));
    let (checkpoint, counted, reread) = reopened(&path, "counting");
    assert_eq!((checkpoint, counted), (300, 300));
    assert!(reread == dump, "the snapshot reads back as the state it was taken of");
}

#[test]
fn a_store_with_one_key_per_entry_is_read_and_converted_by_the_next_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views");
    {
        // The layout before snapshots: one sled key per view key, in the generation's tree.
        let db = sled::open(&path).unwrap();
        let tree = db.open_tree("chorus/view/old/0").unwrap();
        for i in 0..50u64 {
            tree.insert(format!("k/{i:02}"), &i.to_be_bytes()[..]).unwrap();
        }
        tree.insert(super::CHECKPOINT_KEY, &50u64.to_be_bytes()[..]).unwrap();
        tree.insert(super::DEAD_LETTERS_KEY, &2u64.to_be_bytes()[..]).unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(&path).unwrap();
    let state = store.state("old").unwrap();
    assert_eq!((state.checkpoint().unwrap(), state.dead_letters().unwrap()), (50, 2));
    assert_eq!(state.get(b"k/07").unwrap().as_deref(), Some(&7u64.to_be_bytes()[..]));
    let before = state.dump().unwrap();
    assert_eq!(state.scan_prefix(b"k/").count(), 50);
    let mut txn = Txn::for_tests(&state);
    txn.insert(b"k/50", &50u64.to_be_bytes()[..]).unwrap();
    state.commit(txn.into_staged(), 51, 2);
    assert_eq!(state.snapshot().unwrap(), Some(51));
    let after = state.dump().unwrap();
    assert_eq!(after.len(), before.len() + 1);
    drop((state, store));
    let store = Store::open(&path).unwrap();
    let state = store.state("old").unwrap();
    assert!(state.dump().unwrap() == after, "read back from buckets alone");
    let raw = store.db().open_tree("chorus/view/old/0").unwrap();
    assert!(raw.get(b"k/07").unwrap().is_none(), "the old keys are gone");
}

#[tokio::test]
async fn a_view_whose_snapshot_cannot_be_read_is_rebuilt_from_the_stream() {
    let (_dir, b) = backbone().await;
    b.publish_batch((0..40).map(event).collect()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views");
    {
        let store = Store::open(&path).unwrap();
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
        assert_eq!(p.catch_up().await.unwrap().checkpoint, 40);
        // A bucket cut short on disk.
        let tree = store.db().open_tree("chorus/view/counting/0").unwrap();
        let (key, value) = tree.scan_prefix(b"\0bucket/").next().unwrap().unwrap();
        tree.insert(key, &value[..value.len() - 1]).unwrap();
        store.flush().await.unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert!(matches!(store.state("counting"), Err(ProjectionError::Corrupt(_))));
    let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
    let stats = p.catch_up().await.unwrap();
    assert_eq!((stats.checkpoint, stats.applied), (40, 40), "rebuilt from the first event");
    let ids: Vec<u64> = p.state().scan_json(b"id/").map(Result::unwrap).collect();
    assert_eq!(ids.len(), 40);
    assert!(ids.iter().all(|n| *n == 1));
}
