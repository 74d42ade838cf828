//! The running provisioner: its tasks, its state, and how it starts, reports and stops.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chorus_backbone::Backbone;
use chorus_platform::election::{Candidate, Leadership};
use chorus_platform::{BackboneSink, Emitter, EventSink};
use chorus_rpc::{RpcClient, Transport};
use chorus_runtime::{Config, Health, Service, ServiceError, Shutdown, TaskMonitor, Tasks};
use tokio::sync::{mpsc, watch, Semaphore};

use super::config::ProvisionerConfig;
use super::error::ProvisionerError;
use super::record::{NodeRecord, NodeStatus};
use super::stats::{ProvisionerStats, StatsSnapshot, StatusCounts};
use super::store::StateStore;

/// A running provisioner: a consumer task reading `CHORUS_LIFECYCLE` and a dispatcher task
/// running provisioning attempts; a runtime [`Service`](chorus_runtime::Service).
pub struct Provisioner {
    shared: Arc<Shared>,
    tasks: Tasks,
    stopped: bool,
}

pub(super) struct Shared {
    pub(super) config: ProvisionerConfig,
    pub(super) backbone: Arc<dyn Backbone>,
    pub(super) rpc: RpcClient,
    pub(super) store: StateStore,
    /// Stamps the `provisioned` events with the provisioner's own sequence (persisted in the
    /// state store) and site. Replaced by one further on when the stream shows events of this
    /// component with higher sequences (a state directory rebuilt from the stream).
    pub(super) emitter: Mutex<Emitter>,
    pub(super) sink: Arc<dyn EventSink>,
    pub(super) stats: Arc<ProvisionerStats>,
    /// Identities with a task (waiting for a slot or running): never two at once.
    pub(super) in_flight: Mutex<HashSet<String>>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) shutdown: Shutdown,
    /// True once the consumer has read everything stored when it started.
    pub(super) caught_up: watch::Sender<bool>,
    /// Why the provisioner cannot read its stream yet (missing, broker unreachable).
    pub(super) reading: chorus_platform::ReadStatus,
    /// Whether this instance provisions (always, unless it is in an election).
    pub(super) leadership: Leadership,
    /// Counts the fetches that found nothing to read: one that started after a moment
    /// means everything stored before that moment has been read.
    pub(super) idle: watch::Sender<u64>,
    /// The steps every node goes through ([`ProvisionerConfig::effective_steps`]).
    pub(super) steps: Vec<super::config::Step>,
    /// Issues credentials, when nodes are enrolled.
    pub(super) enroller: Option<super::enrol::Enroller>,
}

impl Shared {
    fn counts(&self) -> Result<StatusCounts, ProvisionerError> {
        let mut c = StatusCounts::default();
        for n in self.store.all()? {
            match n.status {
                NodeStatus::Pending => c.pending += 1,
                NodeStatus::Failed => c.failed += 1,
                NodeStatus::Provisioned => c.provisioned += 1,
            }
        }
        Ok(c)
    }
}

/// A read-only view of a running provisioner for monitoring (its `/metrics` and `/healthz`
/// through [`chorus_runtime::Ops`]): cheap to clone, usable after the [`Provisioner`] itself
/// was moved into whatever stops it. It keeps the state store open: drop it before starting
/// another provisioner on the same `state_dir` (for counters alone,
/// [`Provisioner::stats_handle`] holds nothing else).
#[derive(Clone)]
pub struct Monitor {
    pub(super) shared: Arc<Shared>,
    pub(super) tasks: TaskMonitor,
}

impl Monitor {
    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Nodes by status (reads the whole state store: call it off the async threads for
    /// large fleets).
    pub fn counts(&self) -> Result<StatusCounts, ProvisionerError> {
        self.shared.counts()
    }

    /// See [`Provisioner::caught_up`].
    pub fn caught_up(&self) -> bool {
        *self.shared.caught_up.borrow()
    }

    /// Healthy while both tasks run (not once stopped or failed); says whether the backlog
    /// has been read (before that nothing is provisioned, which is normal after a start).
    pub fn health(&self) -> Health {
        let stats = self.stats();
        let health = self
            .tasks
            .health()
            .with("caught_up", self.caught_up())
            .with("in_flight", stats.in_flight)
            .with("queued", stats.queued);
        health.and(self.shared.reading.health())
    }
}

/// Removes an identity from the in-flight set when its task ends, however it ends.
pub(super) struct InFlight {
    pub(super) shared: Arc<Shared>,
    pub(super) identity: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.identity);
    }
}

