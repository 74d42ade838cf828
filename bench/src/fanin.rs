//! `chorus bench replicate --sites N`: many sites into one hub stream at once.
//!
//! A hub and N sites on this machine, each site joined to the hub by its own leafnode and
//! holding its own source stream (distinct subjects per site, so the hub counts each site's
//! events). In interleaved rounds, every site's stream is copied into one fresh hub stream
//! at once by:
//!
//! * the Chorus replicator, one plain link per site into a hub stream that exists (as the
//!   hub's own `CHORUS_LIFECYCLE` would): it adds each site's stream to the hub stream's
//!   sources and supervises them;
//! * N native sources on one hub stream, made directly: the servers alone, the bar.
//!
//! Each site's rate is its events over the time until the hub held all of them; the total
//! is every event over the time until the last site was complete.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, Message, StreamConfig};
use chorus_replicator::{LinkConfig, Replicator};
use futures::StreamExt;

use super::{CpuMeter, CpuReading};

const SOURCE: &str = "BENCH_SRC";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Replicator,
    Sources,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Replicator => "chorus replicator, one plain link per site (sources it adds and supervises)",
            Kind::Sources => "JetStream native sources, one per site",
        }
    }
}

/// One round of one kind: when each site was complete, the whole run, and the CPU spent.
struct Run {
    per_site: Vec<Duration>,
    took: Duration,
    cpu: CpuReading,
}

/// Copies `per_site` events from each of `sites` sites into one hub stream, `rounds` times
/// each way, and prints each site's rate and the total against native sources.
pub async fn run(sites: usize, per_site: usize, rounds: usize) -> anyhow::Result<()> {
    anyhow::ensure!(sites >= 2, "--sites: a fan-in needs at least 2 sites");
    let leaf = chorus_testkit::nats::LeafnodeSites::start(sites).context("starting the hub and sites")?;
    leaf.wait_connected(Duration::from_secs(10))?;
    let hub_url = leaf.hub.url();
    let hub: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&hub_url)).await?);
    let mut site_backbones = Vec::new();
    let mut servers = vec![("hub nats-server".to_string(), leaf.hub.pid().context("hub pid")?)];
    for (k, server) in leaf.sites.iter().enumerate() {
        let b: Arc<dyn Backbone> =
            Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&server.url())).await?);
        b.ensure_stream(&StreamConfig::new(SOURCE, vec!["bench.src.>".into()])).await?;
        let subject = format!("bench.src.site{k}");
        let messages: Vec<Message> = super::backbone::payloads(per_site)
            .into_iter()
            .map(|(id, payload)| Message::new(id, subject.clone(), payload))
            .collect();
        let mut acks = b.clone().publish_stream(Box::pin(futures::stream::iter(messages)));
        while let Some(ack) = acks.next().await {
            ack?;
        }
        servers.push((format!("site{k} nats-server"), server.pid().context("site pid")?));
        site_backbones.push((server.url(), b));
    }
    let meter = CpuMeter::new(servers);
    println!(
        "# chorus bench replicate --sites {sites}: {per_site} events per site copied into one hub stream at once, \
         {rounds} interleaved rounds"
    );

    let kinds = [Kind::Replicator, Kind::Sources];
    let mut runs: Vec<Vec<Run>> = kinds.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds.max(1) {
        for k in 0..kinds.len() {
            let at = (k + round) % kinds.len();
            let run = fan_in(kinds[at], round, &hub, &hub_url, &site_backbones, per_site, &meter)
                .await
                .with_context(|| format!("{} in round {round}", kinds[at].name()))?;
            eprintln!("round {round}: {} {:.0} events/s", kinds[at].name(), super::rate(per_site * sites, run.took));
            runs[at].push(run);
        }
    }
    let medians = super::median_runs(&runs, |r: &Run| r.took);
    let total = per_site * sites;
    let bar = super::rate(total, medians[1].took);
    let names = meter.names();
    println!("\n### Fan-in: {sites} sites into one hub stream (median of {rounds} interleaved rounds)\n");
    println!(
        "| copier | {} | total events/s | vs native sources | {} |",
        (0..sites).map(|k| format!("site{k} events/s")).collect::<Vec<_>>().join(" | "),
        names.iter().map(|n| format!("{n} µs CPU/event")).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}---:|---:|{}", "---:|".repeat(sites), "---:|".repeat(names.len()));
    for (kind, run) in kinds.iter().zip(&medians) {
        let rate = super::rate(total, run.took);
        let each = run.per_site.iter().map(|t| format!("{:.0}", super::rate(per_site, *t))).collect::<Vec<_>>();
        let cpu = run.cpu.per_event(total).iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>();
        println!("| {} | {} | {rate:.0} | {:.2} | {} |", kind.name(), each.join(" | "), rate / bar, cpu.join(" | "));
    }
    println!("\nfan-in total / native sources: **{:.2}** (goal ≥ 0.8)", super::rate(total, medians[0].took) / bar);
    Ok(())
}

