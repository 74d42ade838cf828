//! Audit export to a SIEM: audit records (`CHORUS_AUDIT`) and RPC request/reply records
//! (`CHORUS_RPC`) read by durable backbone consumers and written to
//!
//! * syslog: RFC 5424 messages over TCP with RFC 6587 octet counting ([`syslog`]), or over
//!   TLS (RFC 5425) with a rustls client,
//! * Splunk HEC: JSON event batches over HTTP(S) ([`hec`]),
//! * a JSON lines file, appended and fsynced per batch ([`jsonl`]).
//!
//! # Delivery guarantees
//!
//! At-least-once, with nothing lost while the SIEM is down:
//!
//! * A record is acknowledged to the backbone only once the sink **confirmed** it: HEC
//!   answered success, the file was fsynced, or, for syslog (which has no acknowledgement),
//!   the collector's TCP acknowledged the bytes and the connection was still open `settle`
//!   later ([`syslog`] explains why). Unacknowledged records are redelivered by the backbone
//!   after `ack_wait`, also after a crash or restart of the exporter.
//! * While the SIEM is down, the exporter retries the same batch with exponential backoff
//!   (`backoff`), forever; fetching pauses meanwhile, the records wait on the stream.
//! * After a syslog reconnect, every unconfirmed record is written again before anything
//!   new, so records that were in the socket buffers of a collector that died are not lost.
//!   That, a retried partly-written batch or HEC batch, and backbone redeliveries make
//!   **duplicates** possible (by event id; the SIEM can dedupe on `id`); `resent` counts them.
//!   Redeliveries of records this process already exported are acknowledged without being
//!   sent again (`redeliveries_skipped`).
//! * A malformed record (does not decode, is not an audit or RPC record, or is refused by
//!   the SIEM on its own) goes to `chorus.deadletter.<consumer>` with the reason, is then
//!   acknowledged, and the export goes on (`dead_lettered`).
//!
//! Use [`AuditExport::start`] (or [`run`] in a task of your own) with an [`ExportConfig`];
//! counters are in [`ExportStats`].

pub mod config;
pub mod format;
pub mod hec;
pub mod jsonl;
pub mod record;
pub mod rfc5424;
pub mod sink;
pub mod syslog;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Backbone, BackboneError, ConsumerConfig, Delivery};
use chorus_platform::deadletter::{self, DeadLetter};
use chorus_platform::{open_consumer, ReadStatus};
use chorus_runtime::{Config as _, ConfigError, Shutdown, Tasks};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use config::{
    Backoff, ExportConfig, Facility, HecConfig, HostnameSource, JsonlConfig, Severity, SeverityMap, SinkConfig,
    SyslogConfig, TlsClientConfig,
};
pub use format::Format;
pub use record::{ExportRecord, Rejection};
pub use sink::{ExportStats, Sink, SinkError, StatsSnapshot};

