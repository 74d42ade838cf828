//! The node's offline outbox and the forwarder that empties it into the site backbone.
//!
//! A node writes every event to a local embedded store first, so events survive a broker
//! outage of any length and a node restart; the forwarder ships them in order (one
//! sequential consumer, a batch retried until the site acknowledges it) and only then
//! acknowledges them locally. Event ids make the retries harmless: the site dedupes them.
//!
//! Bounded size, and what gives first: while more than `collapse_alive_after` events wait,
//! new alive events are collapsed (not queued: the next alive after the outage says the same
//! thing); past `drop_watcher_states_after`, watcher state events are dropped too (they are
//! periodic state and are announced again). Startup, shutdown, provisioned, upgraded and
//! governor events, machine transitions, RPC records and audit records are never dropped:
//! they are bounded only by the disk. Forwarded events are purged from the outbox, all but the
//! newest, which keeps the producer's last sequence for the next start.
//!
//! Storage faults heal (see [`healing`]): when the disk is full or the directory read-only,
//! events are refused with the error (never acknowledged unstored), health says so, and the
//! store is reopened without a restart as soon as the directory takes writes again.

mod healing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::{Backbone, ConsumerConfig, Message, StreamConfig};
use chorus_runtime::{Backoff, Health, Shutdown};
use chorus_schemas::lifecycle::Lifecycle;
use chorus_schemas::{Event, EventRecord};
use serde::{Deserialize, Serialize};

use self::healing::HealingStore;
use crate::emitter::to_message;
use crate::{EventSink, PlatformError};

/// Name of the outbox stream inside the node's embedded store.
pub const OUTBOX_STREAM: &str = "OUTBOX";
const FORWARDER: &str = "forwarder";

/// Pauses between attempts to reach an unavailable site: from 100 ms doubling to 5 s.
pub const FORWARD_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(5));

/// Pause of the forwarder between attempts to reopen a broken outbox store (each attempt
/// is a write probe first, so it is cheap while the disk stays broken).
const STORE_RETRY: Duration = Duration::from_millis(500);

/// How often an idle forwarder checks that the site could take the expected subjects.
const SITE_CHECK: Duration = Duration::from_secs(5);

/// The forwarder's durable consumer. A long ack_wait: a batch in hand is retried by the
/// forwarder until delivered, never redelivered behind its back (which could reorder events).
fn forwarder_config() -> ConsumerConfig {
    ConsumerConfig::new(FORWARDER).with_ack_wait(Duration::from_secs(7 * 24 * 3600))
}

/// Limits of the outbox.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxLimits {
    /// Backlog (events) at which new alive events are collapsed instead of queued (default 10,000).
    #[serde(default = "default_collapse")]
    pub collapse_alive_after: u64,
    /// Backlog (events) at which new watcher state events are dropped (default 100,000).
    #[serde(default = "default_drop")]
    pub drop_watcher_states_after: u64,
}

fn default_collapse() -> u64 {
    10_000
}
fn default_drop() -> u64 {
    100_000
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits { collapse_alive_after: default_collapse(), drop_watcher_states_after: default_drop() }
    }
}

/// Counters of the outbox, for metrics and tests.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Highest outbox sequence stored.
    pub stored: AtomicU64,
    /// Highest outbox sequence the site acknowledged (everything at or below it is forwarded).
    pub forwarded: AtomicU64,
    /// Alive events collapsed (not queued) because the backlog reached `collapse_alive_after`.
    pub collapsed_alive: AtomicU64,
    /// Watcher state events dropped because the backlog reached `drop_watcher_states_after`.
    pub dropped_watcher_states: AtomicU64,
    /// Failed publishes of a batch to the site, each retried after a backoff pause.
    pub forward_errors: AtomicU64,
    /// Problems told to the operator: once per kind of failure until forwarding recovers,
    /// however many retries fail meanwhile.
    pub problems_reported: AtomicU64,
    /// Events refused because the outbox could not store them (disk full, read-only): lost,
    /// and said so to their producer, never acknowledged.
    pub refused_by_storage: AtomicU64,
    /// Why the site does not take events now, while it does not (said once per kind).
    pub forward_problem: std::sync::Mutex<Option<String>>,
}