/// What one consumed message asks for.
pub(super) enum Applied {
    Nothing,
    Due(String),
    Reject(&'static str, String),
}

impl Provisioner {
    /// Opens the state in `config.state_dir` and starts provisioning under `shutdown`; its
    /// consumer task opens the dead-letter stream (created when missing) and the durable
    /// consumer on the lifecycle stream ([`ProvisionerConfig::lifecycle_stream`]), retried
    /// until it can. Requests go out on `transport` as `config.callerid` in
    /// `config.collective`.
    pub async fn start(
        backbone: Arc<dyn Backbone>,
        transport: Arc<dyn Transport>,
        config: ProvisionerConfig,
        shutdown: Shutdown,
    ) -> Result<Provisioner, ProvisionerError> {
        config.validate()?;
        let store = StateStore::open(&config.state_dir)?;
        let mut rpc = match &config.security {
            Some(security) => security.client(transport, config.collective.clone())?,
            None => RpcClient::new(transport, config.callerid.clone(), config.collective.clone()),
        };
        if let Some(sender) = &config.senderid {
            rpc = rpc.with_senderid(sender.clone());
        }
        let sink: Arc<dyn EventSink> = Arc::new(BackboneSink(backbone.clone()));
        let emitter = Mutex::new(Emitter::new(sink.clone(), store.next_seq()?, config.site.clone()));
        let (due_tx, due_rx) = mpsc::unbounded_channel();
        let tasks = Tasks::new("provisioner", shutdown);
        let reading = chorus_platform::ReadStatus::starting([config.lifecycle_stream()]);
        let (leadership, campaign) = match &config.election {
            Some(election) => {
                let candidate = Candidate::join(&*backbone, "provisioner", election)
                    .await
                    .map_err(|e| ProvisionerError::Election(e.to_string()))?;
                let (leadership, task) = candidate.campaign(tasks.shutdown().child());
                (leadership, Some(task))
            }
            None => (Leadership::alone(), None),
        };
        let enroller = match &config.enrol {
            Some(e) => Some(
                super::enrol::Enroller::open(e)
                    .map_err(|e| ProvisionerError::Config(chorus_runtime::ConfigError::message(e)))?,
            ),
            None => None,
        };
        let steps = config.effective_steps();
        let shared = Arc::new(Shared {
            steps,
            enroller,
            permits: Arc::new(Semaphore::new(config.concurrency)),
            config,
            backbone,
            rpc,
            store,
            emitter,
            sink,
            stats: Arc::default(),
            in_flight: Mutex::new(HashSet::new()),
            shutdown: tasks.shutdown().clone(),
            caught_up: watch::channel(false).0,
            reading,
            leadership,
            idle: watch::channel(0).0,
        });
        let mut tasks = tasks;
        if let Some(campaign) = campaign {
            tasks.spawn(
                "campaign",
                async move { campaign.await.map_err(|e| ProvisionerError::Election(e.to_string())) },
            );
        }
        // The stream is opened by the consumer task, retried while it is missing or the broker
        // is down, so the provisioner starts either way (not ready meanwhile, with the reason).
        tasks.spawn("consume", super::consume::consume(shared.clone(), due_tx));
        tasks.spawn("dispatch", super::dispatch::dispatch_loop(shared.clone(), due_rx));
        Ok(Provisioner { shared, tasks, stopped: false })
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Whether this instance provisions now (always, unless it is in an election).
    pub fn is_leader(&self) -> bool {
        self.shared.leadership.is_leader()
    }

    /// The live counters, for a metrics exporter.
    pub fn stats_handle(&self) -> Arc<ProvisionerStats> {
        self.shared.stats.clone()
    }

    /// The record of one node.
    pub fn node(&self, identity: &str) -> Result<Option<NodeRecord>, ProvisionerError> {
        self.shared.store.get(identity)
    }

    /// Every node record, in identity order.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, ProvisionerError> {
        self.shared.store.all()
    }

    /// Nodes by status.
    pub fn counts(&self) -> Result<StatusCounts, ProvisionerError> {
        self.shared.counts()
    }

    /// A monitoring handle (metrics, health) that outlives moves of the provisioner.
    pub fn monitor(&self) -> Monitor {
        Monitor { shared: self.shared.clone(), tasks: self.tasks.monitor() }
    }

    /// Whether the consumer has read everything that was stored when it started (until then
    /// nothing is provisioned).
    pub fn caught_up(&self) -> bool {
        *self.shared.caught_up.borrow()
    }
}

#[async_trait::async_trait]
impl Service for Provisioner {
    fn name(&self) -> &str {
        "provisioner"
    }

    fn health(&self) -> Health {
        self.monitor().health()
    }

    fn failed(&self) -> bool {
        self.tasks.failed()
    }

    /// Stops gracefully: no new event is read and no new attempt starts; attempts in progress
    /// finish the step they are in, record it, and stop, so a restarted provisioner resumes
    /// them at the next step. Reports every task that failed, and a final flush that did.
    async fn stop(&mut self) -> Result<(), ServiceError> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        let tasks = self.tasks.stop().await;
        let flushed = self.shared.store.flush().await;
        match (tasks, flushed) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(e)) => Err(ServiceError::new("provisioner", "final flush", e)),
            (Err(mut e), Err(f)) => {
                e.failures.extend(ServiceError::new("provisioner", "final flush", f).failures);
                Err(e)
            }
            (Err(e), Ok(())) => Err(e),
        }
    }
}
