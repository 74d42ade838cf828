//! `chorus audit-export`: audit and RPC records out to a SIEM.

use std::path::PathBuf;
use std::sync::Arc;

use chorus_backbone::Backbone;
use chorus_consumers::audit_export::{AuditExport, ExportConfig};
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_runtime::{Services, Shutdown};

use crate::args::{connect_for_service, OpsServer, StreamArgs};
use crate::signal::until_signal_or_failure;

/// Arguments of `chorus audit-export`.
#[derive(clap::Args)]
pub struct AuditExportArgs {
    /// Exporter configuration (YAML): sink (syslog, hec, jsonl) and its settings, streams,
    /// consumer name, batch size, backoff; see docs/CONSUMERS.md. Its `nats` section, when
    /// present, wins over --nats.
    #[arg(long, short)]
    config: PathBuf,
    /// Serve /metrics and /healthz here (503 with the reason while a stream is not read).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    streams: StreamArgs,
}

/// Runs the exporter until SIGTERM or Ctrl-C, or until it fails; fails fast on a bad
/// configuration, starts while its broker is down or its streams missing (not ready, with
/// the reason, until it reads them).
pub async fn run(args: AuditExportArgs) -> anyhow::Result<()> {
    let config = ExportConfig::load(&args.config)?;
    let backbone: Arc<dyn Backbone> = match &config.nats {
        Some(nats) => Arc::new(connect_for_service(nats.clone()).await?),
        None => {
            let backbone = args.streams.open_for_service().await?;
            // A private embedded store has nobody else to create the streams; on NATS they
            // belong to the platform and their limits are left alone.
            if args.streams.embedded() {
                ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
            }
            backbone
        }
    };
    let sink = config.sink.kind();
    let export = AuditExport::start(backbone, config, Shutdown::new()).await?;
    let stats = export.stats().clone();
    let http = OpsServer::start(args.listen, Arc::new(export.monitor())).await?;
    let mut services = Services::new();
    services.push(export);
    eprintln!("chorus audit-export to {sink} running; SIGTERM to stop");
    until_signal_or_failure(&services).await;
    let stopped = services.stop().await;
    http.stop().await?;
    let stats = stats.snapshot();
    eprintln!(
        "exported {} records ({} dead-lettered, {} retries, {} re-sent after reconnects)",
        stats.exported, stats.dead_lettered, stats.retries, stats.resent
    );
    Ok(stopped?)
}
