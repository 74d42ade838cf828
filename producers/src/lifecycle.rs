//! Lifecycle events of a node: startup, alive, shutdown, provisioned, upgraded.
//!
//! Alive events are what lets the inventory tell a quiet node from a dead one, so they come
//! on a fixed interval; the first one waits a random splay (up to one interval) so a fleet
//! restarted at once does not send its alive events at once (Choria go-choria #521).

use std::sync::Arc;
use std::time::Duration;

use chorus_schemas::lifecycle::{Alive, Provisioned, Shutdown, Startup, Upgraded};
use chorus_schemas::EventRecord;
use tokio::task::JoinHandle;

use crate::{Emitter, ProducerError};

/// Who is emitting lifecycle events.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub identity: String,
    /// What runs on the node: `server`, `provision_mode_server`, …; the last subject token.
    pub component: String,
    pub version: String,
}

/// Emits a node's lifecycle events through its emitter.
#[derive(Clone)]
pub struct LifecycleEmitter {
    node: NodeIdentity,
    emitter: Arc<Emitter>,
}

impl LifecycleEmitter {
    pub fn new(node: NodeIdentity, emitter: Arc<Emitter>) -> Self {
        LifecycleEmitter { node, emitter }
    }

    pub fn node(&self) -> &NodeIdentity {
        &self.node
    }

    pub async fn startup(&self) -> Result<EventRecord, ProducerError> {
        let n = &self.node;
        self.emitter.emit(Startup::new(&n.identity, &n.component, &n.version)).await
    }

    pub async fn alive(&self, interval: Duration) -> Result<EventRecord, ProducerError> {
        let n = &self.node;
        self.emitter.emit(Alive::new(&n.identity, &n.component, &n.version, Some(interval.as_secs()))).await
    }

    pub async fn shutdown(&self) -> Result<EventRecord, ProducerError> {
        self.emitter.emit(Shutdown::new(&self.node.identity, &self.node.component)).await
    }

    pub async fn provisioned(&self) -> Result<EventRecord, ProducerError> {
        self.emitter.emit(Provisioned::new(&self.node.identity, &self.node.component)).await
    }

    pub async fn upgraded(&self, new_version: &str) -> Result<EventRecord, ProducerError> {
        let n = &self.node;
        self.emitter.emit(Upgraded::new(&n.identity, &n.component, &n.version, new_version)).await
    }

    /// Sends alive events every `interval`, the first after a random splay of up to `splay`.
    /// A failed emission is logged and retried at the next tick: alive events are periodic state.
    pub fn spawn_alive(&self, interval: Duration, splay: Duration) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(random_splay(splay)).await;
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                if let Err(e) = this.alive(interval).await {
                    tracing::warn!(error = %e, "alive event not stored");
                }
            }
        })
    }
}

/// A uniformly random duration in `[0, max)`.
pub fn random_splay(max: Duration) -> Duration {
    if max.is_zero() {
        return max;
    }
    Duration::from_millis(fastrand::u64(0..max.as_millis().max(1) as u64))
}
