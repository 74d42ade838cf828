//! `chorus provision`: configures nodes that start in provisioning mode, over RPC.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chorus_backbone::jetstream::NatsConfig;
use chorus_consumers::provisioner::{Provisioner, ProvisionerConfig};
use chorus_producers::rpc::NatsTransport;
use chorus_producers::streams::{ensure_platform_streams, StreamLimits};

use crate::cli_agent::{open_backbone, terminated};

#[derive(clap::Args)]
pub struct ProvisionArgs {
    /// Provisioner configuration (YAML): steps, components, state_dir, concurrency, sweep
    /// interval, backoff; see docs/CONSUMERS.md.
    #[arg(long, short)]
    config: PathBuf,
    /// NATS server(s) holding the streams, comma-separated; nodes are reached over them too.
    #[arg(long, env = "CHORUS_NATS")]
    nats: Option<String>,
    /// Embedded store directory holding the streams (instead of --nats); its platform streams
    /// are created when missing.
    #[arg(long)]
    embedded: Option<PathBuf>,
    /// NATS server(s) the nodes answer RPC on, comma-separated [default: --nats]; required
    /// with --embedded.
    #[arg(long)]
    rpc_nats: Option<String>,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address, e.g. 127.0.0.1:9102.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// Runs the provisioner until SIGTERM or Ctrl-C (attempts in progress finish their step).
pub async fn run(args: ProvisionArgs) -> anyhow::Result<()> {
    let config = ProvisionerConfig::load(&args.config)?;
    let backbone = match (&args.nats, &args.embedded) {
        (Some(nats), None) => open_backbone(Some(nats), Path::new(".")).await?,
        (None, Some(path)) => {
            let backbone = open_backbone(None, path).await?;
            ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
            backbone
        }
        (Some(_), Some(_)) => anyhow::bail!("give either --nats or --embedded, not both"),
        (None, None) => anyhow::bail!("give --nats URL (or CHORUS_NATS) or --embedded PATH"),
    };
    let rpc_urls = args
        .rpc_nats
        .as_deref()
        .or(args.nats.as_deref())
        .context("nodes are reached over NATS: give --rpc-nats URL with --embedded")?;
    let client = NatsConfig::from_url_list(rpc_urls).connect(None).await.context("connecting to NATS for RPC")?;
    let steps = config.steps.len();
    let provisioner = Provisioner::start(backbone, Arc::new(NatsTransport::new(client)), config).await?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = match args.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
            eprintln!("metrics on http://{}/metrics, health on /healthz", listener.local_addr()?);
            Some(tokio::spawn(chorus_consumers::provisioner::http::serve(listener, provisioner.monitor(), async {
                let _ = http_stopped.await;
            })))
        }
        None => None,
    };
    eprintln!("chorus provision running ({steps} steps); SIGTERM to stop");
    tokio::select! {
        _ = terminated() => {}
        _ = async { while !provisioner.is_finished() { tokio::time::sleep(Duration::from_millis(500)).await } } => {}
    }
    let stats = provisioner.stats();
    let counts = provisioner.counts()?;
    provisioner.stop().await?;
    let _ = stop_http.send(());
    if let Some(http) = http {
        http.await??;
    }
    eprintln!(
        "provisioned {} nodes in this run ({} failed attempts, {} retries, {} dead-lettered); {} provisioned, {} pending, {} failed in total",
        stats.provisioned, stats.failed, stats.retries, stats.dead_lettered, counts.provisioned, counts.pending, counts.failed
    );
    Ok(())
}
