//! `chorus bench views`.
//!
//! One stream of lifecycle events from the simulator (a startup storm, then alive rounds of
//! every node), read in the same run on the same server: the raw baseline, the faster of
//! async-nats's two ordered consumers (pull and push) reading and dropping every message,
//! and the inventory projection (replay, decode, apply, atomic sled commit with the
//! checkpoint, flush). The ratio is what the framework costs over just reading. The embedded store is measured the same way,
//! with its raw replay as the baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, consumer::push, consumer::DeliverPolicy};
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_consumers::inventory::{Inventory, StatusPolicy};
use chorus_consumers::projection::{Projector, ProjectorOptions, RunStats, Store, Txn, View, ViewError};
use chorus_platform::{ensure_platform_streams, BackboneSink, StreamLimits};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_schemas::EventRecord;
use futures::{Stream, StreamExt};

use super::{median_sample, print_table, CpuMeter, Row, Sample};

#[derive(clap::Args)]
pub struct Args {
    /// Lifecycle events in the stream (one startup per node, then alive rounds).
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Simulated nodes.
    #[arg(long, default_value_t = 50_000)]
    nodes: usize,
    /// Most events per projection commit.
    #[arg(long, default_value_t = ProjectorOptions::default().max_batch)]
    max_batch: usize,
    #[command(flatten)]
    common: super::CommonArgs,
}

/// Fills `CHORUS_LIFECYCLE` of `b` with `args.events` simulated lifecycle events.
async fn preload(b: &Arc<dyn Backbone>, args: &Args) -> anyhow::Result<u64> {
    preload_lifecycle(b, args.events, args.nodes).await
}

/// Fills `CHORUS_LIFECYCLE` of `b` with `events` lifecycle events of `nodes` simulated nodes:
/// a startup storm, then alive rounds of every node. Returns the messages stored.
pub(crate) async fn preload_lifecycle(b: &Arc<dyn Backbone>, events: usize, nodes: usize) -> anyhow::Result<u64> {
    ensure_platform_streams(&**b, &StreamLimits::default()).await?;
    let nodes = nodes.min(events).max(1);
    let mut config = SimConfig::new(nodes);
    // Every node's alive slot is second 0, so each alive round is one event per node.
    config.alive_interval = Duration::from_secs(1);
    let sim = Simulator::new(config, Arc::new(BackboneSink(b.clone())))?;
    sim.startup_storm().await?;
    let mut stored = nodes;
    while stored < events {
        stored += sim.alive_slot(0).await?.events;
    }
    Ok(b.stream_info(CHORUS_LIFECYCLE).await?.messages)
}

/// A view that applies nothing: what the framework costs by itself (replay, decode, commit of
/// the checkpoint, flush), separating it from what the inventory's per-node writes cost.
struct Noop;

impl View for Noop {
    fn name(&self) -> &str {
        "noop"
    }

    fn apply(&mut self, _: u64, _: &EventRecord, _: &mut Txn<'_>) -> Result<(), ViewError> {
        Ok(())
    }
}

async fn project_noop(b: &Arc<dyn Backbone>, args: &Args) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("views"))?;
    let mut p = Projector::new(b.clone(), CHORUS_LIFECYCLE, &store, Noop)?
        .with_options(ProjectorOptions { max_batch: args.max_batch, ..Default::default() });
    let started = Instant::now();
    p.catch_up().await?;
    Ok(started.elapsed())
}

/// The inventory projection over the whole stream into a fresh on-disk store.
async fn project(b: &Arc<dyn Backbone>, args: &Args, expect_nodes: u64) -> anyhow::Result<(Duration, RunStats)> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("views"))?;
    let mut p = Inventory::projector(b.clone(), &store)?
        .with_options(ProjectorOptions { max_batch: args.max_batch, ..Default::default() });
    let started = Instant::now();
    let stats = p.catch_up().await?;
    let took = started.elapsed();
    let total = Inventory::open(&store, StatusPolicy::default())?.summary(chrono::Utc::now())?.total;
    anyhow::ensure!(total == expect_nodes, "inventory holds {total} nodes, expected {expect_nodes}");
    Ok((took, stats))
}

/// The Chorus backbone's replay alone (what a projection reads through), dropping each message,
/// or with `decode`, decoding and validating each event too (the least any projection that
/// reads typed events does; no view, no store).
pub(super) async fn chorus_replay(b: &Arc<dyn Backbone>, n: u64, decode: bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut replay = b.replay(CHORUS_LIFECYCLE, Default::default()).await?;
    let mut read = 0;
    while let Some(m) = replay.next().await {
        let m = m?;
        if decode {
            std::hint::black_box(EventRecord::decode(&m.payload)?);
        }
        read += 1;
    }
    anyhow::ensure!(read == n, "replay read {read} of {n}");
    Ok(started.elapsed())
}

/// A raw baseline: async-nats's ordered pull consumer (the form its documentation leads
/// with) reading every message of the stream and dropping it.
async fn raw_ordered(js: &jetstream::Context, n: u64) -> anyhow::Result<Duration> {
    let stream = js.get_stream(CHORUS_LIFECYCLE).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig { deliver_policy: DeliverPolicy::All, ..Default::default() })
        .await?;
    let started = Instant::now();
    read_and_drop(consumer.messages().await?, n).await?;
    Ok(started.elapsed())
}

/// Reads `n` messages from a raw consumer and drops each.
async fn read_and_drop<M, E>(messages: impl Stream<Item = Result<M, E>>, n: u64) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::pin!(messages);
    for _ in 0..n {
        drop(messages.next().await.context("ordered consumer ended")??);
    }
    Ok(())
}

