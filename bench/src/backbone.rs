//! `chorus bench backbone`.
//!
//! Same payloads, same server, one run: raw async-nats JetStream publish (pipelined, with
//! `Nats-Msg-Id`, as Chorus does) and pull-consume are the baseline for the Chorus JetStream
//! engine; the embedded store is measured with its group-commit durability (every acknowledged
//! event is on disk).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, ConsumerConfig, Message, StreamConfig};
use chorus_schemas::{lifecycle::Alive, EventRecord};
use futures::StreamExt;

use super::{median_sample, print_table, CpuMeter, Row, Sample};

#[derive(clap::Args)]
pub struct Args {
    /// Events per measurement.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per publish batch (Chorus) and per pull (consumers).
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Concurrent publishers for the embedded store.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    #[command(flatten)]
    common: super::CommonArgs,
}

/// Realistic payloads: encoded alive events of distinct nodes, as the fleet sends them.
pub fn payloads(n: usize) -> Vec<(String, Bytes)> {
    (0..n)
        .map(|i| {
            let identity = format!("node{:06}.example.net", i % 50_000);
            let ev = EventRecord::new(Alive::new(&identity, "server", "0.29.4", Some(1800)), (i / 50_000) as u64 + 1);
            (ev.id.clone(), Bytes::from(ev.encode()))
        })
        .collect()
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let events = payloads(args.events);
    let avg = events.iter().map(|(_, p)| p.len()).sum::<usize>() / events.len().max(1);
    println!("# chorus bench backbone: {} events of {} bytes on average", args.events, avg);

    let (server, url) = super::nats_url(args.common.nats.as_deref())?;
    let meter = CpuMeter::with_server(server.as_ref());
    let config = NatsConfig::new([url.clone()]);

    // Raw async-nats baseline and Chorus on JetStream, interleaved over several rounds on
    // fresh streams so machine noise hits both alike; the median round is reported.
    let client = config.connect(None).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(config.max_ack_inflight)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let chorus: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::from_client(client.clone(), &config));
    let mut raw_pub = Vec::new();
    let mut raw_con = Vec::new();
    let mut chorus_pub = Vec::new();
    let mut chorus_flow = Vec::new();
    let mut chorus_con = Vec::new();
    for round in 0..args.common.rounds.max(1) {
        let window = config.max_ack_inflight / 2;
        raw_pub.push(meter.sample(super::raw_publish(&js, "RAW_BENCH", "rawbench", &events, window)).await?);
        chorus.ensure_stream(&StreamConfig::new("CHORUS_BENCH", vec!["chorusbench.>".into()])).await?;
        let (p, c) = publish_consume(&meter, &chorus, "CHORUS_BENCH", "chorusbench.event", &events, &args, 1).await?;
        raw_con.push(meter.sample(raw_consume(&js, events.len(), args.batch)).await?);
        chorus.ensure_stream(&StreamConfig::new("CHORUS_FLOW", vec!["chorusflow.>".into()])).await?;
        chorus_flow.push(publish_flow(&meter, &chorus, "CHORUS_FLOW", "chorusflow.event", &events).await?);
        chorus_pub.push(Sample { took: p.took, cpu: p.cpu.unwrap_or_default() });
        chorus_con.push(Sample { took: c.took, cpu: c.cpu.unwrap_or_default() });
        js.delete_stream("RAW_BENCH").await?;
        chorus.delete_stream("CHORUS_BENCH").await?;
        chorus.delete_stream("CHORUS_FLOW").await?;
        eprintln!("round {} done", round + 1);
    }
    let n = events.len();
    let raw_pub = Row::of("raw async-nats JetStream publish", n, median_sample(raw_pub), None);
    let raw_con = Row::of("raw async-nats pull consume + ack", n, median_sample(raw_con), None);
    let chorus_flow = Row::of("chorus JetStream publish_stream", n, median_sample(chorus_flow), Some(raw_pub.rate()));
    let chorus_pub = Row::of(
        format!("chorus JetStream publish_batch (batches of {})", args.batch),
        n,
        median_sample(chorus_pub),
        Some(raw_pub.rate()),
    );
    let chorus_con =
        Row::of("chorus JetStream consumer fetch + ack", n, median_sample(chorus_con), Some(raw_con.rate()));
    print_table(
        &format!(
            "JetStream: Chorus vs raw async-nats (same server, same payloads, median of {} rounds)",
            args.common.rounds.max(1)
        ),
        &[raw_pub, chorus_flow, chorus_pub, raw_con, chorus_con],
    );

    if !args.common.no_embedded {
        let dir = tempfile::tempdir()?;
        let embedded: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("bench"))?);
        embedded.ensure_stream(&StreamConfig::new("EMBEDDED_BENCH", vec!["embeddedbench.>".into()])).await?;
        let (pub_row, con_row) = publish_consume(
            &meter,
            &embedded,
            "EMBEDDED_BENCH",
            "embeddedbench.event",
            &events,
            &args,
            args.publishers,
        )
        .await?;
        let before = meter.read();
        let started = Instant::now();
        let mut replay = embedded.replay("EMBEDDED_BENCH", Default::default()).await?;
        let mut n = 0;
        while let Some(m) = replay.next().await {
            m?;
            n += 1;
        }
        let took = started.elapsed();
        let replay_row = Row::of("embedded replay", n, Sample { took, cpu: meter.read().since(&before) }, None);
        print_table(
            "Embedded store (sled, group commit: acknowledged = flushed to disk)",
            &[
                Row { name: format!("embedded publish_batch ({} publishers)", args.publishers), ..pub_row },
                Row { name: "embedded consumer fetch + ack".into(), ..con_row },
                replay_row,
            ],
        );
    }
    Ok(())
}

