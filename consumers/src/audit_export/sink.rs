//! What every sink implements, and the counters the exporter keeps.

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::record::{ExportRecord, Rejection};

/// A sink failed; the exporter pauses (exponential backoff) and tries again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

impl SinkError {
    /// An error whose text is `message`.
    pub fn new(message: impl std::fmt::Display) -> Self {
        SinkError(message.to_string())
    }
}

/// What a sink did with a batch besides writing it.
#[derive(Debug, Default)]
pub struct Sent {
    /// Records the SIEM refuses for good (malformed for it, too large), by index in the
    /// batch: they go to the dead-letter stream instead.
    pub rejected: Vec<(usize, Rejection)>,
}

/// A SIEM connection.
///
/// Records are counted in the order `send` accepted them, from the first the sink ever
/// accepted; [`Sink::confirmed`] says how many of them are safe to acknowledge.
#[async_trait]
pub trait Sink: Send {
    /// Hands `batch` over, in order. `Ok` means every record not rejected was written. On
    /// `Err` no record of the batch counts as written: the exporter sends the same batch
    /// again after a pause (so a partly written batch is written again: a duplicate, never
    /// a loss).
    async fn send(&mut self, batch: &[ExportRecord]) -> Result<Sent, SinkError>;

    /// How many accepted records are confirmed: the SIEM acknowledged them (HEC), they are
    /// on disk (JSON lines), or they settled on a live connection (syslog). An error means
    /// the connection broke; calling again reconnects and re-sends what is unconfirmed.
    async fn confirmed(&mut self) -> Result<u64, SinkError>;

    /// Records written but not yet confirmed.
    fn unconfirmed(&self) -> usize {
        0
    }

    /// At most this many unconfirmed records before the exporter stops sending and waits.
    fn max_unconfirmed(&self) -> usize {
        usize::MAX
    }

    /// Closes connections.
    async fn close(&mut self) {}
}

/// Counters of one exporter, Prometheus-style (monotonic). Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct ExportStats {
    /// Records the SIEM accepted and that were acknowledged to the backbone.
    pub exported: Counter,
    /// Failed attempts (send, confirm, reconnect, dead-letter publish, fetch), each followed
    /// by a pause and a retry.
    pub retries: Counter,
    /// Records sent to the dead-letter stream (malformed, or refused by the SIEM).
    pub dead_lettered: Counter,
    /// Records written again after a reconnect (possible duplicates at the SIEM).
    pub resent: Counter,
    /// Connections (re)established to the SIEM.
    pub connects: Counter,
    /// Deliveries of records already exported (backbone redeliveries), acknowledged without
    /// sending them again.
    pub redeliveries_skipped: Counter,
}

/// A point-in-time copy of [`ExportStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Records the SIEM accepted and that were acknowledged to the backbone.
    pub exported: u64,
    /// Failed attempts, each followed by a pause and a retry.
    pub retries: u64,
    /// Records sent to the dead-letter stream.
    pub dead_lettered: u64,
    /// Records written again after a reconnect (possible duplicates at the SIEM).
    pub resent: u64,
    /// Connections (re)established to the SIEM.
    pub connects: u64,
    /// Backbone redeliveries of records already exported, acknowledged without sending.
    pub redeliveries_skipped: u64,
}

impl ExportStats {
    /// The current counts, read one counter at a time (not an atomic snapshot of all).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            exported: self.exported.get(),
            retries: self.retries.get(),
            dead_lettered: self.dead_lettered.get(),
            resent: self.resent.get(),
            connects: self.connects.get(),
            redeliveries_skipped: self.redeliveries_skipped.get(),
        }
    }

    /// Registers the counters, e.g. in `Registry::with_prefix("chorus_audit_export")`:
    /// `<prefix>_exported_total`, `_retries_total`, `_dead_lettered_total`, `_resent_total`,
    /// `_connects_total`, `_redeliveries_skipped_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("exported", "Records the SIEM accepted, acknowledged to the backbone", self.exported.clone());
        registry.register("retries", "Failed attempts, each retried after a backoff pause", self.retries.clone());
        registry.register("dead_lettered", "Records sent to the dead-letter stream", self.dead_lettered.clone());
        registry.register(
            "resent",
            "Records written again after a reconnect (possible duplicates)",
            self.resent.clone(),
        );
        registry.register("connects", "Connections established to the SIEM", self.connects.clone());
        registry.register(
            "redeliveries_skipped",
            "Backbone redeliveries of records already exported, acknowledged without sending",
            self.redeliveries_skipped.clone(),
        );
    }

    /// The counters in the Prometheus text format, prefixed `chorus_audit_export`.
    pub fn encode(&self) -> String {
        let mut registry = Registry::with_prefix("chorus_audit_export");
        self.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}
