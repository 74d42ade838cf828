//! Views built by replaying streams (`chorus_consumers::projection`), on the embedded store and
//! on a real nats-server:
//!
//! * a view built in increments, with restarts between them, equals a rebuild from the first
//!   sequence, both in a fresh store and in place (`--rebuild`);
//! * a projector killed with SIGKILL mid-stream and restarted applies every event exactly once;
//! * malformed events go to the dead-letter stream with the reason and their origin, and the
//!   projector keeps going.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, Message, ReplayOptions};
use chorus_consumers::inventory::{Inventory, NodeFilter, Status, StatusPolicy, VIEW_NAME};
use chorus_consumers::projection::{ProjectorOptions, Store};
use chorus_platform::deadletter::DeadLetter;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_platform::{to_message, BackboneSink};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_schemas::lifecycle::{Alive, Provisioned, Shutdown, Upgraded};
use chorus_schemas::subject::{CHORUS_DEADLETTER, CHORUS_LIFECYCLE};
use chorus_schemas::EventRecord;
use chorus_testkit::conformance::read_all;
use chorus_testkit::nats::NatsServer;
use chrono::{DateTime, Utc};

/// Guards against a hang (a failing test must not wait for the nextest kill); never a speed
/// assertion.
const HANG: Duration = Duration::from_secs(120);

async fn nats_backbone(server: &NatsServer) -> Arc<dyn Backbone> {
    Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap())
}

/// A simulator of `nodes` nodes whose alive events all fall in slot 0 (interval 1 s).
fn simulator(b: &Arc<dyn Backbone>, nodes: usize, prefix: &str) -> Simulator {
    let mut config = SimConfig::new(nodes);
    config.alive_interval = Duration::from_secs(1);
    config.prefix = prefix.into();
    Simulator::new(config, Arc::new(BackboneSink(b.clone()))).unwrap()
}

async fn last_sequence(b: &dyn Backbone) -> u64 {
    b.stream_info(CHORUS_LIFECYCLE).await.unwrap().last_sequence
}

async fn publish(b: &dyn Backbone, records: Vec<EventRecord>) {
    let messages = records.iter().map(|r| to_message(r).unwrap()).collect();
    b.publish_batch(messages).await.unwrap();
}

/// Upgrades, shutdowns, provisioning, a stale alive (older than the node's shutdown) and
/// malformed messages for some simulated nodes.
async fn publish_mixed(b: &dyn Backbone, sim: &Simulator, round: usize) -> usize {
    let ids: Vec<String> = sim.nodes().iter().map(|n| n.identity.to_string()).collect();
    let mut records = Vec::new();
    for id in ids.iter().skip(round).step_by(7) {
        records.push(EventRecord::new(Upgraded::new(id, "server", "0.29.4", format!("0.30.{round}")), 1));
    }
    for id in ids.iter().skip(round + 1).step_by(11) {
        records.push(EventRecord::new(Shutdown::new(id, "server"), 1));
        let mut stale = Alive::new(id, "server", "0.1.0", Some(1));
        stale.timestamp -= 3600;
        records.push(EventRecord::new(stale, 1));
    }
    // Nodes seen in provisioning mode, then provisioned (the provisioned event names its
    // sender, so the node keeps the component it last announced).
    for id in ids.iter().skip(round + 2).step_by(13) {
        records.push(EventRecord::new(Alive::new(id, "provision_mode_server", "0.29.4", Some(300)), 1));
        records.push(EventRecord::new(Provisioned::new(id, "provisioner"), 1));
    }
    publish(b, records).await;
    let subject = "choria.lifecycle.event.alive.server";
    let bad = vec![
        Message::new(format!("bad-{round}-json"), subject, &b"{\"truncated"[..]),
        Message::new(
            format!("bad-{round}-type"),
            subject,
            &br#"{"specversion":"1.0","id":"x","source":"io.choria.lifecycle","type":"io.choria.lifecycle.v9.alive"}"#
                [..],
        ),
    ];
    let n = bad.len();
    b.publish_batch(bad).await.unwrap();
    n
}

/// Opens the view store at `path`, applies what the stream holds, and closes it again: a
/// restart of the consumer process.
async fn catch_up_once(b: &Arc<dyn Backbone>, path: &Path, max_batch: usize) -> u64 {
    let store = Store::open(path).unwrap();
    let mut p = Inventory::projector(b.clone(), &store)
        .unwrap()
        .with_options(ProjectorOptions { max_batch, ..Default::default() });
    tokio::time::timeout(HANG, p.catch_up()).await.expect("catch-up hung").unwrap().checkpoint
}

