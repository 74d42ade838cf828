//! The provisioner: configures nodes that start in provisioning mode, over RPC, once.
//!
//! Modelled on Choria's provisioner. A node without configuration starts in *provisioning
//! mode* and publishes a `startup` lifecycle event with component `provision_mode_server`
//! (`choria.lifecycle.event.startup.provision_mode_server`). The provisioner reads those
//! events from `CHORUS_LIFECYCLE` with a durable backbone consumer, runs the configured
//! [`Step`]s on the node, each as a directed RPC request (`agent#action` with `data`, one reply
//! expected, with a timeout), in order, and when all succeeded publishes a `provisioned`
//! lifecycle event for the node (component `provisioner` by default).
//!
//! # State and guarantees
//!
//! Everything the provisioner knows about a node is one [`NodeRecord`] in a local sled tree
//! (`state_dir`), keyed by identity: [`NodeStatus`] pending, failed or provisioned, the
//! startup event being served, the last `provisioned` event known, the attempt count, the
//! steps done so far and, for a moment, the `provisioned` event being published. Every change
//! is one atomic write, flushed before it is relied on:
//!
//! * A startup event is acknowledged to the backbone only after the node's record is on disk,
//!   so a crash never loses a node (it is redelivered, or found pending by the sweep).
//! * After each successful step the next step index is written; a failed node, or a node left
//!   half-way by a graceful stop, resumes at the step that did not complete instead of running
//!   earlier steps again. (A crash *during* a step runs that one step again: steps should be
//!   idempotent, as Choria's are.)
//! * The `provisioned` event is stamped with the provisioner's sequence and written into the
//!   node's record (together with the next sequence, one batch) **before** it is published;
//!   after a crash the same event (same id, deduplicated by the stream) is published again.
//! * A node is provisioned by at most one task at a time (an in-flight set of identities),
//!   at most `concurrency` nodes at once (a semaphore), and never again once provisioned.
//!
//! # When a provisioned node is provisioned again
//!
//! Stream order decides, not clocks. The consumer reads both the startup events of the
//! provisioning components and every `provisioned` event (`choria.lifecycle.event.
//! provisioned.*`, also those published by Choria nodes or another provisioner), and each
//! [`EventRef`] carries the event's sequence in `CHORUS_LIFECYCLE`:
//!
//! * a startup whose event id is the one already served is a **duplicate** (a redelivery, a
//!   replay of the stream, a copy stored again after the dedupe window): skipped;
//! * a startup stored *before* the node's newest startup or its newest `provisioned` event is
//!   **stale**: skipped;
//! * a startup stored *after* the node's `provisioned` event means the node came back in
//!   provisioning mode (re-imaged, configuration lost): it is provisioned again
//!   ([`StartupOutcome::Reprovision`]);
//! * a startup of a pending or failed node that is newer than the one being served means the
//!   node restarted: its progress is reset and all steps run again for the new boot, and a run
//!   still in progress for the old boot discards its result.
//!
//! Because `provisioned` events are read too, a provisioner whose state directory was lost
//! rebuilds what it needs from the stream (a new durable consumer starts at the first
//! message, and no node is provisioned before the consumer has caught up once).
//!
//! # Failures
//!
//! A step that fails (an error reply, a denial by the node's Action Policy, no reply within
//! the timeout, a transport error) makes the node *failed*: it is retried by a periodic sweep
//! after a backoff that grows with its attempts (`backoff`). The sweep also picks up pending
//! nodes that were never started (after a restart, say). Messages that are not events, not
//! lifecycle events, or not startups of a provisioning component go to
//! `chorus.deadletter.<consumer>` (see [`chorus_platform::deadletter`]) and the provisioner goes on.
//!
//! ```no_run
//! # async fn demo(backbone: std::sync::Arc<dyn chorus_backbone::Backbone>, transport: std::sync::Arc<dyn chorus_rpc::Transport>) -> Result<(), Box<dyn std::error::Error>> {
//! use chorus_consumers::provisioner::{Provisioner, ProvisionerConfig};
//! use chorus_runtime::{Service as _, Shutdown};
//!
//! let config = ProvisionerConfig::from_yaml(r#"
//! state_dir: /var/lib/chorus/provisioner
//! steps:
//!   - {agent: rpcutil, action: ping}
//!   - {agent: rpcutil, action: get_fact, data: {fact: country}}
//! "#)?;
//! let mut provisioner = Provisioner::start(backbone, transport, config, Shutdown::new()).await?;
//! // ... until told to stop:
//! println!("{:?}", provisioner.stats());
//! provisioner.stop().await?;
//! # Ok(()) }
//! ```

//!
//! # Layout
//!
//! [`config`] (steps and settings), [`record`] (one node's state and its transitions, pure),
//! `store` (the records on disk), [`stats`] (counters), `engine` (the running service),
//! `consume` (reading the stream into records), `dispatch` (attempts on nodes) and [`metrics`]
//! (what `/metrics` and `/healthz` show).

mod config;
mod consume;
mod dispatch;
mod engine;
mod enrol;
mod error;
pub mod metrics;
mod record;
mod stats;
mod store;

#[cfg(test)]
mod tests;

pub use config::{ProvisionerConfig, Step};
pub use engine::{Monitor, Provisioner};
pub use enrol::EnrolConfig;
pub use error::ProvisionerError;
pub use record::{EventRef, NodeRecord, NodeStatus, ProvisionedOutcome, StartupOutcome};
pub use stats::{ProvisionerStats, StatsSnapshot, StatusCounts};

pub use chorus_schemas::lifecycle::PROVISION_MODE_COMPONENT;

/// Subject filter of every `provisioned` lifecycle event, whoever published it.
pub const PROVISIONED_FILTER: &str = "choria.lifecycle.event.provisioned.*";
