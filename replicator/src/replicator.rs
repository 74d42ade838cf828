//! Starting and stopping the copiers of a replicator process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::JetStreamBackbone;
use chorus_backbone::{Backbone, BucketConfig};
use chorus_platform::election::{Candidate, ElectionConfig, Leadership};
use chorus_runtime::{BoxError, Health, Observable, Ops, Service, ServiceError, Shutdown, TaskMonitor, Tasks};
use prometheus_client::registry::Registry;

use crate::checkpoint::Checkpoints;
use crate::config::{EndpointConfig, LinkConfig, ReplicatorConfig, StreamLink};
use crate::copier::Copier;
use crate::error::{ReplicatorError, Result};
use crate::metrics::{CopierHealth, HealthReport, Metrics};
use crate::native::{Ended, Sourcing};
use crate::path::{self, Chosen, NativeChoice};
use crate::progress::Progress;
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
    election: Option<ElectionConfig>,
}

impl Replicator {
    /// A replicator keeping its checkpoints in `state_dir`.
    pub fn new(state_dir: &std::path::Path) -> Result<Self> {
        Ok(Replicator {
            checkpoints: Checkpoints::open(state_dir)?,
            metrics: Arc::new(Metrics::default()),
            links: Vec::new(),
            listen: None,
            election: None,
        })
    }

    /// Runs as one of several instances of which only the elected leader copies. The
    /// election and the checkpoints are kept on the first link's target (the hub), so the
    /// instance that takes over resumes from the leader's last checkpoint.
    pub fn elect(&mut self, election: ElectionConfig) -> &mut Self {
        self.election = Some(election);
        self
    }

    /// Validates `config` and connects every endpoint it names.
    pub async fn from_config(config: &ReplicatorConfig) -> Result<Self> {
        chorus_runtime::Config::validate(config)?;
        let mut r = Replicator::new(&config.state_dir)?;
        r.listen = config.listen;
        r.election = config.election.clone();
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

    /// Starts one copier per (link, stream) under `shutdown` (each creates its configured
    /// target stream when it can reach the target), and `/metrics` and `/healthz` when a
    /// listen address is set.
    pub async fn start(mut self, shutdown: Shutdown) -> Result<ReplicatorHandle> {
        let mut tasks = Tasks::new("replicator", shutdown);
        let leadership = match (&self.election, self.links.first()) {
            (Some(election), Some((_, _, hub))) => {
                let name = election.name.clone().unwrap_or_else(|| "replicator".into());
                let bucket = hub.bucket(&BucketConfig::new(format!("REPLICATOR_{name}"))).await?;
                self.checkpoints = Checkpoints::shared(bucket);
                let candidate = Candidate::join(&**hub, "replicator", election)
                    .await
                    .map_err(|e| ReplicatorError::Election(e.to_string()))?;
                let (leadership, campaign) = candidate.campaign(tasks.shutdown().child());
                tasks.spawn(
                    "campaign",
                    async move { campaign.await.map_err(|e| ReplicatorError::Election(e.to_string())) },
                );
                leadership
            }
            _ => Leadership::alone(),
        };
        // Target streams more than one link copies into: those copiers publish with ids.
        let mut targets = std::collections::HashMap::<String, usize>::new();
        for (link, _, _) in &self.links {
            for s in link.streams.iter().filter_map(|s| s.target_stream.as_ref()) {
                *targets.entry(s.name.clone()).or_default() += 1;
            }
        }
        for (link, source, target) in self.links {
            for s in &link.streams {
                let rewrites = s.rewrite.iter().map(Rewrite::new).collect::<Result<Vec<_>>>()?;
                let health = Arc::new(CopierHealth::new(&link.name, &s.stream));
                self.metrics.register_copier(health.clone());
                let alone = s.target_stream.as_ref().is_some_and(|t| targets.get(&t.name) == Some(&1));
                let term = Arc::new(StreamTerm {
                    sequenced: Arc::new(std::sync::atomic::AtomicBool::new(alone)),
                    progress: Progress {
                        link: link.name.clone(),
                        stream: s.stream.clone(),
                        max_backoff: link.max_backoff,
                        checkpoints: self.checkpoints.clone(),
                        metrics: self.metrics.clone(),
                        health,
                    },
                    link: link.clone(),
                    stream: s.clone(),
                    source: source.clone(),
                    target: target.clone(),
                    rewrites,
                });
                let stop = tasks.shutdown().clone();
                let mut leadership = leadership.clone();
                tasks.spawn("copier", async move {
                    loop {
                        tokio::select! {
                            _ = leadership.lead() => {}
                            _ = stop.requested() => return Ok::<_, ReplicatorError>(()),
                        }
                        // A copier (or native source supervisor) per leadership term: one term
                        // for a replicator alone.
                        let ending = stop.child();
                        let run = term.run(ending.clone());
                        tokio::pin!(run);
                        tokio::select! {
                            _ = &mut run => return Ok(()),
                            _ = leadership.lost() => {
                                ending.request();
                                run.await;
                            }
                        }
                    }
                });
            }
        }
        let monitor = Arc::new(Monitor { metrics: self.metrics.clone(), tasks: tasks.monitor() });
        let mut local_addr = None;
        if let Some(addr) = self.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ReplicatorError::Io { context: format!("binding {addr}"), source })?;
            local_addr = listener.local_addr().ok();
            let ops = Ops::new().with(monitor.clone());
            let stop = tasks.shutdown().clone();
            tasks.spawn("http", async move { ops.serve(listener, axum::Router::new(), stop).await });
        }
        Ok(ReplicatorHandle { tasks, monitor, checkpoints: self.checkpoints, local_addr })
    }
}

