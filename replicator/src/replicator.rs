//! Starting and stopping the copiers of a replicator process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::JetStreamBackbone;
use chorus_backbone::Backbone;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::checkpoint::Checkpoints;
use crate::config::{EndpointConfig, LinkConfig, ReplicatorConfig};
use crate::copier::Copier;
use crate::error::{ReplicatorError, Result};
use crate::metrics::{CopierHealth, HealthReport, Metrics};
use crate::rewrite::Rewrite;
use crate::sampling::Sampler;

/// A replicator being assembled: links with their source and target backbones.
///
/// A link with its source and target backbones.
type Link = (LinkConfig, Arc<dyn Backbone>, Arc<dyn Backbone>);

/// [`Replicator::from_config`] connects the endpoints a configuration names; in-process
/// users (`chorus up`, tests) hand over backbones they already hold with
/// [`Replicator::add_link`].
pub struct Replicator {
    checkpoints: Checkpoints,
    metrics: Arc<Metrics>,
    links: Vec<Link>,
    listen: Option<SocketAddr>,
}

impl Replicator {
    /// A replicator keeping its checkpoints in `state_dir`.
    pub fn new(state_dir: &std::path::Path) -> Result<Self> {
        Ok(Replicator {
            checkpoints: Checkpoints::open(state_dir)?,
            metrics: Arc::new(Metrics::default()),
            links: Vec::new(),
            listen: None,
        })
    }

    /// Validates `config` and connects every endpoint it names.
    pub async fn from_config(config: &ReplicatorConfig) -> Result<Self> {
        config.validate()?;
        let mut r = Replicator::new(&config.state_dir)?;
        r.listen = config.listen;
        for link in &config.links {
            let source = connect(&link.source).await?;
            let target = connect(&link.target).await?;
            r.links.push((link.clone(), source, target));
        }
        Ok(r)
    }

    /// Adds a link whose endpoints the caller already holds (`link.source`/`link.target`
    /// are then ignored).
    pub fn add_link(&mut self, link: LinkConfig, source: Arc<dyn Backbone>, target: Arc<dyn Backbone>) -> &mut Self {
        self.links.push((link, source, target));
        self
    }

    /// Serves `/metrics` and `/healthz` on `addr` once started.
    pub fn listen(&mut self, addr: SocketAddr) -> &mut Self {
        self.listen = Some(addr);
        self
    }

    /// Creates configured target streams, then starts one copier per (link, stream).
    pub async fn start(self) -> Result<ReplicatorHandle> {
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for (link, source, target) in self.links {
            for s in &link.streams {
                if let Some(cfg) = &s.target_stream {
                    target.ensure_stream(cfg).await?;
                }
                let rewrites = s.rewrite.iter().map(Rewrite::new).collect::<Result<Vec<_>>>()?;
                let health = Arc::new(CopierHealth::new(&link.name, &s.stream));
                self.metrics.register_copier(health.clone());
                let copier = Copier {
                    link: link.name.clone(),
                    stream: s.stream.clone(),
                    source: source.clone(),
                    target: target.clone(),
                    filter_subjects: s.filter_subjects.clone(),
                    rewrites,
                    source_site: link.source_site.clone(),
                    target_site: link.target_site.clone(),
                    sampler: link.sampling.as_ref().map(|c| Sampler::new(c.interval, c.subjects.clone())),
                    batch: link.batch,
                    max_backoff: link.max_backoff,
                    checkpoints: self.checkpoints.clone(),
                    metrics: self.metrics.clone(),
                    health,
                };
                tasks.spawn(copier.run(stop_rx.clone()));
            }
        }
        let mut local_addr = None;
        if let Some(addr) = self.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ReplicatorError::Io { context: format!("binding {addr}"), source })?;
            local_addr = listener.local_addr().ok();
            let app = crate::http::router(self.metrics.clone());
            let mut stop_http = stop_rx.clone();
            tasks.spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_http.wait_for(|s| *s).await;
                    })
                    .await;
            });
        }
        Ok(ReplicatorHandle { stop, tasks, metrics: self.metrics, checkpoints: self.checkpoints, local_addr })
    }
}

async fn connect(endpoint: &EndpointConfig) -> Result<Arc<dyn Backbone>> {
    Ok(match endpoint {
        EndpointConfig::Nats(n) => Arc::new(JetStreamBackbone::connect(n).await?),
        EndpointConfig::Embedded(e) => Arc::new(EmbeddedBackbone::open(e.clone())?),
    })
}

/// A running replicator.
pub struct ReplicatorHandle {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    metrics: Arc<Metrics>,
    checkpoints: Checkpoints,
    local_addr: Option<SocketAddr>,
}

impl ReplicatorHandle {
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Health of every copier.
    pub fn health(&self) -> Vec<HealthReport> {
        self.metrics.health()
    }

    /// Where `/metrics` and `/healthz` are served, when configured.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Last source sequence the target holds for a link's stream.
    pub fn checkpoint(&self, link: &str, stream: &str) -> Result<u64> {
        self.checkpoints.load(&Checkpoints::key(link, stream))
    }

    /// Waits until every copier has copied up to its source stream's end (lag 0 on two
    /// consecutive readings) or `timeout` passes; returns whether it caught up.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut zero = 0;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.health().iter().all(|h| h.lag_events == 0 && h.checkpoint > 0) {
                zero += 1;
                if zero >= 2 {
                    return true;
                }
            } else {
                zero = 0;
            }
        }
        false
    }

    /// Stops every copier after its current publish and checkpoint.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// What `chorus replicate --config FILE` does: loads the configuration, starts every link
/// and runs until SIGINT or SIGTERM, then stops after the batches in flight.
pub async fn run_until_signal(config_path: &std::path::Path) -> Result<()> {
    let config = ReplicatorConfig::load(config_path)?;
    let handle = Replicator::from_config(&config).await?.start().await?;
    if let Some(addr) = handle.local_addr() {
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| ReplicatorError::Io { context: "installing the SIGTERM handler".into(), source })?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.stop().await;
    Ok(())
}
