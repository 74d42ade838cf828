//! The provisioner's metrics and health, for `/metrics` and `/healthz` through
//! [`chorus_runtime::Ops`], so a platform team can alert on failing attempts, a growing
//! queue or a stopped provisioner.
//!
//! Metric names are `chorus_provisioner_<field of StatsSnapshot>` (counters with `_total`)
//! plus `chorus_provisioner_nodes{status}` from the state store.

use async_trait::async_trait;
use chorus_runtime::{BoxError, Health, Observable};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Monitor, StatsSnapshot, StatusCounts};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// Registers `stats` and `counts` as `chorus_provisioner_*` metrics.
pub fn register(registry: &mut Registry, stats: &StatsSnapshot, counts: &StatusCounts) {
    let registry = registry.sub_registry_with_prefix("chorus_provisioner");
    let counters: [(&str, &str, u64); 10] = [
        ("startups", "Provisioning-mode startup events read", stats.startups),
        ("duplicate_startups", "Startups skipped: their event was already served", stats.duplicate_startups),
        ("stale_startups", "Startups skipped: older than the node's state", stats.stale_startups),
        ("reprovisions", "Provisioned nodes that came back in provisioning mode", stats.reprovisions),
        ("provisioned_events", "Provisioned events read from the stream", stats.provisioned_events),
        ("provisioned", "Nodes this process provisioned", stats.provisioned),
        ("failed", "Attempts that failed", stats.failed),
        ("retries", "Attempts on nodes that had failed before", stats.retries),
        ("steps_ok", "Steps that succeeded", stats.steps_ok),
        ("dead_lettered", "Messages dead-lettered", stats.dead_lettered),
    ];
    chorus_runtime::register_counters(registry, &counters);
    chorus_runtime::register_gauges(
        registry,
        &[
            ("in_flight", "Nodes being provisioned now", stats.in_flight),
            ("queued", "Nodes due and waiting for a free slot", stats.queued),
        ],
    );
    let nodes = Family::<StatusLabel, Gauge>::default();
    for (status, n) in [("pending", counts.pending), ("failed", counts.failed), ("provisioned", counts.provisioned)] {
        nodes.get_or_create(&StatusLabel { status }).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register("nodes", "Nodes in the provisioner's state by status", nodes);
}

#[async_trait]
impl Observable for Monitor {
    fn name(&self) -> &str {
        "provisioner"
    }

    fn health(&self) -> Health {
        Monitor::health(self)
    }

    async fn collect(&self, registry: &mut Registry) -> Result<(), BoxError> {
        let stats = self.stats();
        let monitor = self.clone();
        let counts = tokio::task::spawn_blocking(move || monitor.counts()).await??;
        register(registry, &stats, &counts);
        Ok(())
    }
}
