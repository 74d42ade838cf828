//! The reactor's metrics and health, for `/metrics` and `/healthz` through
//! [`chorus_runtime::Ops`]: `chorus_reactor_<counter>_total` and `chorus_reactor_pending`.

use async_trait::async_trait;
use chorus_runtime::{BoxError, Health, Observable};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Monitor, StatsSnapshot};

/// Registers `stats` as `chorus_reactor_*` metrics.
pub fn register(registry: &mut Registry, stats: &StatsSnapshot) {
    let registry = registry.sub_registry_with_prefix("chorus_reactor");
    let counters: [(&str, &str, u64); 7] = [
        ("evaluated", "Events read and evaluated", stats.evaluated),
        ("matched", "Rule matches", stats.matched),
        ("fired", "Firings", stats.fired),
        ("suppressed", "Firings held back by a throttle or once-per-key", stats.suppressed),
        ("actions_succeeded", "Actions that succeeded", stats.actions_succeeded),
        ("actions_failed", "Actions that failed", stats.actions_failed),
        ("dead_lettered", "Messages dead-lettered", stats.dead_lettered),
    ];
    chorus_runtime::register_counters(registry, &counters);
    let pending = Gauge::<i64>::default();
    pending.set(i64::try_from(stats.pending).unwrap_or(i64::MAX));
    registry.register("pending", "Firings whose actions are not all done", pending);
}

#[async_trait]
impl Observable for Monitor {
    fn name(&self) -> &str {
        "reactor"
    }

    fn health(&self) -> Health {
        Monitor::health(self)
    }

    async fn collect(&self, registry: &mut Registry) -> Result<(), BoxError> {
        register(registry, &self.stats());
        Ok(())
    }
}
