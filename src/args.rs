//! Argument groups shared by the commands, declared once so every command names and defaults
//! them the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;

/// Where the streams are: NATS (`--nats`, or `CHORUS_NATS`), or the embedded store under
/// `--data` (`<data>/streams`, the same place for every command).
#[derive(clap::Args, Clone, Debug)]
pub struct StreamArgs {
    /// NATS server(s) holding the streams, comma separated; without it, the embedded store
    /// in --data.
    #[arg(long, env = "CHORUS_NATS")]
    pub nats: Option<String>,
    /// Chorus's data directory: the embedded store (`streams/`), views (`views/`), and other
    /// local state live under it.
    #[arg(long, default_value = "chorus-data")]
    pub data: PathBuf,
    /// Read a platform stream's subjects from another stream, e.g.
    /// `--use-stream CHORUS_LIFECYCLE=CHORIA_EVENTS` (repeatable). Without it, a stream that
    /// already captures the subjects (Choria Streams' `CHORIA_EVENTS`, `CHORIA_MACHINE`) is
    /// found and used.
    #[arg(long, value_name = "PLATFORM=STREAM", value_parser = chorus_platform::StreamMap::parse_entry)]
    pub use_stream: Vec<(String, String)>,
}

impl StreamArgs {
    /// The embedded store's directory.
    pub fn streams_dir(&self) -> PathBuf {
        self.data.join("streams")
    }

    /// The default directory of local views.
    pub fn views_dir(&self) -> PathBuf {
        self.data.join("views")
    }

    /// The streams the operator named with `--use-stream`.
    pub fn stream_map(&self) -> chorus_platform::StreamMap {
        self.use_stream.iter().fold(chorus_platform::StreamMap::default(), |m, (p, s)| m.with(p, s))
    }

    /// Whether the streams are in the embedded store (no --nats).
    pub fn embedded(&self) -> bool {
        self.nats.is_none()
    }

    /// Opens the backbone the arguments name.
    pub async fn open(&self) -> anyhow::Result<Arc<dyn Backbone>> {
        open_backbone(self.nats.as_deref(), &self.streams_dir()).await
    }

    /// Opens the backbone for a long-running service: a NATS connection is made in the
    /// background, so the service starts while its broker is down (it reports not ready
    /// and retries) instead of exiting.
    pub async fn open_for_service(&self) -> anyhow::Result<Arc<dyn Backbone>> {
        match self.nats.as_deref() {
            Some(urls) => Ok(Arc::new(connect_for_service(NatsConfig::from_url_list(urls)).await?)),
            None => self.open().await,
        }
    }
}

/// Connects a long-running service to NATS in the background: it starts while its broker is
/// down (reporting not ready and retrying) instead of exiting. A broker that is up is
/// connected before this returns (up to 3 s).
pub async fn connect_for_service(config: NatsConfig) -> anyhow::Result<JetStreamBackbone> {
    let config = NatsConfig { retry_on_initial_connect: true, ..config };
    let urls = config.servers.join(",");
    let backbone = JetStreamBackbone::connect(&config).await.with_context(|| format!("connecting to {urls}"))?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    while !backbone.connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(backbone)
}

/// The backbone at NATS `nats` (comma-separated URLs), or the embedded store in `streams`.
pub async fn open_backbone(nats: Option<&str>, streams: &Path) -> anyhow::Result<Arc<dyn Backbone>> {
    Ok(match nats {
        Some(urls) => Arc::new(
            JetStreamBackbone::connect(&NatsConfig::from_url_list(urls))
                .await
                .with_context(|| format!("connecting to {urls}"))?,
        ),
        None => Arc::new(EmbeddedBackbone::open_path(streams).with_context(|| {
            format!(
                "opening the embedded store {} (one process at a time: is another chorus using it?)",
                streams.display()
            )
        })?),
    })
}

/// `/metrics` and `/healthz` of `part` served on `listen` (when given) until the returned
/// server is stopped: what a long-running command's `--listen` does.
pub struct OpsServer {
    stop: chorus_runtime::Shutdown,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl OpsServer {
    /// Binds `listen` and serves `part` there; nothing when `listen` is `None`.
    pub async fn start(
        listen: Option<std::net::SocketAddr>,
        part: Arc<dyn chorus_runtime::Observable>,
    ) -> anyhow::Result<Self> {
        let stop = chorus_runtime::Shutdown::new();
        let task = match listen {
            Some(addr) => {
                let listener =
                    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
                eprintln!("metrics on http://{}/metrics, health on /healthz", listener.local_addr()?);
                let ops = chorus_runtime::Ops::new().with(part);
                let stop = stop.clone();
                Some(tokio::spawn(async move { ops.serve(listener, axum::Router::new(), stop).await }))
            }
            None => None,
        };
        Ok(OpsServer { stop, task })
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.request();
        if let Some(task) = self.task {
            task.await??;
        }
        Ok(())
    }
}

/// The RPC transport of a service that calls nodes (provisioner, reactor): NATS at `urls`,
/// connecting in the background so the service starts while the broker is down.
pub async fn service_rpc_transport(urls: &str) -> anyhow::Result<Arc<dyn chorus_rpc::Transport>> {
    let nats = NatsConfig { retry_on_initial_connect: true, ..NatsConfig::from_url_list(urls) };
    let client = nats.connect(None).await.context("connecting to NATS for RPC")?;
    Ok(Arc::new(chorus_rpc::NatsTransport::new(client)))
}
