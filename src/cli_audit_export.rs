//! `chorus audit-export`: audit and RPC records out to a SIEM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use chorus_backbone::jetstream::JetStreamBackbone;
use chorus_backbone::Backbone;
use chorus_consumers::audit_export::{self, ExportConfig};
use chorus_producers::streams::{ensure_platform_streams, StreamLimits};

use crate::cli_agent::{open_backbone, terminated};

#[derive(clap::Args)]
pub struct AuditExportArgs {
    /// Exporter configuration (YAML): sink (syslog, hec, jsonl) and its settings, streams,
    /// consumer name, batch size, backoff; see docs/CONSUMERS.md.
    #[arg(long, short)]
    config: PathBuf,
    /// NATS server(s), comma-separated, when the configuration has no `nats` section;
    /// without either, an embedded store in --data.
    #[arg(long, env = "CHORUS_NATS")]
    nats: Option<String>,
    /// Embedded store directory when there is neither `nats` in the configuration nor --nats.
    #[arg(long, default_value = "chorus-data")]
    data: PathBuf,
}

/// Runs the exporter until SIGTERM or Ctrl-C; fails fast on a bad configuration.
pub async fn run(args: AuditExportArgs) -> anyhow::Result<()> {
    let config = ExportConfig::load(&args.config)?;
    let backbone: Arc<dyn Backbone> = match (&config.nats, &args.nats) {
        (Some(nats), _) => Arc::new(JetStreamBackbone::connect(nats).await.context("connecting to NATS")?),
        (None, nats) => {
            let embedded = nats.is_none();
            let backbone = open_backbone(nats.as_deref(), &args.data).await?;
            // A private embedded store has nobody else to create the streams; on NATS they
            // belong to the platform and their limits are left alone.
            if embedded {
                ensure_platform_streams(&*backbone, &StreamLimits::default()).await?;
            }
            backbone
        }
    };
    let sink = config.sink.kind();
    let handle = audit_export::spawn(backbone, config).await?;
    eprintln!("chorus audit-export to {sink} running; SIGTERM to stop");
    tokio::select! {
        _ = terminated() => {}
        _ = async { while !handle.is_finished() { tokio::time::sleep(std::time::Duration::from_millis(500)).await } } => {}
    }
    let stats = handle.stats().snapshot();
    handle.stop().await?;
    eprintln!(
        "exported {} records ({} dead-lettered, {} retries, {} re-sent after reconnects)",
        stats.exported, stats.dead_lettered, stats.retries, stats.resent
    );
    Ok(())
}
