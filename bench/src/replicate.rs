//! `chorus bench replicate`.
//!
//! Two servers on this machine: a site joined to a hub by a leafnode, each with its own
//! JetStream domain. One source stream of encoded events on the site is copied into a fresh
//! hub stream by each copier in turn, in interleaved rounds (the order rotates each round),
//! and the median of the rounds is reported with the CPU each process spent per event:
//!
//! * the Chorus replicator on a **rewrite link** into a stream it owns, as `auto` chooses
//!   (the sequenced copier on every server, measured faster than a transforming source) and
//!   with `path: copy` (the same path, named);
//! * the Chorus replicator on a **plain link** (it sets up and supervises a native source);
//! * a JetStream **native mirror** on the hub (`external.api = $JS.<site>.API`): the
//!   servers copying by themselves, the bar;
//! * the **pipelined copier** anyone would write first (forty lines of async-nats): a pull
//!   consumer on the site, each message published to the hub with its id, 256 publishes in
//!   flight, each source message acknowledged after the hub acknowledged its copy;
//! * once, on a prefix of the stream, the **one-at-a-time copier** (each publish awaited
//!   before the next), to show what pipelining is worth.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, stream};
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, Message, StreamConfig};
use chorus_replicator::{LinkConfig, Replicator};
use futures::StreamExt;

use super::{CpuMeter, CpuReading};

#[derive(clap::Args)]
pub struct Args {
    /// Events in the source stream, copied whole by each copier in each round.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Interleaved rounds; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events per replicator publish batch.
    #[arg(long, default_value_t = 2048)]
    batch: usize,
    /// Events copied by the one-at-a-time copier (measured once).
    #[arg(long, default_value_t = 10_000)]
    one_at_a_time: usize,
    /// Skip the measurement of the target's dedupe window memory.
    #[arg(long)]
    no_dedupe_memory: bool,
    /// Only this copier (rewrite, plain, mirror, pipelined), e.g. to profile it; no ratios.
    #[arg(long)]
    only: Option<String>,
    /// Fan-in instead: this many sites (each over its own leafnode) copied into one hub
    /// stream at once, the replicator against native sources; `--events` events each.
    #[arg(long)]
    sites: Option<usize>,
}

const SOURCE: &str = "BENCH_SRC";

/// Publishes in flight in the pipelined copier.
const PIPELINE: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rewrite,
    RewriteCopy,
    Plain,
    Mirror,
    Pipelined,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Rewrite, Kind::RewriteCopy, Kind::Plain, Kind::Mirror, Kind::Pipelined];

    fn name(self) -> &'static str {
        match self {
            Kind::Rewrite => "chorus replicator, rewrite link (path: auto)",
            Kind::RewriteCopy => "chorus replicator, rewrite link (path: copy, sequenced copier)",
            Kind::Plain => "chorus replicator, plain link (native mirror it sets up and supervises)",
            Kind::Mirror => "JetStream native mirror",
            Kind::Pipelined => "pipelined copier (256 in flight, ids, source acked after target)",
        }
    }
}

/// One copier's run: wall time and CPU of each process.
struct Run {
    took: Duration,
    cpu: CpuReading,
    /// The path a replicator's link took.
    path: Option<&'static str>,
}

