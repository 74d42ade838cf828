//! `chorus bench replicate`.
//!
//! One run, the same two servers (a site joined to a hub by a leafnode, each with its own
//! JetStream domain), the same source stream of encoded events, three copiers in turn:
//!
//! * the Chorus replicator (checkpointed, pipelined, dedupe ids kept);
//! * a JetStream native mirror on the hub (`mirror` with `external.api = $JS.<site>.API`):
//!   the server copying inside itself, the bar to reach;
//! * a naive copier: a durable pull consumer on the site, each message published to the hub
//!   and its ack awaited before the source message is acked;
//! * the ceiling of any client-side copier: raw async-nats publishing the same events (with
//!   their dedupe ids, pipelined) straight into a hub stream, reading nothing. A copier that
//!   publishes to the hub cannot beat it; the mirror does not pay for it (the server copies
//!   inside itself, without client publishes, dedupe lookups or acknowledgements).
//!
//! Each copies a backlog of `--events` (events/s), then follows a live burst of `--live`
//! events published at full speed (lag: seconds from the end of the burst until the target
//! holds all of it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream};
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, Message, StreamConfig};
use chorus_replicator::{LinkConfig, Replicator};
use futures::StreamExt;

#[derive(clap::Args)]
pub struct Args {
    /// Backlog events copied by each copier.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events of the live burst followed by each copier.
    #[arg(long, default_value_t = 20_000)]
    live: usize,
    /// Events per replicator publish batch.
    #[arg(long, default_value_t = 2048)]
    batch: usize,
}

struct Measured {
    name: &'static str,
    backlog: Duration,
    live_lag: Duration,
}

