//! Counters of a running provisioner.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Counters of a running provisioner (lock-free; read with [`ProvisionerStats::snapshot`]).
#[derive(Debug, Default)]
pub struct ProvisionerStats {
    pub(super) startups: AtomicU64,
    pub(super) duplicate_startups: AtomicU64,
    pub(super) stale_startups: AtomicU64,
    pub(super) reprovisions: AtomicU64,
    pub(super) provisioned_events: AtomicU64,
    pub(super) provisioned: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) steps_ok: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) in_flight: AtomicU64,
    pub(super) queued: AtomicU64,
}

/// The counters at one moment. Prometheus names: `chorus_provisioner_<field>` (with
/// `_total` for counters).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Counter: provisioning-mode startup events read (duplicates and stale ones included).
    pub startups: u64,
    /// Counter: startups skipped because their event was already served.
    pub duplicate_startups: u64,
    /// Counter: startups skipped because they were older than the node's state.
    pub stale_startups: u64,
    /// Counter: provisioned nodes that came back in provisioning mode.
    pub reprovisions: u64,
    /// Counter: `provisioned` events read from the stream (ours and others').
    pub provisioned_events: u64,
    /// Counter: nodes this process provisioned (its `provisioned` event stored).
    pub provisioned: u64,
    /// Counter: attempts that failed.
    pub failed: u64,
    /// Counter: attempts on nodes that had failed before.
    pub retries: u64,
    /// Counter: steps that succeeded.
    pub steps_ok: u64,
    /// Counter: messages dead-lettered.
    pub dead_lettered: u64,
    /// Gauge: nodes being provisioned now.
    pub in_flight: u64,
    /// Gauge: nodes due and waiting for a free slot (`concurrency`).
    pub queued: u64,
}

impl ProvisionerStats {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            startups: g(&self.startups),
            duplicate_startups: g(&self.duplicate_startups),
            stale_startups: g(&self.stale_startups),
            reprovisions: g(&self.reprovisions),
            provisioned_events: g(&self.provisioned_events),
            provisioned: g(&self.provisioned),
            failed: g(&self.failed),
            retries: g(&self.retries),
            steps_ok: g(&self.steps_ok),
            dead_lettered: g(&self.dead_lettered),
            in_flight: g(&self.in_flight),
            queued: g(&self.queued),
        }
    }
}

/// Nodes by status, from the state store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// Nodes waiting for, or in, their first attempt of the current boot.
    pub pending: u64,
    /// Nodes whose last attempt failed, waiting for a retry.
    pub failed: u64,
    /// Nodes provisioned.
    pub provisioned: u64,
}
