//! Prometheus metrics and health of the copiers, per link and stream.
//!
//! * `chorus_replicator_copied_total` — events the target acknowledged.
//! * `chorus_replicator_skipped_total{reason}` — `sampled` (alive sampling), `loop` (the
//!   event came from the target's site) or `duplicate` (the target already held it).
//! * `chorus_replicator_errors_total{side}` — `source`, `target` or `checkpoint` failures,
//!   each followed by a retry.
//! * `chorus_replicator_lag_events` — source messages not yet copied.
//! * `chorus_replicator_lag_seconds` — age of the newest copied event while behind, 0 when
//!   caught up.
//! * `chorus_replicator_checkpoint` — last source sequence in the target.
//! * `chorus_replicator_path{path}` — 1 for the way each stream is copied (`copy` or
//!   `native`), once it is chosen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a per-stream metric: the link and the source stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// Link name, from the configuration.
    pub link: String,
    /// Source stream name.
    pub stream: String,
}

/// Labels of a per-stream metric split by cause.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Link name, from the configuration.
    pub link: String,
    /// Source stream name.
    pub stream: String,
    /// Why an event was skipped (`sampled`, `loop`, `duplicate`) or which side failed
    /// (`source`, `target`, `checkpoint`).
    pub reason: String,
}

/// Labels of the path metric: the link, the source stream and a way of copying.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// Link name, from the configuration.
    pub link: String,
    /// Source stream name.
    pub stream: String,
    /// `copy` or `native`.
    pub path: String,
}

/// The metric families of one replicator process.
pub struct Metrics {
    /// Events the target acknowledged as newly stored (duplicates it dropped are not counted).
    pub copied: Family<StreamLabels, Counter>,
    /// Events not copied, by reason: `sampled`, `loop`, or `duplicate` (the target had it).
    pub skipped: Family<ReasonLabels, Counter>,
    /// Failures by side (`source`, `target`, `checkpoint`); each is retried.
    pub errors: Family<ReasonLabels, Counter>,
    /// Source messages past the checkpoint, not yet copied.
    pub lag_events: Family<StreamLabels, Gauge>,
    /// Age in seconds of the newest copied event while behind; 0 when caught up.
    pub lag_seconds: Family<StreamLabels, Gauge<f64, AtomicU64>>,
    /// Last source sequence acknowledged by the target and checkpointed.
    pub checkpoint: Family<StreamLabels, Gauge>,
    /// Source events removed by the source's retention before they were copied.
    pub gap_events: Family<StreamLabels, Counter>,
    /// 1 for the way each stream is copied (`path` = `copy` or `native`).
    pub path: Family<PathLabels, Gauge>,
    health: Mutex<Vec<Arc<CopierHealth>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            copied: Family::default(),
            skipped: Family::default(),
            errors: Family::default(),
            lag_events: Family::default(),
            lag_seconds: Family::default(),
            checkpoint: Family::default(),
            gap_events: Family::default(),
            path: Family::default(),
            health: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    /// Registers every family in `registry` (names as `/metrics` shows them, under the
    /// caller's `chorus_replicator` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("copied", "Events the target acknowledged", self.copied.clone());
        registry.register("skipped", "Events not copied, by reason (sampled, loop, duplicate)", self.skipped.clone());
        registry.register(
            "errors",
            "Failures, by side (source, target, checkpoint); each is retried",
            self.errors.clone(),
        );
        registry.register("lag_events", "Source messages not yet copied", self.lag_events.clone());
        registry.register(
            "lag_seconds",
            "Age of the newest copied event while behind; 0 when caught up",
            self.lag_seconds.clone(),
        );
        registry.register("checkpoint", "Last source sequence acknowledged by the target", self.checkpoint.clone());
        registry.register(
            "gap_events",
            "Source events removed by retention before they were copied",
            self.gap_events.clone(),
        );
        registry.register(
            "path",
            "1 for the way each stream is copied (label path: copy or native)",
            self.path.clone(),
        );
    }

    /// The exposition of every family in the OpenMetrics text format (for tests and tools
    /// without an ops endpoint).
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        self.register(registry.sub_registry_with_prefix("chorus_replicator"));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }

    pub(crate) fn register_copier(&self, health: Arc<CopierHealth>) {
        self.health.lock().expect("health lock").push(health);
    }

    /// Health of every copier: healthy when none has been failing for longer than its grace.
    pub fn health(&self) -> Vec<HealthReport> {
        self.health.lock().expect("health lock").iter().map(|h| h.report()).collect()
    }
}

