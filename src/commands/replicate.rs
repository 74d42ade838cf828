//! `chorus replicate`: site → hub federation.

use chorus_replicator::{Replicator, ReplicatorConfig};
use chorus_runtime::{Services, Shutdown};

use crate::signal::terminated;

/// Arguments of `chorus replicate`.
#[derive(clap::Args)]
pub struct ReplicateArgs {
    /// Replicator configuration (YAML): links, streams, sampling, state directory.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Serve `/metrics` and `/healthz` here instead of the configuration's `listen`.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// Loads the configuration, starts every link and runs until SIGINT or SIGTERM, then stops
/// after the batches in flight. A failing copier is retried forever and reported in
/// `/healthz`; it does not stop the process, since giving up would lose events.
pub async fn run(args: ReplicateArgs) -> anyhow::Result<()> {
    let mut config = ReplicatorConfig::load(&args.config)?;
    if let Some(listen) = args.listen {
        config.listen = Some(listen);
    }
    let handle = Replicator::from_config(&config).await?.start(Shutdown::new()).await?;
    if let Some(addr) = handle.local_addr() {
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    let mut services = Services::new();
    services.push(handle);
    terminated().await;
    services.stop().await?;
    Ok(())
}