struct Bench {
    site: Arc<dyn Backbone>,
    hub: Arc<dyn Backbone>,
    site_url: String,
    hub_url: String,
    events: usize,
    batch: usize,
    meter: CpuMeter,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(sites) = args.sites {
        return super::fanin::run(sites, args.events, args.rounds).await;
    }
    let sites = chorus_testkit::nats::LeafnodeSites::start_named(&["site".into()], &["bench.>"])
        .context("starting hub and site")?;
    sites.wait_connected(Duration::from_secs(10))?;
    let (hub_url, site_url) = (sites.hub.url(), sites.sites[0].url());
    let site: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&site_url)).await?);
    let hub: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&hub_url)).await?);
    site.ensure_stream(&StreamConfig::new(SOURCE, vec!["bench.src.>".into()])).await?;
    let events = super::backbone::payloads(args.events);
    let avg = events.iter().map(|(_, p)| p.len()).sum::<usize>() / args.events.max(1);
    let messages: Vec<Message> =
        events.iter().map(|(id, p)| Message::new(id.clone(), "bench.src.event", p.clone())).collect();
    for chunk in messages.chunks(2_000) {
        site.publish_batch(chunk.to_vec()).await?;
    }
    let meter = CpuMeter::new(vec![
        ("hub nats-server".into(), sites.hub.pid().context("hub pid")?),
        ("site nats-server".into(), sites.sites[0].pid().context("site pid")?),
    ]);
    println!(
        "# chorus bench replicate: {} events of {avg} bytes copied site → hub by each copier, {} interleaved rounds",
        args.events, args.rounds
    );
    let bench = Bench { site, hub, site_url, hub_url, events: args.events, batch: args.batch, meter };

    if let Some(only) = &args.only {
        let kind = *Kind::ALL
            .iter()
            .find(|k| format!("{k:?}").eq_ignore_ascii_case(only))
            .with_context(|| format!("--only {only}: not one of rewrite, plain, mirror, pipelined"))?;
        for round in 0..args.rounds {
            let run = bench.copy(kind, round).await?;
            let cpu = run.cpu.per_event(args.events);
            println!("{}: {:.0} events/s, µs CPU/event {cpu:.1?}", kind.name(), super::rate(args.events, run.took));
        }
        return Ok(());
    }
    let mut runs: Vec<Vec<Run>> = Kind::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        for k in 0..Kind::ALL.len() {
            let at = (k + round) % Kind::ALL.len();
            let kind = Kind::ALL[at];
            let run = bench.copy(kind, round).await.with_context(|| format!("{} in round {round}", kind.name()))?;
            eprintln!("round {round}: {} {:.0} events/s", kind.name(), super::rate(args.events, run.took));
            runs[at].push(run);
        }
    }
    let slow = bench.one_at_a_time(args.one_at_a_time.min(args.events)).await?;

    // The median round of each copier (by wall time), with that round's CPU.
    let medians = super::median_runs(&runs, |r: &Run| r.took);
    let rate_of =
        |kind: Kind| super::rate(args.events, medians[Kind::ALL.iter().position(|k| *k == kind).unwrap()].took);
    let mirror = rate_of(Kind::Mirror);
    let names = bench.meter.names();
    println!("\n### Replication, site → hub over a leafnode (median of {} interleaved rounds)\n", args.rounds);
    println!(
        "| copier | events | seconds | events/s | vs native mirror | {} |",
        names.iter().map(|n| format!("{n} µs CPU/event")).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|---:|---:|---:|---:|{}", "---:|".repeat(names.len()));
    let row = |name: &str, events: usize, run: &Run| {
        let rate = super::rate(events, run.took);
        let cpu = run.cpu.per_event(events).iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>().join(" | ");
        println!("| {name} | {events} | {:.3} | {rate:.0} | {:.2} | {cpu} |", run.took.as_secs_f64(), rate / mirror);
    };
    for (kind, run) in Kind::ALL.iter().zip(&medians) {
        match run.path {
            Some(path) if *kind == Kind::Rewrite => row(&format!("{} → {path}", kind.name()), args.events, run),
            _ => row(kind.name(), args.events, run),
        }
    }
    row("one-at-a-time copier (each publish awaited)", args.one_at_a_time.min(args.events), &slow);
    let all_rounds = |kind: Kind| {
        runs[Kind::ALL.iter().position(|k| *k == kind).unwrap()]
            .iter()
            .map(|r| format!("{:.0}", super::rate(args.events, r.took)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!();
    for kind in Kind::ALL {
        println!("rounds of {}: {} events/s", kind.name(), all_rounds(kind));
    }
    let (rewrite, copier) = (rate_of(Kind::Rewrite), rate_of(Kind::RewriteCopy));
    let (plain, pipelined) = (rate_of(Kind::Plain), rate_of(Kind::Pipelined));
    println!("\nplain link / native mirror: **{:.2}** (goal ≥ 0.9)", plain / mirror);
    println!("rewrite link / native mirror: **{:.2}** (goal ≥ 0.8)", rewrite / mirror);
    println!("rewrite link / pipelined copier: **{:.2}** (goal ≥ 1.5)", rewrite / pipelined);
    println!(
        "sequenced copier (path: copy) / native mirror: {:.2}; / pipelined copier: {:.2}",
        copier / mirror,
        copier / pipelined
    );
    println!(
        "pipelined copier / one-at-a-time copier: {:.1}",
        pipelined / super::rate(args.one_at_a_time.min(args.events), slow.took)
    );
    if !args.no_dedupe_memory {
        // What a copier with ids (the pipelined one here) makes the target remember.
        dedupe_memory(&events, pipelined).await?;
    }
    Ok(())
}

impl Bench {
    /// Copies the whole source into a fresh hub stream with `kind`, timed until the hub
    /// holds every event; the hub stream (and whatever the copier set up) is removed after.
    async fn copy(&self, kind: Kind, round: usize) -> anyhow::Result<Run> {
        let target = format!("{}_{round}", format!("{kind:?}").to_uppercase());
        let subject = format!("bench.{}.{round}", format!("{kind:?}").to_lowercase());
        let hub_js = jetstream::new(async_nats::connect(&self.hub_url).await?);
        let (site_url, hub_url) = (&self.site_url, &self.hub_url);
        let mut stop: Option<Box<dyn FnOnce() -> futures::future::BoxFuture<'static, anyhow::Result<()>> + Send>> =
            None;
        // A replicator is running before it is given a link: its checkpoint store is opened
        // before the clock starts, as the other copiers' connections are.
        let state = tempfile::tempdir()?;
        let replicator = match kind {
            Kind::Rewrite | Kind::RewriteCopy | Kind::Plain => Some(Replicator::new(state.path())?),
            _ => None,
        };
        let path_taken = Arc::new(std::sync::Mutex::new(None));
        let before = self.meter.read();
        let started = Instant::now();
        match kind {
            Kind::Rewrite | Kind::RewriteCopy | Kind::Plain => {
                // The rewrite link's copies land in a stream capturing the new subjects; the
                // plain link's target captures none (the replicator makes it a mirror).
                let (rewrite, subjects) = if kind != Kind::Plain {
                    let path = if kind == Kind::RewriteCopy { "copy" } else { "auto" };
                    (
                        format!("    rewrite: [{{ from: \"bench.src.>\", to: \"{subject}.>\" }}]\n    path: {path}\n"),
                        format!("\"{subject}.>\""),
                    )
                } else {
                    (String::new(), String::new())
                };
                let link: LinkConfig = serde_yaml::from_str(&format!(
                    "name: bench\nsource: {{ nats: {{ servers: [\"{site_url}\"] }} }}\ntarget: {{ nats: {{ servers: [\"{hub_url}\"] }} }}\nbatch: {}\nstreams:\n  - stream: {SOURCE}\n{rewrite}    target_stream: {{ name: {target}, subjects: [{subjects}] }}\n",
                    self.batch
                ))?;
                let mut r = replicator.expect("made above for a replicator");
                r.add_link(link, self.site.clone(), self.hub.clone());
                let mut handle = r.start(chorus_runtime::Shutdown::new()).await?;
                let expected = match kind {
                    Kind::Plain => Some("native"),
                    Kind::RewriteCopy => Some("copy"),
                    _ => None, // whatever `auto` chooses, shown in the table
                };
                let took = path_taken.clone();
                stop = Some(Box::new(move || {
                    Box::pin(async move {
                        let path = handle.copiers()[0].path;
                        *took.lock().expect("path lock") = path;
                        chorus_runtime::Service::stop(&mut handle).await?;
                        drop(state);
                        anyhow::ensure!(
                            expected.is_none() || path == expected,
                            "the link took path {path:?}, not {expected:?}"
                        );
                        Ok(())
                    })
                }));
            }
            Kind::Mirror => {
                hub_js
                    .create_stream(stream::Config {
                        name: target.clone(),
                        mirror: Some(stream::Source {
                            name: SOURCE.into(),
                            external: Some(stream::External {
                                api_prefix: "$JS.site.API".into(),
                                delivery_prefix: None,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await?;
            }
            Kind::Pipelined => {
                hub_js
                    .create_stream(stream::Config {
                        name: target.clone(),
                        subjects: vec![format!("{subject}.>")],
                        ..Default::default()
                    })
                    .await?;
                let site_url_owned = site_url.clone();
                let copier =
                    tokio::spawn(pipelined_copier(site_url.clone(), hub_js.clone(), format!("{subject}.event"), round));
                stop = Some(Box::new(move || {
                    Box::pin(async move {
                        copier.abort();
                        // Its durable consumer on the site goes with it.
                        let site = jetstream::new(async_nats::connect(&site_url_owned).await?);
                        site.get_stream(SOURCE).await?.delete_consumer(&format!("pipelined{round}")).await?;
                        Ok(())
                    })
                }));
            }
        }
        wait_count(&*self.hub, &target, self.events as u64).await?;
        let took = started.elapsed();
        let cpu = self.meter.read().since(&before);
        if let Some(stop) = stop {
            stop().await?;
        }
        self.hub.delete_stream(&target).await?;
        let path = *path_taken.lock().expect("path lock");
        Ok(Run { took, cpu, path })
    }

    /// The copier without pipelining: each publish awaited before the next, the source
    /// message acknowledged after it; timed over the first `n` events.
    async fn one_at_a_time(&self, n: usize) -> anyhow::Result<Run> {
        let hub_js = jetstream::new(async_nats::connect(&self.hub_url).await?);
        hub_js
            .create_stream(stream::Config {
                name: "ONE".into(),
                subjects: vec!["bench.one.>".into()],
                ..Default::default()
            })
            .await?;
        let consumer = durable(&self.site_url, "one").await?;
        let before = self.meter.read();
        let started = Instant::now();
        let mut messages = consumer.messages().await?;
        for _ in 0..n {
            let m = messages.next().await.context("source ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
            let headers = m.headers.clone().unwrap_or_default();
            hub_js.publish_with_headers("bench.one.event", headers, m.payload.clone()).await?.await?;
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let run = Run { took: started.elapsed(), cpu: self.meter.read().since(&before), path: None };
        self.hub.delete_stream("ONE").await?;
        Ok(run)
    }
}

/// A durable pull consumer on the site's source stream, acknowledging each message.
async fn durable(site_url: &str, name: &str) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    let site_js = jetstream::new(async_nats::connect(site_url).await?);
    Ok(site_js
        .get_stream(SOURCE)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?)
}

/// The copier a user writes first with async-nats: every message of a durable pull
/// consumer published to the hub with its headers (the id among them), [`PIPELINE`]
/// publishes in flight, each source message acknowledged once the hub acknowledged its copy.
async fn pipelined_copier(
    site_url: String,
    hub: jetstream::Context,
    subject: String,
    round: usize,
) -> anyhow::Result<()> {
    let consumer = durable(&site_url, &format!("pipelined{round}")).await?;
    let mut messages = consumer.messages().await?;
    let mut inflight = futures::stream::FuturesOrdered::new();
    loop {
        tokio::select! {
            m = messages.next(), if inflight.len() < PIPELINE => {
                let m = m.context("source ended")?.map_err(|e| anyhow::anyhow!("{e}"))?;
                let headers = m.headers.clone().unwrap_or_default();
                let ack = hub.publish_with_headers(subject.clone(), headers, m.payload.clone()).await?;
                inflight.push_back(async move {
                    ack.await?;
                    m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))
                });
            }
            Some(done) = inflight.next(), if !inflight.is_empty() => done?,
        }
    }
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
        "at the copy rate of a copier with ids ({copy_rate:.0} events/s) a {}-minute window remembers {window_ids:.0} ids: {:.0} MiB on the target server; at a steady fleet rate of 1,000 events/s: {:.1} MiB",
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