impl OutboxStats {
    /// Records why the site does not take events; said once per kind of problem, not at
    /// every retry.
    fn site_problem(&self, problem: String, error: &dyn std::fmt::Display) {
        let mut current = self.forward_problem.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_deref() == Some(problem.as_str()) {
            tracing::debug!(%error, "forwarding still failing");
            return;
        }
        tracing::warn!(backlog = self.backlog(), %error, "{problem}; the outbox keeps the events and retries");
        self.problems_reported.fetch_add(1, Ordering::Relaxed);
        *current = Some(problem);
    }

    /// Records that the site takes events again.
    fn site_recovered(&self) {
        if let Some(problem) = self.forward_problem.lock().unwrap_or_else(|e| e.into_inner()).take() {
            tracing::info!(was = %problem, "site stores events again; forwarding the outbox");
        }
    }

    /// Events waiting to be forwarded.
    pub fn backlog(&self) -> u64 {
        self.stored.load(Ordering::SeqCst).saturating_sub(self.forwarded.load(Ordering::SeqCst))
    }
}

/// The node's local, durable event queue; an [`EventSink`].
#[derive(Clone)]
pub struct Outbox {
    store: Arc<HealingStore>,
    limits: OutboxLimits,
    stats: Arc<OutboxStats>,
    /// Subjects the site must capture, checked while the forwarder is idle.
    expected: Arc<[String]>,
}

impl Outbox {
    /// Opens the outbox in `store` (the node's embedded store), creating its stream.
    pub async fn open(store: EmbeddedBackbone, limits: OutboxLimits) -> Result<Self, PlatformError> {
        let info = store.ensure_stream(&StreamConfig::new(OUTBOX_STREAM, vec![">".into()])).await?;
        // What waits is what the forwarder's durable consumer has not acknowledged.
        let waiting = store.consumer(OUTBOX_STREAM, &forwarder_config()).await?.pending().await?;
        let stats = Arc::new(OutboxStats::default());
        stats.stored.store(info.last_sequence, Ordering::SeqCst);
        stats.forwarded.store(info.last_sequence.saturating_sub(waiting), Ordering::SeqCst);
        Ok(Outbox { store: Arc::new(HealingStore::new(store)), limits, stats, expected: Arc::new([]) })
    }

    /// Subjects (filters) the site must have streams for; the forwarder checks them while
    /// idle (every 5 s), so health reports missing streams or an unreachable site before
    /// anything waits to be forwarded. Subjects of events already waiting are checked by
    /// forwarding them.
    pub fn expecting(mut self, subjects: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.expected = subjects.into_iter().map(Into::into).collect();
        self
    }

    /// Why the outbox cannot store events now (disk full, read-only directory), while it
    /// cannot: for health. Cleared as soon as it stores again.
    pub fn storage_fault(&self) -> Option<String> {
        self.store.fault()
    }