/// Publishes `events` in batches from `publishers` tasks, then consumes them all with a durable
/// consumer, acknowledging each.
async fn publish_consume(
    meter: &CpuMeter,
    b: &Arc<dyn Backbone>,
    stream: &str,
    subject: &str,
    events: &[(String, Bytes)],
    args: &Args,
    publishers: usize,
) -> anyhow::Result<(Row, Row)> {
    let messages: Vec<Message> = events.iter().map(|(id, p)| Message::new(id.clone(), subject, p.clone())).collect();
    let per = messages.len().div_ceil(publishers.max(1));
    let before = meter.read();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for part in messages.chunks(per.max(1)) {
        let b = b.clone();
        let part = part.to_vec();
        let batch = args.batch;
        tasks.push(tokio::spawn(async move {
            for chunk in part.chunks(batch) {
                b.publish_batch(chunk.to_vec()).await?;
            }
            Ok::<_, chorus_backbone::BackboneError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let took = started.elapsed();
    let publish = Row::of("", messages.len(), Sample { took, cpu: meter.read().since(&before) }, None);
    let stored = b.stream_info(stream).await?.messages as usize;
    anyhow::ensure!(stored == messages.len(), "{stream}: {stored} stored of {} published", messages.len());

    let mut consumer = b.consumer(stream, &ConsumerConfig::new("bench")).await?;
    let before = meter.read();
    let started = Instant::now();
    let mut n = 0;
    while n < messages.len() {
        let got = consumer.fetch(args.batch, Duration::from_secs(5)).await?;
        anyhow::ensure!(!got.is_empty(), "{stream}: consumer stalled at {n}");
        for d in &got {
            d.ack().await?;
        }
        n += got.len();
    }
    let took = started.elapsed();
    let consume = Row::of("", n, Sample { took, cpu: meter.read().since(&before) }, None);
    Ok((publish, consume))
}

/// Publishes `events` as one flow ([`Backbone::publish_stream`]), as a producer with a steady
/// stream of events does, and checks every one was stored. The messages are made before the
/// clock starts, as the raw baseline's are: a producer hands over messages it owns.
async fn publish_flow(
    meter: &CpuMeter,
    b: &Arc<dyn Backbone>,
    stream: &str,
    subject: &str,
    events: &[(String, Bytes)],
) -> anyhow::Result<Sample> {
    let messages: Vec<Message> = events.iter().map(|(id, p)| Message::new(id.clone(), subject, p.clone())).collect();
    let n = messages.len();
    let sample = meter
        .sample(async {
            let started = Instant::now();
            let mut acks = b.clone().publish_stream(Box::pin(futures::stream::iter(messages)));
            let mut stored = 0;
            while let Some(ack) = acks.next().await {
                ack?;
                stored += 1;
            }
            anyhow::ensure!(stored == n, "{stream}: {stored} acknowledged of {n}");
            Ok(started.elapsed())
        })
        .await?;
    let stored = b.stream_info(stream).await?.messages as usize;
    anyhow::ensure!(stored == n, "{stream}: {stored} stored of {n} published");
    Ok(sample)
}

/// A durable pull consumer acknowledging every message.
async fn raw_consume(js: &jetstream::Context, n: usize, batch: usize) -> anyhow::Result<Duration> {
    let stream = js.get_stream("RAW_BENCH").await?;
    let consumer =
        stream.create_consumer(pull::Config { durable_name: Some("raw".into()), ..Default::default() }).await?;
    let started = Instant::now();
    let mut msgs = consumer.stream().max_messages_per_batch(batch).messages().await?;
    for _ in 0..n {
        let m = msgs.next().await.context("raw consumer ended")??;
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(started.elapsed())
}