/// Runs a following projector while `publish` adds events, stops it once it has applied
/// everything, and closes the store.
async fn follow_while<F: std::future::Future<Output = ()>>(b: &Arc<dyn Backbone>, path: &Path, publish: F) {
    let store = Store::open(path).unwrap();
    let mut p = Inventory::projector(b.clone(), &store)
        .unwrap()
        .with_options(ProjectorOptions { max_batch: 64, ..Default::default() });
    let progress = p.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = p
            .run(async {
                stopped.await.ok();
            })
            .await;
        drop(p);
        r
    });
    publish.await;
    let last = last_sequence(&**b).await;
    tokio::time::timeout(HANG, progress.wait_for(last)).await.expect("projector did not catch up");
    stop.send(()).unwrap();
    let stats = task.await.unwrap().unwrap();
    assert_eq!(stats.checkpoint, last);
    drop(store);
}

fn inventory_picture(store: &Store, now: DateTime<Utc>) -> (String, usize, BTreeMap<Vec<u8>, Vec<u8>>) {
    let inv = Inventory::open(store, StatusPolicy::default()).unwrap();
    let summary = inv.summary(now).unwrap();
    let listed = inv.list(&NodeFilter::default(), now).unwrap().len();
    let dump = store.state(VIEW_NAME).unwrap().dump().unwrap();
    (serde_json::to_string(&summary).unwrap(), listed, dump)
}