/// One stream of a link: chooses how it is copied, then copies it or supervises its native
/// source, until stopped.
struct StreamTerm {
    progress: Progress,
    /// Whether the copier may use sequenced publishes (see `Copier::sequenced`).
    sequenced: Arc<std::sync::atomic::AtomicBool>,
    link: LinkConfig,
    stream: StreamLink,
    source: Arc<dyn Backbone>,
    target: Arc<dyn Backbone>,
    rewrites: Vec<Rewrite>,
}

impl StreamTerm {
    async fn run(&self, stop: Shutdown) {
        let p = &self.progress;
        let mut backoff = p.backoff();
        let chosen = loop {
            let Some(checkpoint) = p.load(&stop).await else { return };
            let sequenced =
                self.sequenced.load(std::sync::atomic::Ordering::Relaxed) && self.stream.target_stream.is_some();
            match path::choose(&self.link, &self.stream, &*self.source, &*self.target, checkpoint, sequenced).await {
                Ok(chosen) => break chosen,
                Err((side, why)) => {
                    p.fail(side, why);
                    if !backoff.wait(&stop).await {
                        return;
                    }
                }
            }
        };
        let (path, why) = match &chosen {
            Chosen::Copy { why } => ("copy", why.clone()),
            Chosen::Native(n) => ("native", n.note.clone()),
        };
        tracing::info!(link = %p.link, stream = %p.stream, path, "{why}");
        p.chose(path, why);
        match chosen {
            Chosen::Copy { .. } => self.copier().run(stop).await,
            Chosen::Native(n) => {
                let NativeChoice { source, target, create, engines: (from, into), .. } = *n;
                let sourcing = Sourcing {
                    progress: p.clone(),
                    source: from,
                    target: into,
                    target_stream: target,
                    create,
                    spec: source,
                    // A copier has at most its channel's batches and one merged batch in flight.
                    handoff_scan: (self.link.batch as u64 * 6).max(10_000),
                };
                if let Ended::Stalled { at, why } = sourcing.run(stop.clone()).await {
                    tracing::warn!(link = %p.link, stream = %p.stream, at, "{why}");
                    p.fail("target", why.clone());
                    p.chose("copy", why);
                    self.copier().run(stop).await
                }
            }
        }
    }