const SOURCE: &str = "BENCH_SRC";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sites = chorus_testkit::nats::LeafnodeSites::start_named(&["site".into()], &["bench.>"])
        .context("starting hub and site")?;
    sites.wait_connected(Duration::from_secs(10))?;
    let (hub_url, site_url) = (sites.hub.url(), sites.sites[0].url());
    let site: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&site_url)).await?);
    let hub: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&hub_url)).await?);
    site.ensure_stream(&StreamConfig::new(SOURCE, vec!["bench.src.>".into()])).await?;

    let total = args.events + 3 * args.live;
    let events = super::backbone::payloads(total);
    let avg = events.iter().map(|(_, p)| p.len()).sum::<usize>() / total.max(1);
    println!("# chorus bench replicate: backlog {} events of {avg} bytes, live bursts of {}", args.events, args.live);
    let to_messages = |range: std::ops::Range<usize>| -> Vec<Message> {
        events[range].iter().map(|(id, p)| Message::new(id.clone(), "bench.src.event", p.clone())).collect()
    };
    for chunk in to_messages(0..args.events).chunks(2_000) {
        site.publish_batch(chunk.to_vec()).await?;
    }

    let mut results = Vec::new();
    let mut live_start = args.events;
    let mut next_live = || {
        let r = live_start..live_start + args.live;
        live_start += args.live;
        r
    };

    // The replicator.
    {
        let state = tempfile::tempdir()?;
        let link: LinkConfig = serde_yaml::from_str(&format!(
            "name: bench\nsource: {{ nats: {{ servers: [\"{site_url}\"] }} }}\ntarget: {{ nats: {{ servers: [\"{hub_url}\"] }} }}\nbatch: {}\nstreams:\n  - stream: {SOURCE}\n    rewrite: [{{ from: \"bench.src.>\", to: \"bench.repl.>\" }}]\n    target_stream: {{ name: REPL, subjects: [\"bench.repl.>\"] }}\n",
            args.batch
        ))?;
        let mut r = Replicator::new(state.path())?;
        r.add_link(link, site.clone(), hub.clone());
        let started = Instant::now();
        let mut handle = r.start(chorus_runtime::Shutdown::new()).await?;
        wait_count(&*hub, "REPL", args.events as u64).await?;
        let backlog = started.elapsed();
        let live_lag = live_burst(&*site, &*hub, "REPL", to_messages(next_live()), args.events as u64).await?;
        chorus_runtime::Service::stop(&mut handle).await?;
        results.push(Measured { name: "chorus replicator", backlog, live_lag });
    }

    // The native mirror.
    {
        let client = async_nats::connect(&hub_url).await?;
        let js = jetstream::new(client);
        let started = Instant::now();
        js.create_stream(stream::Config {
            name: "MIRROR".into(),
            mirror: Some(stream::Source {
                name: SOURCE.into(),
                external: Some(stream::External { api_prefix: "$JS.site.API".into(), delivery_prefix: None }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
        // The mirror copies everything the source holds, including the replicator's burst.
        let expected = (args.events + args.live) as u64;
        wait_count(&*hub, "MIRROR", expected).await?;
        let backlog = started.elapsed().mul_f64(args.events as f64 / expected as f64);
        let live_lag = live_burst(&*site, &*hub, "MIRROR", to_messages(next_live()), expected).await?;
        results.push(Measured { name: "JetStream native mirror", backlog, live_lag });
    }

    // The naive copier.
    {
        let hub_js = jetstream::new(async_nats::connect(&hub_url).await?);
        hub_js
            .create_stream(stream::Config {
                name: "NAIVE".into(),
                subjects: vec!["bench.naive.>".into()],
                ..Default::default()
            })
            .await?;
        let site_js = jetstream::new(async_nats::connect(&site_url).await?);
        let consumer = site_js
            .get_stream(SOURCE)
            .await?
            .create_consumer(pull::Config {
                durable_name: Some("naive".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let copier = tokio::spawn(async move {
            let mut messages = consumer.messages().await?;
            loop {
                let m = tokio::select! {
                    m = messages.next() => m,
                    _ = stopped.wait_for(|s| *s) => return anyhow::Ok(()),
                };
                let Some(m) = m else { return Ok(()) };
                let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                let headers = m.headers.clone().unwrap_or_default();
                hub_js.publish_with_headers("bench.naive.event", headers, m.payload.clone()).await?.await?;
                m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        });
        let expected = (args.events + 2 * args.live) as u64;
        wait_count(&*hub, "NAIVE", expected).await?;
        let backlog = started.elapsed().mul_f64(args.events as f64 / expected as f64);
        let live_lag = live_burst(&*site, &*hub, "NAIVE", to_messages(next_live()), expected).await?;
        stop.send(true).ok();
        copier.await??;
        results.push(Measured { name: "naive consume-then-publish", backlog, live_lag });
    }

    // The ceiling: the same backlog published into the hub by raw async-nats, nothing read.
    let ceiling = {
        let client = async_nats::connect(&hub_url).await?;
        let js = jetstream::ContextBuilder::new().max_ack_inflight(4096).backpressure_on_inflight(true).build(client);
        super::raw_publish(&js, "CEILING", "bench.ceiling", &events[..args.events], 2048).await?
    };
    // And without acknowledgements: core NATS publishes (dedupe ids kept) into a stream,
    // timed until the stream holds them all. Faster, but a lost message goes unnoticed.
    let unacked = {
        let client = async_nats::connect(&hub_url).await?;
        let js = jetstream::new(client.clone());
        js.create_stream(stream::Config {
            name: "UNACKED".into(),
            subjects: vec!["bench.unacked.>".into()],
            ..Default::default()
        })
        .await?;
        let started = Instant::now();
        for (id, payload) in &events[..args.events] {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            client.publish_with_headers("bench.unacked.event", headers, payload.clone()).await?;
        }
        client.flush().await?;
        wait_count(&*hub, "UNACKED", args.events as u64).await?;
        started.elapsed()
    };

    let rate = |m: &Measured| super::rate(args.events, m.backlog);
    let (ours, mirror, naive) = (rate(&results[0]), rate(&results[1]), rate(&results[2]));
    println!("\n### Replication, site → hub over a leafnode\n");
    println!("| copier | backlog events | seconds | events/s | live burst lag (s) |");
    println!("|---|---:|---:|---:|---:|");
    for m in &results {
        println!(
            "| {} | {} | {:.3} | {:.0} | {:.3} |",
            m.name,
            args.events,
            m.backlog.as_secs_f64(),
            rate(m),
            m.live_lag.as_secs_f64()
        );
    }
    let ceiling_rate = super::rate(args.events, ceiling);
    println!(
        "| ceiling: raw async-nats publish into the hub, nothing read | {} | {:.3} | {:.0} | - |",
        args.events,
        ceiling.as_secs_f64(),
        ceiling_rate
    );
    println!(
        "| ceiling without acknowledgements: core NATS publish into the hub stream | {} | {:.3} | {:.0} | - |",
        args.events,
        unacked.as_secs_f64(),
        super::rate(args.events, unacked)
    );
    println!("\nreplicator / native mirror: {:.2} (goal ≥ 0.8)", ours / mirror);
    println!(
        "ceiling / native mirror: {:.2} acknowledged, {:.2} without acknowledgements (the best any client-side copier could reach); replicator / ceiling: {:.2}",
        ceiling_rate / mirror,
        super::rate(args.events, unacked) / mirror,
        ours / ceiling_rate
    );
    println!("replicator / naive copier: {:.2} (goal ≥ 1.5)", ours / naive);
    dedupe_memory(&events[..args.events], ours).await?;
    Ok(())
}

/// What the no-duplicate guarantee costs the target: the replicator re-sends a batch after a
/// crash with the same ids, and the target drops them only while it remembers those ids (its
/// `dedupe_window`). JetStream keeps every id of the window in memory. Measured as the
/// resident memory of a fresh nats-server holding the events with their ids, minus that of
/// another holding the same events without ids, per event; then scaled to the replicator's
/// copy rate measured above.
async fn dedupe_memory(events: &[(String, bytes::Bytes)], copy_rate: f64) -> anyhow::Result<()> {
    use async_nats::jetstream::message::PublishMessage;
    const WINDOW: Duration = Duration::from_secs(600);
    let mut rss = Vec::new();
    for with_ids in [true, false] {
        let server = chorus_testkit::nats::NatsServer::start().context("starting a server")?;
        let js = jetstream::new(async_nats::connect(&server.url()).await?);
        js.create_stream(stream::Config {
            name: "DEDUPE".into(),
            subjects: vec!["bench.dedupe.>".into()],
            duplicate_window: WINDOW,
            ..Default::default()
        })
        .await?;
        let mut inflight = std::collections::VecDeque::new();
        for (id, payload) in events {
            if inflight.len() >= 2048 {
                let f: jetstream::context::PublishAckFuture = inflight.pop_front().expect("not empty");
                f.await?;
            }
            let message = PublishMessage::build().payload(payload.clone());
            let message = if with_ids { message.message_id(id) } else { message };
            inflight.push_back(js.send_publish("bench.dedupe.event", message).await?);
        }
        for f in inflight {
            f.await?;
        }
        let pid = server.pid().context("server pid")?;
        rss.push(resident_bytes(pid)?);
    }
    let per_id = (rss[0] as f64 - rss[1] as f64) / events.len() as f64;
    let window_ids = copy_rate * WINDOW.as_secs_f64();
    println!("\n### The target's dedupe window (what the no-duplicate guarantee costs)\n");
    println!(
        "nats-server resident memory holding {} events: {:.1} MiB with their ids in a {}-minute window, {:.1} MiB without ids: **{per_id:.0} bytes per remembered id**",
        events.len(),
        rss[0] as f64 / 1048576.0,
        WINDOW.as_secs() / 60,
        rss[1] as f64 / 1048576.0
    );
    println!(
        "at the replicator's copy rate ({copy_rate:.0} events/s) a {}-minute window remembers {window_ids:.0} ids: {:.0} MiB on the target server; at a steady fleet rate of 1,000 events/s: {:.1} MiB",
        WINDOW.as_secs() / 60,
        window_ids * per_id / 1048576.0,
        1000.0 * WINDOW.as_secs_f64() * per_id / 1048576.0
    );
    Ok(())
}

/// Resident set size of process `pid`, in bytes (`VmRSS` of /proc/<pid>/status).
fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// Publishes `burst` to the site at full speed, then returns how long after the last
/// publish was acknowledged the target held `before + burst.len()` messages.
async fn live_burst(
    site: &dyn Backbone,
    hub: &dyn Backbone,
    target: &str,
    burst: Vec<Message>,
    before: u64,
) -> anyhow::Result<Duration> {
    let n = burst.len() as u64;
    for chunk in burst.chunks(2_000) {
        site.publish_batch(chunk.to_vec()).await?;
    }
    let published = Instant::now();
    wait_count(hub, target, before + n).await?;
    Ok(published.elapsed())
}

async fn wait_count(b: &dyn Backbone, stream: &str, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let have = b.stream_info(stream).await.map(|i| i.messages).unwrap_or(0);
        if have >= n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{stream} holds {have} of {n} after 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