    /// The outbox's part of its service's health: failing while it cannot store (a storage
    /// fault) or the site does not take what it forwards (unreachable, streams missing),
    /// with the backlog and what was refused.
    pub fn health(&self) -> Health {
        let stats = &self.stats;
        let mut health = Health::ok().with("outbox_backlog", stats.backlog());
        let refused = stats.refused_by_storage.load(Ordering::Relaxed);
        if refused > 0 {
            health = health.with("outbox_refused_by_storage", refused);
        }
        if let Some(fault) = self.storage_fault() {
            health = health.and(Health::failing(format!(
                "the outbox cannot store events ({fault}): they are refused, not kept, until its directory takes writes again"
            )));
        }
        if let Some(problem) = stats.forward_problem.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            health = health
                .and(Health::failing(format!("forwarding: {problem}; {} events wait in the outbox", stats.backlog())));
        }
        health
    }

    /// Storage faults met since start, each healed or still open.
    pub fn storage_faults(&self) -> u64 {
        self.store.faults.load(Ordering::Relaxed)
    }

    /// The store, reopened first when a fault broke it and its directory takes writes again.
    async fn healthy_store(&self) -> Result<(u64, EmbeddedBackbone), PlatformError> {
        if let Some(open) = self.store.open() {
            return Ok(open);
        }
        let (generation, store) = self.store.heal().await?;
        // Counters follow what the reopened store holds (acknowledged before the fault).
        let info = store.stream_info(OUTBOX_STREAM).await?;
        self.stats.stored.fetch_max(info.last_sequence, Ordering::SeqCst);
        Ok((generation, store))
    }

    /// Registers the outbox's counters and backlog, as they are now, as `chorus_outbox_*`
    /// metrics of `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let registry = registry.sub_registry_with_prefix("chorus_outbox");
        let o = &self.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        chorus_runtime::register_counters(
            registry,
            &[
                ("stored", "Events stored in the outbox", n(&o.stored)),
                ("forwarded", "Outbox events the site acknowledged", n(&o.forwarded)),
                (
                    "forward_errors",
                    "Failed publishes of an outbox batch to the site (each retried)",
                    n(&o.forward_errors),
                ),
                (
                    "collapsed_alive",
                    "Alive events not queued because the backlog reached collapse_alive_after",
                    n(&o.collapsed_alive),
                ),
                (
                    "dropped_watcher_states",
                    "Watcher state events dropped because the backlog reached drop_watcher_states_after",
                    n(&o.dropped_watcher_states),
                ),
                (
                    "refused_by_storage",
                    "Events the outbox could not store (disk full, read-only): lost, and said so",
                    n(&o.refused_by_storage),
                ),
                ("storage_faults", "Storage faults met, healed or still open", self.storage_faults()),
            ],
        );
        chorus_runtime::register_gauges(
            registry,
            &[("backlog", "Events waiting in the outbox to be forwarded to the site", o.backlog())],
        );
    }

    /// Live counters, shared by every clone of this outbox.
    pub fn stats(&self) -> &Arc<OutboxStats> {
        &self.stats
    }

    /// The sequence a restarted producer continues from: one past the newest event it stored.
    /// The newest event always stays in the outbox (purges keep it), so this never needs
    /// state of its own.
    pub async fn next_producer_seq(&self) -> Result<u64, PlatformError> {
        let (_, store) = self.healthy_store().await?;
        let info = store.stream_info(OUTBOX_STREAM).await?;
        let last = store.get(OUTBOX_STREAM, info.last_sequence).await?;
        Ok(last.and_then(|m| EventRecord::decode(&m.payload).ok()).map_or(1, |r| r.seq + 1))
    }

    fn admit(&self, record: &EventRecord) -> bool {
        let backlog = self.stats.backlog();
        match &record.data {
            Event::Lifecycle(Lifecycle::Alive(_)) if backlog >= self.limits.collapse_alive_after => {
                self.stats.collapsed_alive.fetch_add(1, Ordering::Relaxed);
                false
            }
            Event::Watcher(_) if backlog >= self.limits.drop_watcher_states_after => {
                self.stats.dropped_watcher_states.fetch_add(1, Ordering::Relaxed);
                false
            }
            _ => true,
        }
    }

    /// Ships the outbox to `site` until `shutdown` is requested, then returns once the
    /// batch in hand is delivered and nothing more waits (a node's last events, its
    /// shutdown event among them, reach the site before it exits). A site that refuses is
    /// retried with [`FORWARD_BACKOFF`]; the events stay in the outbox meanwhile.
    pub async fn forward(
        &self,
        site: Arc<dyn Backbone>,
        batch: usize,
        shutdown: Shutdown,
    ) -> Result<(), PlatformError> {
        let batch = batch.max(1);
        // The consumer of the store's current generation; let go of after a storage fault so
        // that the store can be reopened (sled holds its lock while any handle lives).
        let mut held: Option<(u64, Box<dyn chorus_backbone::Consumer>)> = None;
        let mut retry = FORWARD_BACKOFF.retry();
        let mut site_checked: Option<std::time::Instant> = None;
        loop {
            if shutdown.is_requested() && self.stats.backlog() == 0 {
                return Ok(());
            }
            if held.as_ref().is_some_and(|(g, _)| *g != self.store.generation()) {
                held = None;
            }
            let (generation, consumer) = match &mut held {
                Some((g, c)) => (*g, c),
                None => match self.open_forwarder().await {
                    Ok(opened) => {
                        let (g, c) = held.insert(opened);
                        (*g, c)
                    }
                    // Only a broken store is waited for; any other failure ends the task
                    // (and shows in its service's health).
                    Err(e) if !matches!(&e, PlatformError::Backbone(b) if healing::is_storage_fault(b)) => {
                        return Err(e)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox store not healed yet");
                        tokio::select! {
                            _ = tokio::time::sleep(STORE_RETRY) => {}
                            _ = shutdown.requested(), if !shutdown.is_requested() => {}
                        }
                        if shutdown.is_requested() && self.store.open().is_none() {
                            // Nothing can be read from a broken store: what waits stays on disk.
                            return Ok(());
                        }
                        continue;
                    }
                },
            };
            let fetched = tokio::select! {
                d = consumer.fetch(batch, Duration::from_millis(500)) => d,
                _ = shutdown.requested(), if !shutdown.is_requested() => continue,
            };
            let deliveries = match fetched {
                Ok(d) => d,
                Err(e) if self.store.failed(generation, &e) => {
                    held = None;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if deliveries.is_empty() {
                if shutdown.is_requested() {
                    return Ok(());
                }
                // Idle: whether the site could take what will come is still worth knowing.
                if !self.expected.is_empty() && site_checked.is_none_or(|t| t.elapsed() >= SITE_CHECK) {
                    site_checked = Some(std::time::Instant::now());
                    self.check_site(site.as_ref()).await;
                }
                continue;
            }
            let messages: Vec<Message> = deliveries
                .iter()
                .map(|d| Message::new(d.message.id.clone(), d.message.subject.clone(), d.message.payload.clone()))
                .collect();
            loop {
                match site.publish_batch(messages.clone()).await {
                    Ok(_) => {
                        self.stats.site_recovered();
                        retry.reset();
                        break;
                    }
                    Err(e) => {
                        self.stats.forward_errors.fetch_add(1, Ordering::Relaxed);
                        self.stats.site_problem(forward_problem(&e), &e);
                        tokio::time::sleep(retry.next_delay()).await;
                    }
                }
            }
            let last = deliveries.last().expect("deliveries is not empty");
            let last_seq = last.message.sequence;
            let (_, store) = match self.store.open() {
                Some(open) if open.0 == generation => open,
                // Broken since the fetch: the batch is delivered again after the store is
                // reopened, and the site's dedupe (event ids) stores it once.
                _ => continue,
            };
            let acked = async {
                for d in &deliveries {
                    d.ack().await?;
                }
                // Keep the newest forwarded event: it carries the producer's last sequence.
                store.purge(OUTBOX_STREAM, last_seq).await
            };
            match acked.await {
                Ok(_) => {
                    self.stats.forwarded.fetch_max(last_seq, Ordering::SeqCst);
                }
                Err(e) if self.store.failed(generation, &e) => held = None,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the site is reachable and has streams for the subjects this outbox's producer
    /// publishes on: checked while idle, so a problem shows in health before there is
    /// anything to forward.
    async fn check_site(&self, site: &dyn Backbone) {
        let problem = match site.streams().await {
            Ok(streams) => self
                .expected
                .iter()
                .find(|subject| {
                    !streams
                        .iter()
                        .any(|s| s.subjects.iter().any(|f| chorus_backbone::subject::filter_covers(f, subject)))
                })
                .map(|subject| chorus_backbone::BackboneError::NoStreamForSubject(subject.clone())),
            Err(e) => Some(e),
        };
        match problem {
            Some(e) => self.stats.site_problem(forward_problem(&e), &e),
            None => self.stats.site_recovered(),
        }
    }

    /// The forwarder's consumer on the current store, reopened first when broken.
    async fn open_forwarder(&self) -> Result<(u64, Box<dyn chorus_backbone::Consumer>), PlatformError> {
        let (generation, store) = self.healthy_store().await?;
        match store.consumer(OUTBOX_STREAM, &forwarder_config()).await {
            Ok(consumer) => Ok((generation, consumer)),
            Err(e) => {
                self.store.failed(generation, &e);
                Err(e.into())
            }
        }
    }
}

/// An outbox is a part of its service's `/healthz` (see [`Outbox::health`]).
#[async_trait]
impl chorus_runtime::Observable for Outbox {
    fn name(&self) -> &str {
        "outbox"
    }

    fn health(&self) -> Health {
        Outbox::health(self)
    }

    async fn collect(
        &self,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<(), chorus_runtime::BoxError> {
        self.register(registry);
        Ok(())
    }
}

/// What a failed forward means for an operator, and what to do about it.
fn forward_problem(e: &chorus_backbone::BackboneError) -> String {
    match e {
        chorus_backbone::BackboneError::NoStreamForSubject(subject) => format!(
            "the site has no stream for {subject}: its platform streams are missing; \
             run `chorus streams create --nats <site>` (operators own the streams)"
        ),
        chorus_backbone::BackboneError::Timeout { .. } => "the site does not answer in time".into(),
        chorus_backbone::BackboneError::Connect { .. } => "the site is unreachable".into(),
        other => format!("the site refuses events ({})", other.to_string().split(':').next().unwrap_or_default()),
    }
}

#[async_trait]
impl EventSink for Outbox {
    async fn store(&self, records: Vec<EventRecord>) -> Result<(), PlatformError> {
        let messages = records.iter().filter(|r| self.admit(r)).map(to_message).collect::<Result<Vec<_>, _>>()?;
        if messages.is_empty() {
            return Ok(());
        }
        let count = messages.len() as u64;
        let refused = |e: PlatformError| {
            self.stats.refused_by_storage.fetch_add(count, Ordering::Relaxed);
            e
        };
        let (generation, store) = self.healthy_store().await.map_err(refused)?;
        let acks = match store.publish_batch(messages).await {
            Ok(acks) => acks,
            Err(e) => {
                if self.store.failed(generation, &e) {
                    return Err(refused(e.into()));
                }
                return Err(e.into());
            }
        };
        if let Some(last) = acks.iter().map(|a| a.sequence).max() {
            self.stats.stored.fetch_max(last, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Emitter;
    use chorus_schemas::lifecycle::Startup;

    /// After everything is forwarded and purged, a restarted node continues its sequence and
    /// sees an empty backlog, with no state kept outside the outbox stream.
    #[tokio::test]
    async fn restart_after_full_forward_continues_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let site = EmbeddedBackbone::open_path(dir.path().join("site")).unwrap();
        site.ensure_stream(&StreamConfig::new("SITE", vec![">".into()])).await.unwrap();
        {
            let outbox =
                Outbox::open(EmbeddedBackbone::open_path(dir.path().join("outbox")).unwrap(), OutboxLimits::default())
                    .await
                    .unwrap();
            let emitter = Emitter::new(Arc::new(outbox.clone()), outbox.next_producer_seq().await.unwrap(), None);
            for _ in 0..3 {
                emitter.emit(Startup::new("n1.example.net", "server", "1.0.0")).await.unwrap();
            }
            let shutdown = Shutdown::new();
            let forwarder = tokio::spawn({
                let outbox = outbox.clone();
                let site: Arc<dyn Backbone> = Arc::new(site.clone());
                let shutdown = shutdown.clone();
                async move { outbox.forward(site, 10, shutdown).await }
            });
            // The forwarder drains everything before it returns on a shutdown.
            shutdown.request();
            forwarder.await.unwrap().unwrap();
            assert_eq!(outbox.stats().backlog(), 0);
        }
        assert_eq!(site.stream_info("SITE").await.unwrap().messages, 3);
        // Opening waits out the lock sled's background threads may hold after the last handle.
        let reopened = EmbeddedBackbone::open_path(dir.path().join("outbox")).unwrap();
        let outbox = Outbox::open(reopened, OutboxLimits::default()).await.unwrap();
        assert_eq!(outbox.next_producer_seq().await.unwrap(), 4);
        assert_eq!(outbox.stats().backlog(), 0);
    }

    /// A site without the platform's streams: the forwarder says what to run once, however
    /// often it retries, and delivers everything once the streams exist.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_site_without_streams_is_reported_once_and_caught_up_when_they_appear() {
        let dir = tempfile::tempdir().unwrap();
        let site = EmbeddedBackbone::open_path(dir.path().join("site")).unwrap();
        let outbox =
            Outbox::open(EmbeddedBackbone::open_path(dir.path().join("outbox")).unwrap(), OutboxLimits::default())
                .await
                .unwrap();
        let emitter = Emitter::new(Arc::new(outbox.clone()), 1, None);
        for _ in 0..3 {
            emitter.emit(Startup::new("n1.example.net", "server", "1.0.0")).await.unwrap();
        }
        let shutdown = Shutdown::new();
        let forwarder = tokio::spawn({
            let (outbox, shutdown) = (outbox.clone(), shutdown.clone());
            let site: Arc<dyn Backbone> = Arc::new(site.clone());
            async move { outbox.forward(site, 10, shutdown).await }
        });
        let stats = outbox.stats().clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while stats.forward_errors.load(Ordering::Relaxed) < 4 {
            assert!(std::time::Instant::now() < deadline, "the forwarder did not retry");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(stats.problems_reported.load(Ordering::Relaxed), 1, "said once, not at every retry");
        site.ensure_stream(&StreamConfig::new("SITE", vec![">".into()])).await.unwrap();
        while stats.backlog() > 0 {
            assert!(std::time::Instant::now() < deadline, "the backlog was not forwarded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.request();
        forwarder.await.unwrap().unwrap();
        assert_eq!(site.stream_info("SITE").await.unwrap().messages, 3);
        assert_eq!(stats.problems_reported.load(Ordering::Relaxed), 1);
    }
}
