//! `chorus bench simulate`: simulated nodes in one process, their startup storm stored,
//! against raw async-nats publishing the same events.

use std::sync::Arc;

use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_platform::{ensure_platform_streams, BackboneSink, StreamLimits};
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
    let before_storm = meter.read();
    let storm = sim.startup_storm().await?;
    let storm_cpu = meter.read().since(&before_storm);
    let stored = backbone.stream_info("CHORUS_LIFECYCLE").await?.messages;
    anyhow::ensure!(stored as usize == args.nodes, "startup storm: {stored} of {} events stored", args.nodes);

    // Raw baseline: the same startup events, pipelined by async-nats with message ids.
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
    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    js.delete_stream("RAW_SIM").await.ok();
    let raw_run = meter.sample(super::raw_publish(&js, "RAW_SIM", "rawsim", &records, 2048)).await?;
    let raw = super::rate(records.len(), raw_run.took);
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
    println!("| startup events stored | {stored} |");
    println!("| storm duration | {:.2} s |", storm.took.as_secs_f64());
    println!("| chorus simulator events/s | {:.0} |", storm.rate());
    println!("| raw async-nats events/s (same events) | {raw:.0} |");
    println!("| ratio | {:.2} |", storm.rate() / raw);
    println!("| simulator storm µs CPU/event | {} |", cpu(&storm_cpu));
    println!("| raw async-nats µs CPU/event | {} |", cpu(&raw_run.cpu));
    println!("| simulator memory per node | {per_node:.0} bytes |");
    println!("| process resident memory | {:.1} MiB |", resident_bytes().unwrap_or(0) as f64 / 1048576.0);
    Ok(())
}