/// What can stop the exporter (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The configuration is invalid; the error names the field.
    #[error("audit export configuration: {0}")]
    Config(#[from] ConfigError),
    /// The backbone refused to open a consumer or the dead-letter stream.
    #[error("audit export: {0}")]
    Backbone(#[from] BackboneError),
    /// Every stream fetcher ended: nothing more can be read.
    #[error("audit export: every stream fetcher ended")]
    FetchersEnded,
}

/// Builds the sink of a configuration.
pub fn build_sink(config: &ExportConfig, stats: &ExportStats) -> Result<Box<dyn Sink>, ExportError> {
    Ok(match &config.sink {
        SinkConfig::Syslog(s) => Box::new(syslog::SyslogSink::new(s.clone(), config.hostname, stats.clone())?),
        SinkConfig::Hec(h) => Box::new(hec::HecSink::new(h, config.hostname, config.format)?),
        SinkConfig::Jsonl(j) => Box::new(jsonl::JsonlSink::new(j.path.clone())),
    })
}

/// A running exporter: a runtime [`Service`].
pub struct AuditExport {
    stats: ExportStats,
    tasks: Tasks,
    /// Streams not read yet (missing, broker unreachable): not ready meanwhile.
    reading: ReadStatus,
}

impl AuditExport {
    /// Validates the configuration, opens the consumers and the sink, and runs the exporter
    /// under `shutdown`.
    pub async fn start(
        backbone: Arc<dyn Backbone>,
        config: ExportConfig,
        shutdown: Shutdown,
    ) -> Result<AuditExport, ExportError> {
        let stats = ExportStats::default();
        let mut tasks = Tasks::new("audit export", shutdown);
        let reading = ReadStatus::starting(config.streams.iter().cloned());
        let exporter =
            Exporter::open(backbone, config, stats.clone(), reading.clone(), tasks.shutdown().clone()).await?;
        tasks.spawn("export", exporter.run());
        Ok(AuditExport { stats, tasks, reading })
    }

    fn reading_health(&self) -> chorus_runtime::Health {
        self.reading.health()
    }

    /// A view of the running exporter for `/healthz` and `/metrics` (usable after the
    /// exporter was moved into whatever stops it).
    pub fn monitor(&self) -> ExportMonitor {
        ExportMonitor { stats: self.stats.clone(), tasks: self.tasks.monitor(), reading: self.reading.clone() }
    }

    /// The exporter's counters.
    pub fn stats(&self) -> &ExportStats {
        &self.stats
    }
}

/// The exporter seen from outside: healthy while it runs and reads every stream it was
/// given; its counters as `chorus_audit_export_*` metrics.
#[derive(Clone)]
pub struct ExportMonitor {
    stats: ExportStats,
    tasks: chorus_runtime::TaskMonitor,
    reading: ReadStatus,
}

#[chorus_runtime::service::__async_trait]
impl chorus_runtime::Observable for ExportMonitor {
    fn name(&self) -> &str {
        "audit-export"
    }

    fn health(&self) -> chorus_runtime::Health {
        let s = self.stats.snapshot();
        self.tasks
            .health()
            .and(self.reading.health())
            .with("exported", s.exported)
            .with("dead_lettered", s.dead_lettered)
    }

    async fn collect(
        &self,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<(), chorus_runtime::BoxError> {
        let registry = registry.sub_registry_with_prefix("chorus_audit_export");
        let s = self.stats.snapshot();
        let counters = [
            ("exported", "Records the SIEM accepted and that were acknowledged", s.exported),
            ("retries", "Failed attempts, each followed by a pause and a retry", s.retries),
            ("dead_lettered", "Records sent to the dead-letter stream", s.dead_lettered),
            ("resent", "Records written again after a reconnect", s.resent),
            ("connects", "Connections established to the SIEM", s.connects),
            ("redeliveries_skipped", "Redeliveries of exported records acknowledged unsent", s.redeliveries_skipped),
        ];
        chorus_runtime::register_counters(registry, &counters);
        Ok(())
    }
}

chorus_runtime::service_of_tasks!(AuditExport, tasks, health = reading_health);

/// Runs the exporter until `shutdown` is requested. Fails only on an invalid configuration;
/// streams that are missing or a broker that is down are waited for.
pub async fn run(
    backbone: Arc<dyn Backbone>,
    config: ExportConfig,
    stats: ExportStats,
    shutdown: Shutdown,
) -> Result<(), ExportError> {
    let reading = ReadStatus::starting(config.streams.iter().cloned());
    Exporter::open(backbone, config, stats, reading, shutdown).await?.run().await
}

/// (stream, sequence): a message's identity for this consumer.
type Key = (Arc<str>, u64);

/// A record handed to the sink, waiting for confirmation.
struct Pending {
    key: Key,
    /// The delivery and any redeliveries of the same message that arrived meanwhile.
    deliveries: Vec<Delivery>,
}

/// The exporter stopped on request in the middle of something.
struct Stopped;

/// Keys of recently exported messages, to acknowledge their redeliveries without sending.
struct Recent {
    set: HashSet<Key>,
    order: VecDeque<Key>,
    cap: usize,
}

impl Recent {
    fn new(cap: usize) -> Self {
        Recent { set: HashSet::new(), order: VecDeque::new(), cap }
    }
    fn insert(&mut self, key: Key) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            if self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
    fn contains(&self, key: &Key) -> bool {
        self.set.contains(key)
    }
}

struct Exporter {
    backbone: Arc<dyn Backbone>,
    config: ExportConfig,
    stats: ExportStats,
    stop: Shutdown,
    sink: Box<dyn Sink>,
    rx: mpsc::Receiver<Delivery>,
    fetchers: Vec<JoinHandle<()>>,
    /// Handed to the sink, not yet confirmed, in sink order.
    pending: VecDeque<Pending>,
    /// Index (in sink order) of `pending[0]`: records confirmed and acknowledged so far.
    acked: u64,
    /// Keys in `pending`, with their sink index.
    in_flight: HashMap<Key, u64>,
    recent: Recent,
}

impl Exporter {
    async fn open(
        backbone: Arc<dyn Backbone>,
        config: ExportConfig,
        stats: ExportStats,
        reading: ReadStatus,
        stop: Shutdown,
    ) -> Result<Self, ExportError> {
        config.validate()?;
        let sink = build_sink(&config, &stats)?;
        let consumer_config = config.consumer_config();
        let (tx, rx) = mpsc::channel(config.batch_size);
        // Each fetcher opens its consumer (and the dead-letter stream) in its task, retried
        // while the stream is missing or the broker down: the exporter starts either way.
        let fetchers = config
            .streams
            .iter()
            .map(|stream| {
                let fetcher = Fetcher {
                    backbone: backbone.clone(),
                    stream: stream.clone(),
                    config: consumer_config.clone(),
                    reading: reading.clone(),
                    batch: config.batch_size,
                    wait: config.fetch_wait,
                    backoff: config.backoff,
                    stats: stats.clone(),
                    tx: tx.clone(),
                    stop: stop.clone(),
                };
                tokio::spawn(fetcher.run())
            })
            .collect();
        tracing::info!(sink = config.sink.kind(), streams = ?config.streams, consumer = %config.consumer, "audit export started");
        Ok(Exporter {
            backbone,
            config,
            stats,
            stop,
            sink,
            rx,
            fetchers,
            pending: VecDeque::new(),
            acked: 0,
            in_flight: HashMap::new(),
            recent: Recent::new(65_536),
        })
    }

    fn stopping(&self) -> bool {
        self.stop.is_requested()
    }

    /// Sleeps for the backoff after `failures` failures; `Err` when asked to stop meanwhile.
    async fn pause(&mut self, failures: u32) -> Result<(), Stopped> {
        let delay = self.config.backoff.delay(failures);
        tokio::select! {
            _ = tokio::time::sleep(delay) => if self.stopping() { Err(Stopped) } else { Ok(()) },
            _ = self.stop.requested() => Err(Stopped),
        }
    }

    async fn run(mut self) -> Result<(), ExportError> {
        let result = self.main_loop().await;
        for f in &self.fetchers {
            f.abort();
        }
        // Acknowledge what settles shortly; the rest is redelivered later.
        let limit = match &self.config.sink {
            SinkConfig::Syslog(s) => s.settle * 2 + Duration::from_millis(200),
            _ => Duration::ZERO,
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Bounded: a reconnect attempt must not hold up the stop.
            let attempt = tokio::time::timeout_at(deadline + Duration::from_millis(100), self.sink.confirmed());
            if let Ok(Ok(c)) = attempt.await {
                self.ack_through(c).await;
            }
            if self.pending.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.sink.close().await;
        tracing::info!(stats = ?self.stats.snapshot(), unacknowledged = self.pending.len(), "audit export stopped");
        result
    }

    async fn main_loop(&mut self) -> Result<(), ExportError> {
        loop {
            if self.stopping() {
                return Ok(());
            }
            if !self.pending.is_empty() && self.confirm().await.is_err() {
                return Ok(());
            }
            if self.sink.unconfirmed() >= self.sink.max_unconfirmed() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    _ = self.stop.requested() => return Ok(()),
                }
            }
            let tick = if self.pending.is_empty() { Duration::from_secs(1) } else { Duration::from_millis(50) };
            let mut batch = Vec::with_capacity(self.config.batch_size);
            tokio::select! {
                biased;
                _ = self.stop.requested() => return Ok(()),
                d = self.rx.recv() => match d {
                    Some(d) => batch.push(d),
                    // Fetchers end on a stop request, possibly before this loop sees it.
                    None if self.stop.is_requested() => return Ok(()),
                    None => return Err(ExportError::FetchersEnded),
                },
                _ = tokio::time::sleep(tick) => continue,
            }
            while batch.len() < self.config.batch_size {
                match self.rx.try_recv() {
                    Ok(d) => batch.push(d),
                    Err(_) => break,
                }
            }
            if self.process(batch).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Asks the sink what is confirmed (reconnecting and re-sending as needed, with
    /// backoff) and acknowledges it.
    async fn confirm(&mut self) -> Result<(), Stopped> {
        let mut failures = 0;
        loop {
            match self.sink.confirmed().await {
                Ok(c) => {
                    self.ack_through(c).await;
                    return Ok(());
                }
                Err(e) => {
                    failures += 1;
                    self.stats.retries.inc();
                    tracing::warn!(error = %e, failures, unconfirmed = self.sink.unconfirmed(), "SIEM unavailable; retrying");
                    self.pause(failures).await?;
                }
            }
        }
    }

    /// Acknowledges pending records up to sink index `confirmed`.
    async fn ack_through(&mut self, confirmed: u64) {
        while self.acked < confirmed {
            let Some(p) = self.pending.pop_front() else { break };
            self.acked += 1;
            for d in &p.deliveries {
                if let Err(e) = d.ack().await {
                    // It will be redelivered and acknowledged then without being sent again.
                    tracing::warn!(error = %e, stream = %p.key.0, sequence = p.key.1, "acknowledgement failed");
                }
            }
            self.stats.exported.inc();
            self.in_flight.remove(&p.key);
            self.recent.insert(p.key);
        }
    }

    async fn process(&mut self, batch: Vec<Delivery>) -> Result<(), Stopped> {
        let mut records: Vec<ExportRecord> = Vec::with_capacity(batch.len());
        let mut deliveries: Vec<Vec<Delivery>> = Vec::with_capacity(batch.len());
        let mut in_batch: HashMap<Key, usize> = HashMap::new();
        let mut malformed: Vec<(Delivery, Rejection)> = Vec::new();
        for d in batch {
            let key: Key = (Arc::from(d.message.stream.as_str()), d.message.sequence);
            if self.recent.contains(&key) {
                self.stats.redeliveries_skipped.inc();
                d.ack().await.ok();
                continue;
            }
            if let Some(&index) = self.in_flight.get(&key) {
                self.stats.redeliveries_skipped.inc();
                self.pending[(index - self.acked) as usize].deliveries.push(d);
                continue;
            }
            if let Some(&i) = in_batch.get(&key) {
                self.stats.redeliveries_skipped.inc();
                deliveries[i].push(d);
                continue;
            }
            match ExportRecord::from_stored(&d.message) {
                Ok(mut r) => {
                    r.body = self.config.format.render(&r);
                    in_batch.insert(key, records.len());
                    records.push(r);
                    deliveries.push(vec![d]);
                }
                Err(rejection) => malformed.push((d, rejection)),
            }
        }
        if !malformed.is_empty() {
            self.dead_letter(malformed.into_iter().map(|(d, r)| (vec![d], r)).collect()).await?;
        }
        if records.is_empty() {
            return Ok(());
        }

        let mut failures = 0;
        let sent = loop {
            match self.sink.send(&records).await {
                Ok(sent) => break sent,
                Err(e) => {
                    failures += 1;
                    self.stats.retries.inc();
                    tracing::warn!(error = %e, failures, records = records.len(), "SIEM unavailable; retrying the batch");
                    self.pause(failures).await?;
                }
            }
        };
        let rejected: HashMap<usize, Rejection> = sent.rejected.into_iter().collect();
        let mut refused = Vec::new();
        for (i, (record, ds)) in records.into_iter().zip(deliveries).enumerate() {
            let key: Key = (Arc::from(record.stream.as_str()), record.sequence);
            match rejected.get(&i) {
                Some(r) => refused.push((ds, r.clone())),
                None => {
                    let index = self.acked + self.pending.len() as u64;
                    self.in_flight.insert(key.clone(), index);
                    self.pending.push_back(Pending { key, deliveries: ds });
                }
            }
        }
        if !refused.is_empty() {
            self.dead_letter(refused).await?;
        }
        self.confirm().await
    }

    /// Publishes dead letters (retrying until stored), then acknowledges the originals.
    async fn dead_letter(&mut self, items: Vec<(Vec<Delivery>, Rejection)>) -> Result<(), Stopped> {
        let letters: Vec<DeadLetter> = items
            .iter()
            .map(|(ds, r)| DeadLetter::new(&self.config.consumer, &ds[0].message, &r.code, r.reason.clone()))
            .collect();
        let mut failures = 0;
        while let Err(e) = deadletter::publish(&*self.backbone, &letters).await {
            failures += 1;
            self.stats.retries.inc();
            tracing::warn!(error = %e, failures, "dead-letter publish failed; retrying");
            self.pause(failures).await?;
        }
        for ((ds, r), letter) in items.iter().zip(&letters) {
            tracing::warn!(stream = %letter.stream, sequence = letter.sequence, code = %r.code, reason = %r.reason, "record dead-lettered");
            for d in ds {
                if let Err(e) = d.ack().await {
                    tracing::warn!(error = %e, "acknowledging a dead-lettered record failed; it will be dead-lettered again (same id)");
                }
            }
            self.stats.dead_lettered.inc();
        }
        Ok(())
    }
}

/// Fetches one stream's consumer into the exporter's channel.
struct Fetcher {
    backbone: Arc<dyn Backbone>,
    stream: String,
    config: ConsumerConfig,
    reading: ReadStatus,
    batch: usize,
    wait: Duration,
    backoff: Backoff,
    stats: ExportStats,
    tx: mpsc::Sender<Delivery>,
    stop: Shutdown,
}

impl Fetcher {
    async fn run(self) {
        let Some(mut consumer) =
            open_consumer(&*self.backbone, &self.stream, &self.config, &self.reading, &self.stop).await
        else {
            return;
        };
        let mut failures = 0;
        loop {
            let fetched = tokio::select! {
                r = consumer.fetch(self.batch, self.wait) => r,
                _ = self.stop.requested() => return,
            };
            match fetched {
                Ok(deliveries) => {
                    failures = 0;
                    for d in deliveries {
                        if self.tx.send(d).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.stats.retries.inc();
                    tracing::warn!(stream = %self.stream, error = %e, failures, "fetch failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(self.backoff.delay(failures)) => {}
                        _ = self.stop.requested() => return,
                    }
                    match self.backbone.consumer(&self.stream, &self.config).await {
                        Ok(c) => consumer = c,
                        Err(e) => tracing::warn!(stream = %self.stream, error = %e, "reopening the consumer failed"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
