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
    /// Accept only events signed by the node they are about, under a node credential of
    /// these issuers (public key files, or directories of `.pem`/`.pub` files); forged,
    /// unsigned and misattributed events go to the dead-letter stream with the reason.
    #[arg(long)]
    trust: Vec<PathBuf>,
}

/// Serves the dashboard until SIGTERM, or until the projection fails.
pub async fn run(args: DashboardArgs) -> anyhow::Result<()> {
    let backbone = args.streams.open_for_service().await?;
    let verifier = if args.trust.is_empty() {
        None
    } else {
        let issuers = chorus_identity::Issuers::from_paths(&args.trust).map_err(|e| anyhow::anyhow!("--trust: {e}"))?;
        Some(Verifier::new(std::sync::Arc::new(issuers)))
    };
    let options = ViewsOptions {
        state: args.state.clone().unwrap_or_else(|| args.streams.views_dir()),
        listen: args.listen,
        rebuild: args.rebuild,
        policy: StatusPolicy::default(),
        streams: args.streams.stream_map(),
    };
    let views = Views::start(backbone, &options, verifier, Shutdown::new()).await?;
    println!("Dashboard: {}", views.url());
    let mut services = Services::new();
    services.push(views);
    until_signal_or_failure(&services).await;
    services.stop().await?;
    Ok(())
}
