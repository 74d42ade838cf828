//! Lifecycle events of a node: startup, alive, shutdown, provisioned, upgraded.
//!
//! Alive events are what lets the inventory tell a quiet node from a dead one, so they come
//! on a fixed interval; the first one waits a random splay (up to one interval) so a fleet
//! restarted at once does not send its alive events at once (Choria go-choria #521).

use std::sync::Arc;
use std::time::Duration;

use chorus_platform::{Emitter, PlatformError};
use chorus_runtime::Shutdown;
use chorus_schemas::lifecycle::{Alive, Provisioned, Startup, Upgraded};
use chorus_schemas::EventRecord;

/// Who is emitting lifecycle events.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    /// The node's identity (usually its FQDN).
    pub identity: String,
    /// What runs on the node: `server`, `provision_mode_server`, …; the last subject token.
    pub component: String,
    /// Version of the software the component runs.
    pub version: String,
}

/// Emits a node's lifecycle events through its emitter.
#[derive(Clone)]
pub struct LifecycleEmitter {
    node: NodeIdentity,
    emitter: Arc<Emitter>,
}

impl LifecycleEmitter {
    /// Lifecycle events of `node`, through its `emitter`.
    pub fn new(node: NodeIdentity, emitter: Arc<Emitter>) -> Self {
        LifecycleEmitter { node, emitter }
    }

    /// Who the events are about.
    pub fn node(&self) -> &NodeIdentity {
        &self.node
    }

    /// Emits the node's `startup` event.
    pub async fn startup(&self) -> Result<EventRecord, PlatformError> {
        let n = &self.node;
        self.emitter.emit(Startup::new(&n.identity, &n.component, &n.version)).await
    }

    /// Emits an `alive` event announcing the next one within `interval`.
    pub async fn alive(&self, interval: Duration) -> Result<EventRecord, PlatformError> {
        let n = &self.node;
        self.emitter.emit(Alive::new(&n.identity, &n.component, &n.version, Some(interval.as_secs()))).await
    }

    /// Emits the node's `shutdown` event.
    pub async fn shutdown(&self) -> Result<EventRecord, PlatformError> {
        self.emitter.emit(chorus_schemas::lifecycle::Shutdown::new(&self.node.identity, &self.node.component)).await
    }

    /// Emits a `provisioned` event for the node.
    pub async fn provisioned(&self) -> Result<EventRecord, PlatformError> {
        self.emitter.emit(Provisioned::new(&self.node.identity, &self.node.component)).await
    }

    /// Emits an `upgraded` event: the node now runs `new_version`.
    pub async fn upgraded(&self, new_version: &str) -> Result<EventRecord, PlatformError> {
        let n = &self.node;
        self.emitter.emit(Upgraded::new(&n.identity, &n.component, &n.version, new_version)).await
    }

    /// Sends alive events every `interval`, the first after a random splay of up to `splay`,
    /// until `shutdown`. A failed emission is logged and retried at the next tick: alive
    /// events are periodic state.
    pub async fn run_alive(&self, interval: Duration, splay: Duration, shutdown: Shutdown) {
        tokio::select! {
            _ = tokio::time::sleep(random_splay(splay)) => {}
            _ = shutdown.requested() => return,
        }
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.requested() => return,
            }
            if let Err(e) = self.alive(interval).await {
                tracing::warn!(error = %e, "alive event not stored");
            }
        }
    }
}

/// A uniformly random duration in `[0, max)`.
pub fn random_splay(max: Duration) -> Duration {
    if max.is_zero() {
        return max;
    }
    Duration::from_millis(fastrand::u64(0..max.as_millis().max(1) as u64))
}
