//! Test helper: builds a counting view of `CHORUS_LIFECYCLE` that records, per event id, how
//! many times the event was applied (in the same atomic batch as the checkpoint). It prints
//! `COMMITTED <sequence>` after each flushed snapshot, so a test can kill it with SIGKILL
//! mid-stream, restart it, and check that every event ends up applied exactly once.
//!
//! Usage: `projection-runner (--nats URL | --embedded PATH) --state PATH [--exit-at-end]
//! [--max-batch N] [--snapshot-every-ms N]`. Without `--exit-at-end` it follows the stream
//! until killed; with it, it applies what is stored, prints `DONE <checkpoint>` and exits.

use std::io::Write;
use std::sync::Arc;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_consumers::projection::{Projector, ProjectorOptions, Store, Txn, View, ViewError};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_schemas::EventRecord;

/// Applications per event id (`applied/<id>`, u64 big-endian) and in total (`total`).
struct Counting;

fn bump(txn: &mut Txn<'_>, key: &[u8]) -> Result<(), ViewError> {
    let n = txn.get(key)?.map(|v| u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes"))).unwrap_or(0);
    txn.insert(key, &(n + 1).to_be_bytes()[..])
}

impl View for Counting {
    fn name(&self) -> &str {
        "counting"
    }

    fn apply(&mut self, _sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        bump(txn, format!("applied/{}", record.id).as_bytes())?;
        bump(txn, b"total")
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut nats = None;
    let mut embedded = None;
    let mut state = None;
    let mut exit_at_end = false;
    let mut max_batch = 500;
    let mut snapshot_every = ProjectorOptions::default().snapshot_every;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nats" => nats = args.next(),
            "--embedded" => embedded = args.next(),
            "--state" => state = args.next(),
            "--exit-at-end" => exit_at_end = true,
            "--max-batch" => max_batch = args.next().expect("--max-batch N").parse().expect("a number"),
            "--snapshot-every-ms" => {
                let ms = args.next().expect("--snapshot-every-ms N").parse().expect("a number");
                snapshot_every = std::time::Duration::from_millis(ms);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let backbone: Arc<dyn Backbone> = match (nats, embedded) {
        (Some(url), None) => {
            Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&url)).await.expect("connect"))
        }
        (None, Some(path)) => Arc::new(EmbeddedBackbone::open_path(path).expect("open embedded store")),
        _ => panic!("give --nats URL or --embedded PATH"),
    };
    let store = Store::open(state.expect("--state PATH")).expect("open view store");
    let mut projector = Projector::new(backbone, CHORUS_LIFECYCLE, &store, Counting)
        .expect("projector")
        .with_options(ProjectorOptions { max_batch, snapshot_every, ..Default::default() });
    let mut committed = projector.progress().subscribe();
    tokio::spawn(async move {
        while committed.changed().await.is_ok() {
            let seq = *committed.borrow_and_update();
            let mut out = std::io::stdout().lock();
            writeln!(out, "COMMITTED {seq}").unwrap();
            out.flush().unwrap();
        }
    });
    if exit_at_end {
        let stats = projector.catch_up().await.expect("catch up");
        println!("DONE {}", stats.checkpoint);
    } else {
        projector.run(std::future::pending()).await.expect("run");
    }
}