/// The other raw baseline: async-nats's ordered push consumer (flow control, heartbeats, no
/// acks: what Go's ordered consumer and a mirror use) reading and dropping every message.
async fn raw_ordered_push(js: &jetstream::Context, n: u64) -> anyhow::Result<Duration> {
    let stream = js.get_stream(CHORUS_LIFECYCLE).await?;
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    read_and_drop(consumer.messages().await?, n).await?;
    Ok(started.elapsed())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (server, url) = super::nats_url(args.common.nats.as_deref())?;
    let meter = CpuMeter::with_server(server.as_ref());
    let config = NatsConfig::new([url.clone()]);
    let client = config.connect(None).await?;
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::from_client(client.clone(), &config));
    for (name, _) in chorus_schemas::subject::streams() {
        b.delete_stream(name).await.ok();
    }
    let n = preload(&b, &args).await?;
    let nodes = args.nodes.min(args.events).max(1) as u64;
    let bytes = b.stream_info(CHORUS_LIFECYCLE).await?.bytes;
    println!(
        "# chorus bench views: {n} lifecycle events of {nodes} simulated nodes ({} bytes on average)",
        bytes / n.max(1)
    );

    let js = jetstream::new(client);
    let mut raw = Vec::new();
    let mut raw_push = Vec::new();
    let mut replay = Vec::new();
    let mut decoded = Vec::new();
    let mut noop = Vec::new();
    let mut projected = Vec::new();
    let mut last_stats = RunStats::default();
    for round in 0..args.common.rounds.max(1) {
        raw.push(meter.sample(raw_ordered(&js, n)).await?);
        raw_push.push(meter.sample(raw_ordered_push(&js, n)).await?);
        replay.push(meter.sample(chorus_replay(&b, n, false)).await?);
        decoded.push(meter.sample(chorus_replay(&b, n, true)).await?);
        noop.push(meter.sample(project_noop(&b, &args)).await?);
        let mut stats = RunStats::default();
        projected.push(
            meter
                .sample(async {
                    let (took, s) = project(&b, &args, nodes).await?;
                    stats = s;
                    Ok(took)
                })
                .await?,
        );
        last_stats = stats;
        eprintln!("round {} done", round + 1);
    }
    let n = n as usize;
    let pull = Row::of("raw async-nats ordered pull consumer (read and drop)", n, median_sample(raw), None);
    let push = Row::of("raw async-nats ordered push consumer (read and drop)", n, median_sample(raw_push), None);
    // The baseline is the faster of the two raw readers in this run.
    let (raw, other) = if push.rate() > pull.rate() { (push, pull) } else { (pull, push) };
    let raw = Row { name: format!("{} — baseline, the faster raw reader", raw.name), ..raw };
    let other = Row { baseline: Some(raw.rate()), ..other };
    let base = Some(raw.rate());
    let replay = Row::of("chorus backbone replay (read and drop)", n, median_sample(replay), base);
    let decoded = Row::of("chorus backbone replay + decode (no view, no store)", n, median_sample(decoded), base);
    let noop = Row::of(
        "chorus projection, no-op view (replay, decode, commit, snapshot + flush)",
        n,
        median_sample(noop),
        base,
    );
    let proj = Row::of(
        "chorus inventory projection (replay, decode, apply, commit, snapshot + flush)",
        n,
        median_sample(projected),
        base,
    );
    let ratio = proj.rate() / raw.rate();
    let noop_ratio = noop.rate() / decoded.rate();
    print_table(
        &format!(
            "Inventory projection vs raw consume on JetStream (same stream, median of {} rounds)",
            args.common.rounds.max(1)
        ),
        &[raw, other, replay, decoded, noop, proj],
    );
    println!(
        "\ninventory projection / raw read-and-drop: **{ratio:.2}** (goal ≥ 0.8, stretch 0.9); {} commits \
         ({:.0} events each on average), {} snapshots, reading {}",
        last_stats.batches,
        n as f64 / last_stats.batches.max(1) as f64,
        last_stats.snapshots,
        if last_stats.read_ahead { "ahead on its own task" } else { "on the projector's task" }
    );
    println!("no-op view / replay + decode: **{noop_ratio:.2}** (goal ≥ 0.9)");

    if !args.common.no_embedded {
        let dir = tempfile::tempdir()?;
        let embedded: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("bench"))?);
        let n = preload(&embedded, &args).await? as usize;
        let before = meter.read();
        let started = Instant::now();
        let mut replay = embedded.replay(CHORUS_LIFECYCLE, Default::default()).await?;
        let mut read = 0;
        while let Some(m) = replay.next().await {
            m?;
            read += 1;
        }
        anyhow::ensure!(read == n, "embedded replay read {read} of {n}");
        let took = started.elapsed();
        let raw =
            Row::of("embedded replay (read and drop)", n, Sample { took, cpu: meter.read().since(&before) }, None);
        let mut stats = RunStats::default();
        let sample = meter
            .sample(async {
                let (took, s) = project(&embedded, &args, nodes).await?;
                stats = s;
                Ok(took)
            })
            .await?;
        let proj = Row::of("chorus inventory projection from the embedded store", n, sample, Some(raw.rate()));
        print_table("Inventory projection from the embedded store (sled)", &[raw, proj]);
        println!(
            "\n{} commits ({:.0} events each on average), {} snapshots",
            stats.batches,
            n as f64 / stats.batches.max(1) as f64,
            stats.snapshots
        );
    }
    Ok(())
}