/// One copier's live state, shared with the health endpoint.
#[derive(Debug)]
pub struct CopierHealth {
    /// Link name.
    pub link: String,
    /// Source stream the copier reads.
    pub stream: String,
    state: Mutex<HealthState>,
    pub(crate) checkpoint: AtomicU64,
    pub(crate) lag: AtomicU64,
    /// Stream time (Unix ms) of the newest copied message, for the lag in seconds.
    pub(crate) newest_time: std::sync::atomic::AtomicI64,
    /// Source events removed by retention before they were copied.
    pub(crate) gap_events: AtomicU64,
    /// Whether the copier appends with sequenced publishes now.
    pub(crate) sequenced: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct HealthState {
    failing_since: Option<std::time::Instant>,
    last_error: Option<String>,
    /// The side (`source`, `target`) whose server is unreachable, and since when.
    unreachable: Option<(&'static str, std::time::Instant)>,
    /// The way the stream is copied (`copy`, `native`) and why, once chosen.
    path: Option<(&'static str, String)>,
}

/// What `/healthz` reports for one copier.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HealthReport {
    /// Link name.
    pub link: String,
    /// Source stream the copier reads.
    pub stream: String,
    /// False once the copier has failed without progress for 3 seconds or more.
    pub healthy: bool,
    /// Last source sequence acknowledged by the target and checkpointed.
    pub checkpoint: u64,
    /// Source messages not yet copied, refreshed once a second.
    pub lag_events: u64,
    /// Seconds since the copier started failing without progress; none while it progresses.
    pub failing_for_seconds: Option<f64>,
    /// Latest failure as `<side>: <error>`; kept after the copier recovers.
    pub last_error: Option<String>,
    /// Source events removed by the source's retention before they were copied: a warning
    /// (the copier goes on from the oldest event left), with a gap record on the target.
    pub gap_events: u64,
    /// `copy` (the replicator's copier) or `native` (a native JetStream source it
    /// supervises); none until chosen.
    pub path: Option<&'static str>,
    /// Why that way was taken.
    pub path_reason: Option<String>,
    /// On the `copy` path: true while the copier appends to a target stream it owns with
    /// sequenced publishes (no acknowledgement per event, no id remembered by the target);
    /// false while it publishes with ids.
    pub sequenced: bool,
}

/// A copier counts as unhealthy once it has failed without progress for this long: long
/// enough that one failed call retried at once is not reported, short enough that an
/// unreachable site or hub shows in `/healthz` within seconds (it is still retried).
const UNHEALTHY_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

impl CopierHealth {
    pub(crate) fn new(link: &str, stream: &str) -> Self {
        CopierHealth {
            link: link.into(),
            stream: stream.into(),
            state: Mutex::new(HealthState::default()),
            checkpoint: AtomicU64::new(0),
            lag: AtomicU64::new(0),
            newest_time: std::sync::atomic::AtomicI64::new(0),
            gap_events: AtomicU64::new(0),
            sequenced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn failed(&self, error: String) {
        let mut s = self.state.lock().expect("health lock");
        s.failing_since.get_or_insert_with(std::time::Instant::now);
        s.last_error = Some(error);
    }

    /// Records whether the source and target servers are reachable (checked once a second):
    /// a copier waiting on an unreachable server is failing even while no call has failed yet.
    pub(crate) fn reachability(&self, source: bool, target: bool) {
        let mut s = self.state.lock().expect("health lock");
        let side = match (source, target) {
            (false, _) => "source",
            (_, false) => "target",
            _ => {
                s.unreachable = None;
                return;
            }
        };
        if s.unreachable.is_none_or(|(was, _)| was != side) {
            s.unreachable = Some((side, std::time::Instant::now()));
            s.last_error = Some(format!("{side}: server unreachable, reconnecting"));
        }
    }

    /// Records the way the stream is copied and why.
    pub(crate) fn chose(&self, path: &'static str, why: String) {
        self.state.lock().expect("health lock").path = Some((path, why));
    }

    /// Records events lost to the source's retention (a warning, not a failure).
    pub(crate) fn gap(&self, events: u64, what: String) {
        self.gap_events.fetch_add(events, Ordering::Relaxed);
        self.state.lock().expect("health lock").last_error = Some(what);
    }

    pub(crate) fn progressed(&self, checkpoint: u64) {
        self.checkpoint.store(checkpoint, Ordering::Relaxed);
        self.state.lock().expect("health lock").failing_since = None;
    }

    /// The copier's state as `/healthz` reports it.
    pub fn report(&self) -> HealthReport {
        let s = self.state.lock().expect("health lock");
        let since = match (s.failing_since, s.unreachable.map(|(_, t)| t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let failing_for = since.map(|t| t.elapsed());
        HealthReport {
            link: self.link.clone(),
            stream: self.stream.clone(),
            healthy: failing_for.is_none_or(|d| d < UNHEALTHY_AFTER),
            checkpoint: self.checkpoint.load(Ordering::Relaxed),
            lag_events: self.lag.load(Ordering::Relaxed),
            failing_for_seconds: failing_for.map(|d| d.as_secs_f64()),
            last_error: s.last_error.clone(),
            gap_events: self.gap_events.load(Ordering::Relaxed),
            path: s.path.as_ref().map(|(p, _)| *p),
            path_reason: s.path.as_ref().map(|(_, why)| why.clone()),
            sequenced: self.sequenced.load(Ordering::Relaxed),
        }
    }
}
