//! `chorus react`: rules that watch the streams and act, exactly once per (rule, event).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use chorus_consumers::reactor::{Reactor, ReactorConfig};
use chorus_platform::{platform_streams, resolve_platform_streams, StreamLimits};
use chorus_rpc::Transport;
use chorus_runtime::{Services, Shutdown};
use chorus_schemas::subject::CHORUS_REACTOR;

use crate::args::{OpsServer, StreamArgs};
use crate::signal::until_signal_or_failure;

/// Arguments of `chorus react`.
#[derive(clap::Args)]
pub struct ReactArgs {
    /// Reactor configuration (YAML): name, state_dir and rules; see docs/REACTOR.md.
    #[arg(long, short)]
    config: PathBuf,
    #[command(flatten)]
    streams: StreamArgs,
    /// NATS server(s) RPC actions are made on, comma-separated [default: --nats].
    #[arg(long)]
    rpc_nats: Option<String>,
    /// Print what would fire (the `fired` records, one JSON line each) and change nothing:
    /// no action runs, no record is published, no position moves.
    #[arg(long)]
    dry_run: bool,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address, e.g. 127.0.0.1:9103.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

/// Runs the reactor until SIGTERM or Ctrl-C, or until it fails.
pub async fn run(args: ReactArgs) -> anyhow::Result<()> {
    let mut config = ReactorConfig::load(&args.config)?;
    let backbone = args.streams.open_for_service().await?;
    if args.streams.embedded() || backbone.connected() {
        // The reactor's own stream (and the platform's, on the embedded store) are made;
        // rules name the platform streams by their Chorus names, which a stream map can
        // point at Choria's.
        let overrides = args.streams.stream_map();
        let found =
            resolve_platform_streams(&*backbone, &StreamLimits::default(), &overrides, args.streams.embedded()).await?;
        if found.missing.iter().any(|m| m == CHORUS_REACTOR) {
            // The reactor's own records: made like the dead-letter stream, by their writer.
            let wanted = platform_streams(&StreamLimits::default()).into_iter().find(|s| s.name == CHORUS_REACTOR);
            if let Some(wanted) = wanted {
                backbone.ensure_stream(&wanted).await.context("creating the reactor's stream")?;
            }
        }
        if let Some(actual) = found.holding(CHORUS_REACTOR) {
            config.records_stream = actual.to_owned();
        }
        for rule in &mut config.rules {
            if let Some(actual) = found.holding(&rule.matches.stream) {
                rule.matches.stream = actual.to_owned();
            }
        }
    }
    let transport: Option<Arc<dyn Transport>> = match args.rpc_nats.as_deref().or(args.streams.nats.as_deref()) {
        Some(urls) => Some(crate::args::service_rpc_transport(urls).await?),
        None => None,
    };
    let rules = config.rules.len();
    let reactor = Reactor::start(backbone, transport, config, args.dry_run, Shutdown::new()).await?;
    let monitor = reactor.monitor();
    let http = OpsServer::start(args.listen, Arc::new(monitor.clone())).await?;
    let mut services = Services::new();
    services.push(reactor);
    eprintln!("chorus react running ({rules} rules{}); SIGTERM to stop", if args.dry_run { ", dry run" } else { "" });
    until_signal_or_failure(&services).await;
    let stopped = services.stop().await;
    http.stop().await?;
    let s = monitor.stats();
    eprintln!(
        "evaluated {} events: {} matches, {} firings ({} held back), {} actions succeeded, {} failed, {} dead-lettered",
        s.evaluated, s.matched, s.fired, s.suppressed, s.actions_succeeded, s.actions_failed, s.dead_lettered
    );
    Ok(stopped?)
}