/// One fan-in into a fresh hub stream, timed until the hub holds every site's events.
async fn fan_in(
    kind: Kind,
    round: usize,
    hub: &Arc<dyn Backbone>,
    hub_url: &str,
    sites: &[(String, Arc<dyn Backbone>)],
    per_site: usize,
    meter: &CpuMeter,
) -> anyhow::Result<Run> {
    let target = format!("FANIN_{}_{round}", format!("{kind:?}").to_uppercase());
    let hub_js = jetstream::new(async_nats::connect(hub_url).await?);
    let state = tempfile::tempdir()?;
    let mut replicator = None;
    if kind == Kind::Replicator {
        // The hub stream exists before the links start (as the hub's own lifecycle stream
        // would), capturing a subject nobody publishes on.
        let subject = format!("fanin.{round}");
        hub.ensure_stream(&StreamConfig::new(&target, vec![subject.clone()])).await?;
        let mut r = Replicator::new(state.path())?;
        for (k, (url, site)) in sites.iter().enumerate() {
            let link: LinkConfig = serde_yaml::from_str(&format!(
                "name: site{k}\nsource: {{ nats: {{ servers: [\"{url}\"] }} }}\ntarget: {{ nats: {{ servers: [\"{hub_url}\"] }} }}\nstreams:\n  - stream: {SOURCE}\n    target_stream: {{ name: {target}, subjects: [\"{subject}\"] }}\n"
            ))?;
            r.add_link(link, site.clone(), hub.clone());
        }
        replicator = Some(r);
    }
    let before = meter.read();
    let started = Instant::now();
    let mut handle = None;
    match replicator {
        Some(r) => handle = Some(r.start(chorus_runtime::Shutdown::new()).await?),
        None => {
            let sources = (0..sites.len())
                .map(|k| stream::Source {
                    name: SOURCE.into(),
                    external: Some(stream::External { api_prefix: format!("$JS.site{k}.API"), delivery_prefix: None }),
                    ..Default::default()
                })
                .collect();
            hub_js
                .create_stream(stream::Config { name: target.clone(), sources: Some(sources), ..Default::default() })
                .await?;
        }
    }
    let per_site_done = wait_each(&hub_js, &target, sites.len(), per_site as u64, started).await?;
    let took = started.elapsed();
    let cpu = meter.read().since(&before);
    if let Some(mut handle) = handle {
        let paths: Vec<_> = handle.copiers().iter().map(|c| c.path).collect();
        chorus_runtime::Service::stop(&mut handle).await?;
        anyhow::ensure!(paths.iter().all(|p| *p == Some("native")), "the links took paths {paths:?}, not native");
    }
    hub.delete_stream(&target).await?;
    drop(state);
    Ok(Run { per_site: per_site_done, took, cpu })
}

/// Polls the hub stream's count per site subject until every site has `n` events there;
/// returns when each site was complete, counted from `started`.
async fn wait_each(
    js: &jetstream::Context,
    stream: &str,
    sites: usize,
    n: u64,
    started: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = started + Duration::from_secs(600);
    let mut done: Vec<Option<Duration>> = vec![None; sites];
    loop {
        if let Ok(s) = js.get_stream(stream).await {
            let mut counts = s.info_with_subjects("bench.src.>").await?;
            let mut seen = std::collections::HashMap::new();
            while let Some(entry) = counts.next().await {
                let (subject, count) = entry?;
                seen.insert(subject, count as u64);
            }
            let now = started.elapsed();
            for (k, slot) in done.iter_mut().enumerate() {
                if slot.is_none() && seen.get(&format!("bench.src.site{k}")).copied().unwrap_or(0) >= n {
                    *slot = Some(now);
                }
            }
            if done.iter().all(Option::is_some) {
                return Ok(done.into_iter().flatten().collect());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "{stream}: not every site's events arrived in 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