    fn copier(&self) -> Copier {
        let (link, s) = (&self.link, &self.stream);
        Copier {
            progress: self.progress.clone(),
            source: self.source.clone(),
            target: self.target.clone(),
            target_stream: s.target_stream.clone(),
            filter_subjects: s.filter_subjects.clone(),
            rewrites: self.rewrites.clone(),
            source_site: link.source_site.clone(),
            target_site: link.target_site.clone(),
            sampler: link.sampling.as_ref().map(|c| Sampler::new(c.interval, c.subjects.clone())),
            batch: link.batch,
            sequenced: self.sequenced.clone(),
        }
    }
}

/// Opens an endpoint. A NATS one connects in the background, so the replicator starts while
/// a site or its hub is down: the copiers retry with backoff and health says so meanwhile.
async fn connect(endpoint: &EndpointConfig) -> Result<Arc<dyn Backbone>> {
    Ok(match endpoint {
        EndpointConfig::Nats(n) => {
            let n = chorus_backbone::jetstream::NatsConfig { retry_on_initial_connect: true, ..n.clone() };
            Arc::new(JetStreamBackbone::connect(&n).await?)
        }
        EndpointConfig::Embedded(e) => Arc::new(EmbeddedBackbone::open(e.clone())?),
    })
}

/// The replicator as `/metrics` and `/healthz` see it: healthy while every copier runs and
/// none has been failing for long.
pub struct Monitor {
    metrics: Arc<Metrics>,
    tasks: TaskMonitor,
}

#[async_trait]
impl Observable for Monitor {
    fn name(&self) -> &str {
        "replicator"
    }

    fn health(&self) -> Health {
        let copiers = self.metrics.health();
        let failing: Vec<String> = copiers
            .iter()
            .filter(|c| !c.healthy)
            .map(|c| format!("{}/{}: {}", c.link, c.stream, c.last_error.as_deref().unwrap_or("failing")))
            .collect();
        let copies = if failing.is_empty() { Health::ok() } else { Health::failing(failing.join("; ")) };
        self.tasks.health().and(copies).with("copiers", &copiers)
    }

    async fn collect(&self, registry: &mut Registry) -> std::result::Result<(), BoxError> {
        self.metrics.register(registry.sub_registry_with_prefix("chorus_replicator"));
        Ok(())
    }
}

/// A running replicator: a runtime [`Service`].
pub struct ReplicatorHandle {
    tasks: Tasks,
    monitor: Arc<Monitor>,
    checkpoints: Checkpoints,
    local_addr: Option<SocketAddr>,
}

impl ReplicatorHandle {
    /// The metric families.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.monitor.metrics
    }

    /// Health of every copier.
    pub fn copiers(&self) -> Vec<HealthReport> {
        self.monitor.metrics.health()
    }

    /// What `/metrics` and `/healthz` serve, for a process that serves them itself.
    pub fn monitor(&self) -> Arc<Monitor> {
        self.monitor.clone()
    }

    /// Where `/metrics` and `/healthz` are served, when configured.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Last source sequence the target holds for a link's stream.
    pub async fn checkpoint(&self, link: &str, stream: &str) -> Result<u64> {
        self.checkpoints.load(&Checkpoints::key(link, stream)).await
    }

    /// Waits until every copier has copied up to its source stream's end (lag 0 on two
    /// consecutive readings) or `timeout` passes; returns whether it caught up.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut zero = 0;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.copiers().iter().all(|h| h.lag_events == 0 && h.checkpoint > 0) {
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
}

#[async_trait]
impl Service for ReplicatorHandle {
    fn name(&self) -> &str {
        "replicator"
    }

    fn health(&self) -> Health {
        self.monitor.health()
    }

    fn failed(&self) -> bool {
        self.tasks.failed()
    }

    /// Stops every copier after its current publish and checkpoint.
    async fn stop(&mut self) -> std::result::Result<(), ServiceError> {
        self.tasks.stop().await
    }
}
