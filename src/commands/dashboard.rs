//! `chorus dashboard`: the inventory projection and the dashboard over existing streams.

use std::net::SocketAddr;
use std::path::PathBuf;

use chorus_consumers::dashboard::{Views, ViewsOptions};
use chorus_consumers::inventory::StatusPolicy;
use chorus_runtime::{Services, Shutdown};
use chorus_schemas::signature::Verifier;

use crate::args::StreamArgs;
use crate::signal::until_signal_or_failure;

/// Arguments of `chorus dashboard`.
#[derive(clap::Args)]
pub struct DashboardArgs {
    /// Where the dashboard listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    streams: StreamArgs,
    /// Directory of the local view store [default: <data>/views].
    #[arg(long)]
    state: Option<PathBuf>,
    /// Rebuild the inventory from the first event.
    #[arg(long)]
    rebuild: bool,
    /// Accept only events signed by these public keys (files, or directories of `.pub`
    /// files); forged and unsigned events go to the dead-letter stream with the reason.
    #[arg(long)]
    trust: Vec<PathBuf>,
}

/// Serves the dashboard until SIGTERM, or until the projection fails.
pub async fn run(args: DashboardArgs) -> anyhow::Result<()> {
    let backbone = args.streams.open().await?;
    let verifier = if args.trust.is_empty() {
        None
    } else {
        let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) = args.trust.iter().cloned().partition(|p| p.is_dir());
        Some(Verifier::from_paths(files, dirs).map_err(|e| anyhow::anyhow!("--trust: {e}"))?)
    };
    let options = ViewsOptions {
        state: args.state.clone().unwrap_or_else(|| args.streams.views_dir()),
        listen: args.listen,
        rebuild: args.rebuild,
        policy: StatusPolicy::default(),
    };
    let views = Views::start(backbone, &options, verifier, Shutdown::new()).await?;
    println!("Dashboard: {}", views.url());
    let mut services = Services::new();
    services.push(views);
    until_signal_or_failure(&services).await;
    services.stop().await?;
    Ok(())
}
