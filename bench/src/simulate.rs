//! `chorus bench simulate`: simulated nodes in one process, their startup storm stored,
//! against raw async-nats publishing the same events.

use std::sync::Arc;

use anyhow::Context as _;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_platform::{ensure_platform_streams, platform_streams, BackboneSink, StreamLimits};
use chorus_producers::simulator::{resident_bytes, SimConfig, Simulator};

/// Arguments of `chorus bench simulate`.
#[derive(clap::Args)]
pub struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 50_000)]
    nodes: usize,
    /// Use this NATS server instead of starting a private nats-server.
    #[arg(long)]
    nats: Option<String>,
    /// Interleaved rounds of storm and raw publish; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// `chorus bench simulate`: N simulated nodes in this process, their startup storm fully
/// stored in JetStream; memory per node and events/s, against raw async-nats publishing the
/// same events on the same server.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let (server, url) = super::nats_url(args.nats.as_deref())?;
    let meter = super::CpuMeter::with_server(server.as_ref());
    let backbone: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([url.clone()])).await?);
    for (name, _) in chorus_schemas::subject::streams() {
        backbone.delete_stream(name).await.ok();
    }
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
    let before = resident_bytes().unwrap_or(0);
    let sim = Simulator::new(SimConfig::new(args.nodes), Arc::new(BackboneSink(backbone.clone())))?;
    let after = resident_bytes().unwrap_or(0);
    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    let window = NatsConfig::new([url.clone()]).max_ack_inflight / 2;

    // Interleaved rounds on fresh streams; each round every node starts again (new events).
    let (mut storms, mut raws) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        let before_storm = meter.read();
        let storm = sim.startup_storm().await?;
        storms.push(super::Sample { took: storm.took, cpu: meter.read().since(&before_storm) });
        let stored = backbone.stream_info("CHORUS_LIFECYCLE").await?.messages;
        anyhow::ensure!(stored as usize == args.nodes, "startup storm: {stored} of {} events stored", args.nodes);
        for (name, _) in chorus_schemas::subject::streams() {
            backbone.delete_stream(name).await.ok();
        }
        ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;

        // Raw baseline: the same startup events, made and encoded before the clock starts,
        // pipelined by async-nats with message ids and the same window.
        let records: Vec<_> = (0..args.nodes)
            .map(|i| {
                let r = chorus_schemas::EventRecord::new(
                    chorus_schemas::lifecycle::Startup::new(
                        sim.nodes()[i].identity.to_string(),
                        "server",
                        sim.version_of(i),
                    ),
                    1,
                );
                (r.id.clone(), bytes::Bytes::from(r.encode()))
            })
            .collect();
        // Into a stream configured as the platform's lifecycle stream (dedupe window,
        // limits, storage), so both store the same events under the same settings.
        js.delete_stream("RAW_SIM").await.ok();
        let mut raw_stream = platform_streams(&StreamLimits::default())
            .into_iter()
            .find(|s| s.name == "CHORUS_LIFECYCLE")
            .context("the platform has a lifecycle stream")?;
        raw_stream.name = "RAW_SIM".into();
        raw_stream.subjects = vec!["rawsim.>".into()];
        backbone.ensure_stream(&raw_stream).await?;
        raws.push(meter.sample(super::raw_publish_into(&js, "rawsim.event", &records, window)).await?);
        js.delete_stream("RAW_SIM").await?;
        eprintln!("round {} done", round + 1);
    }
    let storm_run = super::median_sample(storms);
    let raw_run = super::median_sample(raws);
    let storm_cpu = storm_run.cpu.clone();
    let storm_rate = super::rate(args.nodes, storm_run.took);
    let raw = super::rate(args.nodes, raw_run.took);
    let cpu = |c: &super::CpuReading| {
        c.names()
            .iter()
            .zip(c.per_event(args.nodes))
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let per_node = after.saturating_sub(before) as f64 / args.nodes as f64;
    println!("\n### Simulated startup storm ({} nodes, one process, one connection)\n", args.nodes);
    println!("| measurement | value |");
    println!("|---|---:|");
    println!("| startup events stored (each round) | {} |", args.nodes);
    println!("| rounds (interleaved; median shown) | {} |", args.rounds.max(1));
    println!("| storm duration | {:.2} s |", storm_run.took.as_secs_f64());
    println!("| chorus simulator events/s | {storm_rate:.0} |");
    println!("| raw async-nats events/s (same events) | {raw:.0} |");
    println!("| ratio | {:.2} |", storm_rate / raw);
    println!("| simulator storm µs CPU/event | {} |", cpu(&storm_cpu));
    println!("| raw async-nats µs CPU/event | {} |", cpu(&raw_run.cpu));
    println!("| simulator memory per node | {per_node:.0} bytes |");
    println!("| process resident memory | {:.1} MiB |", resident_bytes().unwrap_or(0) as f64 / 1048576.0);
    Ok(())
}
