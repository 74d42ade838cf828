//! `chorus provision`: configures nodes that start in provisioning mode, over RPC.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use chorus_consumers::provisioner::{Provisioner, ProvisionerConfig};
use chorus_platform::{resolve_platform_streams, StreamLimits};
use chorus_runtime::{Services, Shutdown};
use chorus_schemas::subject::CHORUS_LIFECYCLE;

use crate::args::{OpsServer, StreamArgs};
use crate::signal::until_signal_or_failure;

/// Arguments of `chorus provision`.
#[derive(clap::Args)]
pub struct ProvisionArgs {
    /// Provisioner configuration (YAML): steps, components, state_dir, concurrency, sweep
    /// interval, backoff; see docs/CONSUMERS.md.
    #[arg(long, short)]
    config: PathBuf,
    #[command(flatten)]
    streams: StreamArgs,
    /// NATS server(s) the nodes answer RPC on, comma-separated [default: --nats]; required
    /// when the streams are in the embedded store.
    #[arg(long)]
    rpc_nats: Option<String>,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address, e.g. 127.0.0.1:9102.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// Runs the provisioner until SIGTERM or Ctrl-C, or until it fails (attempts in progress
/// finish their step).
pub async fn run(args: ProvisionArgs) -> anyhow::Result<()> {
    let mut config = ProvisionerConfig::load(&args.config)?;
    let backbone = args.streams.open_for_service().await?;
    // The embedded store is the provisioner's own: its streams are made. On a broker, the
    // stream that holds the lifecycle subjects is found (Choria's CHORIA_EVENTS, say); a
    // broker that is down, or streams not there yet, are waited for by the provisioner.
    if args.streams.embedded() || backbone.connected() {
        let overrides = args.streams.stream_map();
        let found =
            resolve_platform_streams(&*backbone, &StreamLimits::default(), &overrides, args.streams.embedded()).await?;
        if config.stream.is_none() {
            config.stream = found.holding(CHORUS_LIFECYCLE).map(String::from);
        }
    }
    let rpc_urls = args
        .rpc_nats
        .as_deref()
        .or(args.streams.nats.as_deref())
        .context("nodes are reached over NATS: give --rpc-nats URL with the embedded store")?;
    let transport = crate::args::service_rpc_transport(rpc_urls).await?;
    let steps = config.effective_steps().len();
    let provisioner = Provisioner::start(backbone, transport, config, Shutdown::new()).await?;
    let monitor = provisioner.monitor();
    let http = OpsServer::start(args.listen, Arc::new(monitor.clone())).await?;
    let mut services = Services::new();
    services.push(provisioner);
    eprintln!("chorus provision running ({steps} steps); SIGTERM to stop");
    until_signal_or_failure(&services).await;
    let stats = monitor.stats();
    let counts = monitor.counts()?;
    let stopped = services.stop().await;
    http.stop().await?;
    drop(monitor);
    eprintln!(
        "provisioned {} nodes in this run ({} failed attempts, {} retries, {} dead-lettered); {} provisioned, {} pending, {} failed in total",
        stats.provisioned, stats.failed, stats.retries, stats.dead_lettered, counts.provisioned, counts.pending, counts.failed
    );
    Ok(stopped?)
}