/// Builds the inventory in increments (catch-ups and following runs, restarting between
/// them, with events published while a projector follows), then checks it against rebuilds.
async fn rebuild_equals_incremental(b: Arc<dyn Backbone>) {
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views");
    let sim = simulator(&b, 1_500, "inc");
    let mut dead = 0;

    sim.startup_storm().await.unwrap();
    assert_eq!(catch_up_once(&b, &path, 100).await, last_sequence(&*b).await);

    sim.alive_slot(0).await.unwrap();
    dead += publish_mixed(&*b, &sim, 0).await;
    assert_eq!(catch_up_once(&b, &path, 7).await, last_sequence(&*b).await);

    follow_while(&b, &path, async {
        for round in 1..3 {
            sim.alive_slot(0).await.unwrap();
            dead += publish_mixed(&*b, &sim, round).await;
        }
    })
    .await;

    sim.alive_slot(0).await.unwrap();
    dead += publish_mixed(&*b, &sim, 3).await;
    let last = last_sequence(&*b).await;
    assert_eq!(catch_up_once(&b, &path, 1_000).await, last);
    // Nothing new: a restart applies nothing and keeps the checkpoint.
    assert_eq!(catch_up_once(&b, &path, 1_000).await, last);

    let now = Utc::now();
    let incremental = {
        let store = Store::open(&path).unwrap();
        let state = store.state(VIEW_NAME).unwrap();
        assert_eq!(state.checkpoint().unwrap(), last);
        assert_eq!(state.dead_letters().unwrap(), dead as u64, "every malformed message counted once");
        let picture = inventory_picture(&store, now);
        let inv = Inventory::open(&store, StatusPolicy::default()).unwrap();
        let s = inv.summary(now).unwrap();
        assert_eq!(s.total, 1_500);
        assert!(s.status.shutdown > 0 && s.status.alive > 0, "{:?}", s.status);
        assert!(s.versions["server"].keys().any(|v| v.starts_with("0.30.")), "{:?}", s.versions);
        assert!(s.versions.contains_key("provision_mode_server"), "{:?}", s.versions);
        picture
    };

    // A rebuild in a fresh store, in one catch-up.
    let fresh = dir.path().join("fresh");
    assert_eq!(catch_up_once(&b, &fresh, 2_000).await, last);
    let rebuilt = inventory_picture(&Store::open(&fresh).unwrap(), now);
    assert_eq!(rebuilt.0, incremental.0, "summaries differ");
    assert_eq!(rebuilt.1, incremental.1);
    assert!(rebuilt.2 == incremental.2, "the rebuilt view differs from the incremental one");

    // A rebuild in place (`chorus inventory --rebuild`).
    {
        let store = Store::open(&path).unwrap();
        let mut p = Inventory::projector(b.clone(), &store).unwrap();
        p.rebuild().unwrap();
        assert_eq!(p.state().checkpoint().unwrap(), 0);
        assert_eq!(tokio::time::timeout(HANG, p.catch_up()).await.unwrap().unwrap().checkpoint, last);
        drop(p);
        let again = inventory_picture(&store, now);
        assert!(again.2 == incremental.2, "the view rebuilt in place differs from the incremental one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_view_equals_incremental_view_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("bb")).unwrap());
    rebuild_equals_incremental(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_view_equals_incremental_view_nats() {
    let server = NatsServer::start().unwrap();
    rebuild_equals_incremental(nats_backbone(&server).await).await;
}

/// Runs `projection-runner` with `args`, returning its committed sequences as they are printed.
fn spawn_runner(
    args: &[String],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>, std::thread::JoinHandle<()>) {
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_projection-runner")).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let (rx, reader) = chorus_testkit::child::whole_lines(child.stdout.take().unwrap());
    (child, rx, reader)
}

fn runner_args(source: &[String], state: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = source.to_vec();
    args.extend(["--state".to_string(), state.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs the runner to the end of the stream and returns its final checkpoint.
fn run_to_end(source: &[String], state: &Path) -> u64 {
    let (mut child, rx, reader) = spawn_runner(&runner_args(source, state, &["--exit-at-end"]));
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "projection-runner failed: {status}");
    let done = rx.try_iter().filter_map(|l| l.strip_prefix("DONE ").map(|s| s.parse::<u64>().unwrap())).last();
    done.expect("runner printed DONE")
}

/// The committed state of the runner's counting view.
fn counting_state(path: &Path) -> (u64, BTreeMap<Vec<u8>, Vec<u8>>) {
    let store = Store::open(path).unwrap();
    let state = store.state("counting").unwrap();
    (state.checkpoint().unwrap(), state.dump().unwrap())
}

/// The runner is killed with SIGKILL three times mid-stream and restarted; afterwards every
/// event of the stream is applied exactly once and the view equals a rebuild.
fn kill_9_mid_stream(source: Vec<String>, ids: Vec<String>, last: u64, work: &Path) {
    let state = work.join("state");
    let events = ids.len() as u64;
    let mut durable = 0;
    for round in 1..=3u64 {
        // Snapshots every 20 ms (not the default second, in which the runner would get
        // through most of the stream), so the kill lands mid-stream with state in memory
        // that no snapshot holds yet.
        let (mut child, rx, reader) =
            spawn_runner(&runner_args(&source, &state, &["--max-batch", "300", "--snapshot-every-ms", "20"]));
        let target = durable + events / 5;
        let mut seen = 0;
        while seen < target {
            match rx.recv_timeout(HANG) {
                Ok(line) => {
                    if let Some(n) = line.strip_prefix("COMMITTED ") {
                        seen = n.parse().unwrap();
                    }
                }
                Err(e) => panic!("round {round}: runner stalled at {seen}: {e}"),
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        for line in rx.try_iter() {
            if let Some(n) = line.strip_prefix("COMMITTED ") {
                seen = seen.max(n.parse().unwrap());
            }
        }
        assert!(seen < last, "round {round}: the runner finished ({seen} of {last}) before it was killed");
        let (checkpoint, dump) = counting_state(&state);
        assert!(checkpoint >= seen, "round {round}: committed {seen} (flushed) but the store holds {checkpoint}");
        assert!(checkpoint > durable, "round {round}: no progress");
        let total = dump.get(&b"total"[..]).map(|v| u64::from_be_bytes(v[..].try_into().unwrap())).unwrap_or(0);
        assert_eq!(total, checkpoint, "round {round}: applied count agrees with the checkpoint");
        durable = checkpoint;
    }
    assert_eq!(run_to_end(&source, &state), last);

    let (checkpoint, dump) = counting_state(&state);
    assert_eq!(checkpoint, last);
    let mut applied = BTreeSet::new();
    for (k, v) in &dump {
        if let Some(id) = k.strip_prefix(&b"applied/"[..]) {
            let id = String::from_utf8(id.to_vec()).unwrap();
            let n = u64::from_be_bytes(v[..].try_into().unwrap());
            assert_eq!(n, 1, "event {id} applied {n} times");
            applied.insert(id);
        }
    }
    let expected: BTreeSet<String> = ids.into_iter().collect();
    assert_eq!(applied.len(), expected.len(), "every event applied");
    assert!(applied == expected, "applied ids are the stream's ids");
    assert_eq!(dump[&b"total"[..]], events.to_be_bytes().to_vec());

    let fresh = work.join("rebuilt");
    assert_eq!(run_to_end(&source, &fresh), last);
    assert!(counting_state(&fresh).1 == dump, "the view after kills equals a rebuild");
}

/// 20,000 simulated nodes: startup + 3 alive rounds = 80,000 events.
async fn preload(b: &Arc<dyn Backbone>) -> (Vec<String>, u64) {
    ensure_platform_streams(&**b, &StreamLimits::default()).await.unwrap();
    let sim = simulator(b, 20_000, "kill");
    sim.startup_storm().await.unwrap();
    for _ in 0..3 {
        sim.alive_slot(0).await.unwrap();
    }
    let stored = read_all(&**b, CHORUS_LIFECYCLE).await;
    assert_eq!(stored.len(), 80_000);
    (stored.into_iter().map(|m| m.id).collect(), last_sequence(&**b).await)
}

#[test]
fn kill_9_of_a_projector_applies_every_event_once_nats() {
    let server = NatsServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ids, last) = rt.block_on(async { preload(&nats_backbone(&server).await).await });
    kill_9_mid_stream(vec!["--nats".into(), server.url()], ids, last, work.path());
}

#[test]
fn kill_9_of_a_projector_applies_every_event_once_embedded() {
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("backbone");
    let (ids, last) = {
        // Its own runtime, dropped before the runner opens the store (sled locks it).
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(&path).unwrap());
            preload(&b).await
        })
    };
    kill_9_mid_stream(vec!["--embedded".into(), path.display().to_string()], ids, last, work.path());
}

/// Malformed messages between valid events, published while the projector follows the
/// stream: each lands on `chorus.deadletter.inventory` with its reason, origin stream and
/// sequence; every valid event around them is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_dead_lettered_and_the_projector_keeps_going() {
    let server = NatsServer::start().unwrap();
    let b = nats_backbone(&server).await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("views")).unwrap();
    let mut p = Inventory::projector(b.clone(), &store).unwrap();
    let progress = p.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        p.run(async {
            stopped.await.ok();
        })
        .await
    });

    let subject = "choria.lifecycle.event.alive.server";
    let good =
        |i: usize| to_message(&EventRecord::new(Alive::new(format!("node{i}"), "server", "1.0", Some(60)), 1)).unwrap();
    let mismatched = {
        // A well-formed CloudEvent whose subject is not the node identity in its data.
        let mut v: serde_json::Value = serde_json::from_slice(&good(99).payload).unwrap();
        v["subject"] = "someone.else".into();
        serde_json::to_vec(&v).unwrap()
    };
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-not-json", b"\x00\xffnot json".to_vec(), "not_json"),
        ("bad-array", b"[1,2,3]".to_vec(), "not_an_object"),
        (
            "bad-unknown-type",
            br#"{"specversion":"1.0","id":"u","source":"io.choria.lifecycle","type":"io.example.v1.thing"}"#.to_vec(),
            "unknown_type",
        ),
        ("bad-subject", mismatched, "subject_mismatch"),
        ("bad-legacy", br#"{"protocol":"io.choria.lifecycle.v1.alive","identity":""}"#.to_vec(), "invalid_data"),
    ];
    let mut expected = BTreeMap::new();
    for (i, (id, payload, code)) in bad.iter().enumerate() {
        b.publish(good(i)).await.unwrap();
        let ack = b.publish(Message::new(*id, subject, payload.clone())).await.unwrap();
        expected.insert(ack.sequence, (*id, *code));
        // The projector passes it and applies what follows.
        b.publish(good(100 + i)).await.unwrap();
        let last = last_sequence(&*b).await;
        tokio::time::timeout(HANG, progress.wait_for(last)).await.expect("the projector stopped at a malformed event");
    }
    stop.send(()).unwrap();
    let stats = task.await.unwrap().unwrap();
    let last = last_sequence(&*b).await;
    assert_eq!((stats.checkpoint, stats.applied, stats.dead_lettered), (last, 10, bad.len() as u64));
    assert_eq!(progress.snapshot().dead_lettered, bad.len() as u64);
    let state = store.state(VIEW_NAME).unwrap();
    assert_eq!(state.dead_letters().unwrap(), bad.len() as u64);

    let letters = read_all(&*b, CHORUS_DEADLETTER).await;
    assert_eq!(letters.len(), bad.len());
    for m in &letters {
        assert_eq!(m.subject, "chorus.deadletter.inventory");
        let l = DeadLetter::from_message(m).unwrap();
        let (id, code) = expected[&l.sequence];
        assert_eq!((l.origin.as_str(), l.stream.as_str(), l.event_id.as_str()), ("inventory", CHORUS_LIFECYCLE, id));
        assert_eq!(l.code, code, "{}: {}", id, l.reason);
        assert!(!l.reason.is_empty());
        assert_eq!(l.subject, subject);
        assert!(l.payload.is_some() || l.payload_hex.is_some());
    }
    let inv = Inventory::open(&store, StatusPolicy::default()).unwrap();
    let nodes = inv.list(&NodeFilter::default(), Utc::now()).unwrap();
    assert_eq!(nodes.len(), 10, "every valid event applied");
    assert!(nodes.iter().all(|n| n.status == Status::Alive));

    // Restarting does not dead-letter them again.
    drop(state);
    drop(inv);
    let mut p = Inventory::projector(b.clone(), &store).unwrap();
    assert_eq!(p.catch_up().await.unwrap().dead_lettered, 0);
    let replayed = b.replay(CHORUS_DEADLETTER, ReplayOptions::default()).await.unwrap();
    use futures::StreamExt;
    assert_eq!(replayed.count().await, bad.len());
}
