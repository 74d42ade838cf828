//! `chorus simulate`: many simulated nodes in this process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::jetstream::NatsConfig;
use chorus_platform::{ensure_platform_streams, BackboneSink, StreamLimits};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_rpc::NatsTransport;
use chorus_runtime::{Services, Shutdown};

use crate::args::StreamArgs;
use crate::signal::until_signal_or_failure;

/// Arguments of `chorus simulate`.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// How many simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[command(flatten)]
    streams: StreamArgs,
    /// Alive interval of every simulated node (each gets a random slot within it).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    alive_interval: Duration,
    /// Send a startup storm and exit, instead of running until SIGTERM.
    #[arg(long)]
    once: bool,
    /// Action Policy directory for the simulated nodes' RPC servers (with --nats); without
    /// it every request is denied, as on a real node.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
}

/// Starts the simulated fleet (startup storm), runs it until SIGTERM, then shuts every
/// node down.
pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let backbone = args.streams.open().await?;
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
    let mut config = SimConfig::new(args.nodes);
    config.alive_interval = args.alive_interval;
    let sim = Arc::new(Simulator::new(config, Arc::new(BackboneSink(backbone)))?);
    let storm = sim.startup_storm().await?;
    println!(
        "{} simulated nodes started: {} startup events in {:.2?} ({:.0} events/s)",
        args.nodes,
        storm.events,
        storm.took,
        storm.rate()
    );
    if args.once {
        return Ok(());
    }
    let mut services = Services::new();
    services.push(sim.clone().start("simulated fleet", Shutdown::new()));
    if let Some(urls) = &args.streams.nats {
        let client = NatsConfig::from_url_list(urls).connect(None).await?;
        let server =
            sim.host_rpc(Arc::new(NatsTransport::new(client)), "choria", args.policy_dir.clone(), None).await?;
        let registered = sim.register(&server, "choria").await?;
        println!("{} simulated nodes answer RPC in collective choria ({registered} registered)", server.node_count());
        services.push(server);
    }
    until_signal_or_failure(&services).await;
    services.stop().await?;
    println!("{} nodes shut down", args.nodes);
    Ok(())
}
