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
//! `chorus.deadletter.<consumer>` (see [`crate::deadletter`]) and the provisioner goes on.
//!
//! ```no_run
//! # async fn demo(backbone: std::sync::Arc<dyn chorus_backbone::Backbone>, transport: std::sync::Arc<dyn chorus_producers::rpc::Transport>) -> Result<(), Box<dyn std::error::Error>> {
//! use chorus_consumers::provisioner::{Provisioner, ProvisionerConfig};
//!
//! let config = ProvisionerConfig::from_yaml(r#"
//! state_dir: /var/lib/chorus/provisioner
//! steps:
//!   - {agent: rpcutil, action: ping}
//!   - {agent: rpcutil, action: get_fact, data: {fact: country}}
//! "#)?;
//! let provisioner = Provisioner::start(backbone, transport, config).await?;
//! // ... until told to stop:
//! println!("{:?}", provisioner.stats());
//! provisioner.stop().await?;
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;

use chorus_backbone::{Backbone, BackboneError, Consumer, ConsumerConfig, StartPosition, StoredMessage};
use chorus_producers::emitter::{to_message, BackboneSink};
use chorus_producers::rpc::transport::node_subject;
use chorus_producers::rpc::{RequestOptions, RpcClient, Target, Transport};
use chorus_producers::{Emitter, EventSink};
use chorus_schemas::lifecycle::{Lifecycle, LifecycleType, Provisioned};
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::subject::{self, validate_token, CHORUS_LIFECYCLE};
use chorus_schemas::{Event, EventRecord, StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::deadletter::{self, DeadLetter};

pub mod http;

/// The component of nodes in provisioning mode, as Choria names it.
pub const PROVISION_MODE_COMPONENT: &str = "provision_mode_server";

/// Subject filter of every `provisioned` lifecycle event, whoever published it.
pub const PROVISIONED_FILTER: &str = "choria.lifecycle.event.provisioned.*";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// One provisioning step: an RPC action run on the node, which must answer OK.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// RPC agent, e.g. `rpcutil` (Choria: `choria_provision`).
    pub agent: String,
    /// Action of the agent, e.g. `ping` (Choria: `gencsr`, `configure`, `restart`).
    pub action: String,
    /// Action inputs (a JSON object; empty when absent).
    #[serde(default)]
    pub data: JsonObject,
    /// How long to wait for the node's reply; `step_timeout` when absent.
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

impl Step {
    /// A step `agent#action` with no inputs and the default timeout.
    pub fn new(agent: impl Into<String>, action: impl Into<String>) -> Self {
        Step { agent: agent.into(), action: action.into(), data: JsonObject::new(), timeout: None }
    }

    /// Sets the action inputs.
    pub fn with_data(mut self, data: JsonObject) -> Self {
        self.data = data;
        self
    }

    fn label(&self) -> String {
        format!("{}#{}", self.agent, self.action)
    }
}

pub use crate::backoff::Backoff;

/// A failed node waits 10 s, then twice as long after each further failure, at most 10 min:
/// provisioning steps talk to nodes that may still be booting.
fn default_backoff() -> Backoff {
    Backoff { initial: Duration::from_secs(10), max: Duration::from_secs(600), multiplier: 2.0 }
}

/// Configuration of the provisioner (YAML or JSON; unknown fields are refused).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionerConfig {
    /// Durable consumer name on `CHORUS_LIFECYCLE`; dead letters go to
    /// `chorus.deadletter.<consumer>`.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// Components whose startup events mean "this node needs provisioning".
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// What to run on each node, in order.
    pub steps: Vec<Step>,
    /// Directory of the provisioner's state (sled).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Collective the nodes are reached in.
    #[serde(default = "default_collective")]
    pub collective: String,
    /// Caller id of the requests (what the nodes' Action Policy sees).
    #[serde(default = "default_callerid")]
    pub callerid: String,
    /// Sender id of the requests; this host's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub senderid: Option<String>,
    /// How long to wait for a node's reply to a step without its own `timeout`.
    #[serde(default = "default_step_timeout", with = "humantime_serde")]
    pub step_timeout: Duration,
    /// Seconds a node accepts a request after it was made.
    #[serde(default = "default_ttl")]
    pub ttl: u64,
    /// Nodes provisioned at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How often failed nodes (whose backoff has passed) and pending nodes are picked up.
    #[serde(default = "default_sweep_interval", with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Pause before a failed node is tried again.
    #[serde(default = "default_backoff")]
    pub backoff: Backoff,
    /// Component of the `provisioned` events the provisioner publishes.
    #[serde(default = "default_event_component")]
    pub event_component: String,
    /// Site stamped on the `provisioned` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Where the durable consumer starts when it is first created.
    #[serde(default)]
    pub start: StartPosition,
    /// Events fetched per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a fetch waits for events.
    #[serde(default = "default_fetch_wait", with = "humantime_serde")]
    pub fetch_wait: Duration,
    /// Redelivery of an event not acknowledged after this long.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
}

fn default_consumer() -> String {
    "provisioner".into()
}
fn default_components() -> Vec<String> {
    vec![PROVISION_MODE_COMPONENT.into()]
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("chorus-data/provisioner")
}
fn default_collective() -> String {
    "choria".into()
}
fn default_callerid() -> String {
    "choria=provisioner".into()
}
fn default_step_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_ttl() -> u64 {
    chorus_schemas::RpcRequest::DEFAULT_TTL
}
fn default_concurrency() -> usize {
    50
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_event_component() -> String {
    "provisioner".into()
}
fn default_batch_size() -> usize {
    256
}
fn default_fetch_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_ack_wait() -> Duration {
    Duration::from_secs(60)
}

impl ProvisionerConfig {
    /// Defaults with these steps.
    pub fn new(steps: Vec<Step>) -> Self {
        ProvisionerConfig {
            consumer: default_consumer(),
            components: default_components(),
            steps,
            state_dir: default_state_dir(),
            collective: default_collective(),
            callerid: default_callerid(),
            senderid: None,
            step_timeout: default_step_timeout(),
            ttl: default_ttl(),
            concurrency: default_concurrency(),
            sweep_interval: default_sweep_interval(),
            backoff: default_backoff(),
            event_component: default_event_component(),
            site: None,
            start: StartPosition::First,
            batch_size: default_batch_size(),
            fetch_wait: default_fetch_wait(),
            ack_wait: default_ack_wait(),
        }
    }

    /// Reads and validates a YAML (or JSON) file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self, ProvisionerError> {
        crate::config_file::load(path, Self::check).map_err(ProvisionerError::Config)
    }

    /// Parses and validates YAML (or JSON) text.
    pub fn from_yaml(text: &str) -> Result<Self, ProvisionerError> {
        crate::config_file::from_text(text, Self::check).map_err(ProvisionerError::Config)
    }

    /// Rejects settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), ProvisionerError> {
        self.check().map_err(ProvisionerError::Config)
    }

    fn check(&self) -> Result<(), String> {
        validate_token("consumer", &self.consumer).map_err(|e| format!("consumer: {e}"))?;
        self.consumer_config().validate().map_err(|e| format!("consumer: {e}"))?;
        if self.components.is_empty() {
            return Err("components must list at least one component".into());
        }
        for (i, c) in self.components.iter().enumerate() {
            validate_token("component", c).map_err(|e| format!("components[{i}]: {e}"))?;
        }
        if self.steps.is_empty() {
            return Err("steps must list at least one step".into());
        }
        for (i, s) in self.steps.iter().enumerate() {
            validate_token("agent", &s.agent).map_err(|e| format!("steps[{i}].agent: {e}"))?;
            if s.action.is_empty() || s.action.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("steps[{i}].action: {:?} is not an action name", s.action));
            }
            if s.timeout.is_some_and(|t| t.is_zero()) {
                return Err(format!("steps[{i}].timeout must be > 0"));
            }
        }
        validate_token("collective", &self.collective).map_err(|e| format!("collective: {e}"))?;
        if self.callerid.is_empty() {
            return Err("callerid must not be empty".into());
        }
        if self.senderid.as_deref().is_some_and(str::is_empty) {
            return Err("senderid must not be empty".into());
        }
        if self.step_timeout.is_zero() {
            return Err("step_timeout must be > 0".into());
        }
        if self.ttl == 0 {
            return Err("ttl must be > 0".into());
        }
        if self.concurrency == 0 {
            return Err("concurrency must be > 0".into());
        }
        if self.sweep_interval < Duration::from_millis(100) {
            return Err("sweep_interval must be >= 100ms".into());
        }
        let b = &self.backoff;
        if b.initial.is_zero() {
            return Err("backoff.initial must be > 0".into());
        }
        if b.max < b.initial {
            return Err("backoff.max must not be shorter than backoff.initial".into());
        }
        if !(b.multiplier.is_finite() && b.multiplier >= 1.0) {
            return Err("backoff.multiplier must be a number >= 1".into());
        }
        validate_token("component", &self.event_component).map_err(|e| format!("event_component: {e}"))?;
        if let Some(site) = &self.site {
            validate_token("site", site).map_err(|e| format!("site: {e}"))?;
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return Err("batch_size must be 1..=10000".into());
        }
        if self.fetch_wait.is_zero() {
            return Err("fetch_wait must be > 0".into());
        }
        Ok(())
    }

    /// Subject filters of the durable consumer: startups of every provisioning component and
    /// every `provisioned` event.
    pub fn filter_subjects(&self) -> Vec<String> {
        let mut filters: Vec<String> =
            self.components.iter().filter_map(|c| subject::lifecycle(LifecycleType::Startup, c).ok()).collect();
        filters.push(PROVISIONED_FILTER.into());
        filters
    }

    /// The durable consumer the provisioner reads `CHORUS_LIFECYCLE` with.
    pub fn consumer_config(&self) -> ConsumerConfig {
        let mut c =
            ConsumerConfig::new(self.consumer.clone()).with_start(self.start.clone()).with_ack_wait(self.ack_wait);
        c.filter_subjects = self.filter_subjects();
        c
    }
}

/// Why the provisioner could not start or had to stop. Malformed events and failing nodes
/// are not errors (they are dead-lettered and retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionerError {
    /// The configuration is invalid (the message names the field).
    #[error("provisioner configuration: {0}")]
    Config(String),
    /// The state store (sled) failed.
    #[error("provisioner state: {0}")]
    Storage(#[from] sled::Error),
    /// The state store holds something the provisioner did not write.
    #[error("provisioner state is corrupt: {0}")]
    Corrupt(String),
    /// The backbone failed (opening the consumer, creating the dead-letter stream).
    #[error("backbone: {0}")]
    Backbone(#[from] BackboneError),
    /// A task of the provisioner panicked or could not be joined.
    #[error("provisioner task: {0}")]
    Task(String),
}

// ---------------------------------------------------------------------------------------------
// State of one node, and its transitions
// ---------------------------------------------------------------------------------------------

/// Where a node is in provisioning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// A provisioning-mode startup was seen; the node waits for (or is in) its first attempt.
    Pending,
    /// The last attempt failed; it is retried after `next_attempt_at`.
    Failed,
    /// Provisioned: its `provisioned` event is stored.
    Provisioned,
}

/// A lifecycle event as the provisioner remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    /// The event id (CloudEvents `id`).
    pub event_id: String,
    /// Its sequence in `CHORUS_LIFECYCLE`; 0 when unknown (a re-published event JetStream
    /// reported as a duplicate without its sequence).
    pub sequence: u64,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Its component.
    pub component: String,
}

/// What the provisioner knows about one node; one atomic sled value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub identity: String,
    pub status: NodeStatus,
    /// The provisioning-mode startup being served (the node's current boot).
    pub startup: Option<EventRef>,
    /// The newest `provisioned` event known for the node (ours or anyone's).
    pub provisioned: Option<EventRef>,
    /// Attempts finished for the current boot, failed ones and the successful one.
    pub attempts: u32,
    /// Steps that succeeded in the current boot: the next attempt starts at this index.
    pub next_step: usize,
    /// A pending or failed node is not attempted before this time.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// The `provisioned` event (encoded) stamped for this boot and not yet confirmed stored;
    /// published again, with the same id, until it is.
    pub outbox: Option<String>,
    /// Times the node went to provisioned (more than 1 after re-provisioning).
    pub times_provisioned: u32,
    /// Last change of this record.
    pub updated_at: DateTime<Utc>,
}

/// What a provisioning-mode startup event did to a node's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupOutcome {
    /// First startup seen for the node: pending.
    New,
    /// A newer boot of a pending or failed node: progress reset, pending.
    Restarted,
    /// The node came back in provisioning mode after it was provisioned: pending again.
    Reprovision,
    /// The startup already served (same event id): nothing changes.
    Duplicate,
    /// Stored before the node's current startup or its `provisioned` event: nothing changes.
    Stale,
}

impl StartupOutcome {
    /// Whether the node now needs provisioning.
    pub fn is_due(self) -> bool {
        matches!(self, StartupOutcome::New | StartupOutcome::Restarted | StartupOutcome::Reprovision)
    }
}

/// What a `provisioned` event did to a node's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProvisionedOutcome {
    /// The node is now provisioned.
    Recorded,
    /// Already known (same event, or an older one): nothing changes.
    Duplicate,
    /// The node started in provisioning mode after this event: remembered, the node stays
    /// pending.
    Superseded,
}

impl NodeRecord {
    /// A node never seen before.
    pub fn new(identity: impl Into<String>, now: DateTime<Utc>) -> Self {
        NodeRecord {
            identity: identity.into(),
            status: NodeStatus::Pending,
            startup: None,
            provisioned: None,
            attempts: 0,
            next_step: 0,
            next_attempt_at: None,
            last_error: None,
            outbox: None,
            times_provisioned: 0,
            updated_at: now,
        }
    }

    /// Applies a provisioning-mode startup event (see the module documentation).
    pub fn on_startup(&mut self, seen: EventRef, now: DateTime<Utc>) -> StartupOutcome {
        if let Some(current) = &self.startup {
            if current.event_id == seen.event_id {
                return StartupOutcome::Duplicate;
            }
            if current.sequence >= seen.sequence {
                return StartupOutcome::Stale;
            }
        }
        if self.provisioned.as_ref().is_some_and(|p| p.event_id == seen.event_id || p.sequence >= seen.sequence) {
            return StartupOutcome::Stale;
        }
        let outcome = match (self.status, &self.startup) {
            (NodeStatus::Provisioned, _) => StartupOutcome::Reprovision,
            (_, None) => StartupOutcome::New,
            (_, Some(_)) => StartupOutcome::Restarted,
        };
        self.startup = Some(seen);
        self.status = NodeStatus::Pending;
        self.attempts = 0;
        self.next_step = 0;
        self.next_attempt_at = Some(now);
        self.last_error = None;
        // A provisioned event stamped for the previous boot must not confirm this one.
        self.outbox = None;
        self.updated_at = now;
        outcome
    }

    /// Applies a `provisioned` event (ours, read back, or anyone's).
    pub fn on_provisioned(&mut self, seen: EventRef, now: DateTime<Utc>) -> ProvisionedOutcome {
        if let Some(known) = &mut self.provisioned {
            if known.event_id == seen.event_id {
                // Our own event confirmed without its sequence (a re-publish JetStream called a
                // duplicate): learn the sequence now.
                if known.sequence == 0 && seen.sequence > 0 {
                    known.sequence = seen.sequence;
                    self.updated_at = now;
                }
                return ProvisionedOutcome::Duplicate;
            }
            if known.sequence >= seen.sequence {
                return ProvisionedOutcome::Duplicate;
            }
        }
        if self.startup.as_ref().is_some_and(|s| s.sequence > seen.sequence) {
            self.provisioned = Some(seen);
            self.updated_at = now;
            return ProvisionedOutcome::Superseded;
        }
        self.mark_provisioned(seen, now);
        ProvisionedOutcome::Recorded
    }

    /// Whether an attempt (or the publication of a stamped event) should start now.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.status != NodeStatus::Provisioned
            && (self.startup.is_some() || self.outbox.is_some())
            && !matches!(self.next_attempt_at, Some(t) if t > now)
    }

    /// Step `index` succeeded: the next attempt starts after it.
    pub fn step_done(&mut self, index: usize, now: DateTime<Utc>) {
        self.next_step = self.next_step.max(index + 1);
        self.updated_at = now;
    }

    /// An attempt failed: failed, tried again after the backoff.
    pub fn attempt_failed(&mut self, error: String, backoff: &Backoff, now: DateTime<Utc>) {
        self.attempts = self.attempts.saturating_add(1);
        self.status = NodeStatus::Failed;
        let delay = chrono::Duration::from_std(backoff.delay(self.attempts)).unwrap_or(chrono::Duration::MAX);
        self.next_attempt_at = Some(now.checked_add_signed(delay).unwrap_or(DateTime::<Utc>::MAX_UTC));
        self.last_error = Some(error);
        self.updated_at = now;
    }

    /// Our `provisioned` event for this boot is stored.
    pub fn confirmed(&mut self, seen: EventRef, now: DateTime<Utc>) {
        self.attempts = self.attempts.saturating_add(1);
        self.mark_provisioned(seen, now);
    }

    fn mark_provisioned(&mut self, seen: EventRef, now: DateTime<Utc>) {
        self.status = NodeStatus::Provisioned;
        self.provisioned = Some(seen);
        self.next_attempt_at = None;
        self.last_error = None;
        self.outbox = None;
        self.times_provisioned = self.times_provisioned.saturating_add(1);
        self.updated_at = now;
    }

    /// The event id of the boot being served.
    fn boot(&self) -> Option<&str> {
        self.startup.as_ref().map(|s| s.event_id.as_str())
    }

    /// Whether an attempt begun for `boot` may still record its result.
    fn serves(&self, boot: Option<&str>) -> bool {
        self.status != NodeStatus::Provisioned && self.boot() == boot
    }
}

// ---------------------------------------------------------------------------------------------
// Persistent state
// ---------------------------------------------------------------------------------------------

const TREE: &str = "chorus/provisioner";
const NODE_PREFIX: &[u8] = b"n/";
const NEXT_SEQ_KEY: &[u8] = b"m/next_seq";

/// Node records and the provisioner's event sequence in one sled tree. Read-modify-writes
/// are serialised by a lock; each is one atomic batch.
///
/// Flushes are group commits: one at a time (many concurrent `flush_async` calls deadlock
/// sled 0.34's thread pool), and a caller whose writes an earlier flush already covered
/// returns at once.
struct StateStore {
    db: sled::Db,
    tree: sled::Tree,
    lock: Mutex<()>,
    /// Batches applied so far (incremented after each one).
    written: AtomicU64,
    /// `written` as it was when the last completed flush began.
    flushed: AtomicU64,
    flushing: tokio::sync::Mutex<()>,
}

impl StateStore {
    fn open(path: &Path) -> Result<Self, ProvisionerError> {
        std::fs::create_dir_all(path)
            .map_err(|e| ProvisionerError::Config(format!("state_dir {}: {e}", path.display())))?;
        let db = sled::open(path)?;
        let tree = db.open_tree(TREE)?;
        Ok(StateStore {
            db,
            tree,
            lock: Mutex::new(()),
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    fn key(identity: &str) -> Vec<u8> {
        let mut k = NODE_PREFIX.to_vec();
        k.extend_from_slice(identity.as_bytes());
        k
    }

    fn decode(key: &[u8], value: &[u8]) -> Result<NodeRecord, ProvisionerError> {
        serde_json::from_slice(value)
            .map_err(|e| ProvisionerError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(key))))
    }

    fn get(&self, identity: &str) -> Result<Option<NodeRecord>, ProvisionerError> {
        let key = Self::key(identity);
        self.tree.get(&key)?.map(|v| Self::decode(&key, &v)).transpose()
    }

    /// Reads the node's record, lets `f` change it (or create it) and set the next event
    /// sequence, and writes both in one batch when anything changed.
    fn modify<T>(
        &self,
        identity: &str,
        f: impl FnOnce(&mut Option<NodeRecord>, &mut Option<u64>) -> T,
    ) -> Result<T, ProvisionerError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(identity);
        let before = self.tree.get(&key)?.map(|v| Self::decode(&key, &v)).transpose()?;
        let mut record = before.clone();
        let mut next_seq = None;
        let out = f(&mut record, &mut next_seq);
        let mut batch = sled::Batch::default();
        let mut changed = false;
        if record != before {
            match &record {
                Some(r) => batch.insert(key, serde_json::to_vec(r).expect("a node record serializes")),
                None => batch.remove(key),
            }
            changed = true;
        }
        if let Some(seq) = next_seq {
            batch.insert(NEXT_SEQ_KEY, &seq.to_be_bytes());
            changed = true;
        }
        if changed {
            self.tree.apply_batch(batch)?;
            self.written.fetch_add(1, Ordering::SeqCst);
        }
        Ok(out)
    }

    /// The sequence of the next event the provisioner publishes (1 at first).
    fn next_seq(&self) -> Result<u64, ProvisionerError> {
        match self.tree.get(NEXT_SEQ_KEY)? {
            None => Ok(1),
            Some(v) => <[u8; 8]>::try_from(&v[..])
                .map(u64::from_be_bytes)
                .map_err(|_| ProvisionerError::Corrupt(format!("next_seq is {} bytes, not 8", v.len()))),
        }
    }

    fn all(&self) -> Result<Vec<NodeRecord>, ProvisionerError> {
        self.tree
            .scan_prefix(NODE_PREFIX)
            .map(|item| {
                let (k, v) = item?;
                Self::decode(&k, &v)
            })
            .collect()
    }

    /// Makes every write applied before this call durable.
    async fn flush(&self) -> Result<(), ProvisionerError> {
        let wanted = self.written.load(Ordering::SeqCst);
        let _one_at_a_time = self.flushing.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let covers = self.written.load(Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| ProvisionerError::Task(format!("flush: {e}")))??;
        self.flushed.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Counters of a running provisioner (lock-free; read with [`ProvisionerStats::snapshot`]).
#[derive(Debug, Default)]
pub struct ProvisionerStats {
    startups: AtomicU64,
    duplicate_startups: AtomicU64,
    stale_startups: AtomicU64,
    reprovisions: AtomicU64,
    provisioned_events: AtomicU64,
    provisioned: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    steps_ok: AtomicU64,
    dead_lettered: AtomicU64,
    in_flight: AtomicU64,
    queued: AtomicU64,
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
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

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
    pub pending: u64,
    pub failed: u64,
    pub provisioned: u64,
}

// ---------------------------------------------------------------------------------------------
// The running provisioner
// ---------------------------------------------------------------------------------------------

/// A running provisioner: a consumer task reading `CHORUS_LIFECYCLE` and a dispatcher task
/// running provisioning attempts. Stop it with [`Provisioner::stop`].
pub struct Provisioner {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    consumer: JoinHandle<Result<(), ProvisionerError>>,
    dispatcher: JoinHandle<Result<(), ProvisionerError>>,
}

struct Shared {
    config: ProvisionerConfig,
    backbone: Arc<dyn Backbone>,
    rpc: RpcClient,
    store: StateStore,
    /// Stamps the `provisioned` events with the provisioner's own sequence (persisted in the
    /// state store) and site. Replaced by one further on when the stream shows events of this
    /// component with higher sequences (a state directory rebuilt from the stream).
    emitter: Mutex<Emitter>,
    sink: Arc<dyn EventSink>,
    stats: Arc<ProvisionerStats>,
    /// Identities with a task (waiting for a slot or running): never two at once.
    in_flight: Mutex<HashSet<String>>,
    permits: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    /// True once the consumer has read everything stored when it started.
    caught_up: watch::Sender<bool>,
    /// Set when the consumer or the dispatcher task ended (a stop, or a failure).
    ended: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn counts(&self) -> Result<StatusCounts, ProvisionerError> {
        let mut c = StatusCounts::default();
        for n in self.store.all()? {
            match n.status {
                NodeStatus::Pending => c.pending += 1,
                NodeStatus::Failed => c.failed += 1,
                NodeStatus::Provisioned => c.provisioned += 1,
            }
        }
        Ok(c)
    }
}

/// A read-only view of a running provisioner for monitoring (see [`http`]): cheap to clone,
/// usable after the [`Provisioner`] itself was moved into whatever stops it. It keeps the
/// state store open: drop it before starting another provisioner on the same `state_dir`
/// (for counters alone, [`Provisioner::stats_handle`] holds nothing else).
#[derive(Clone)]
pub struct Monitor {
    shared: Arc<Shared>,
}

impl Monitor {
    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Nodes by status (reads the whole state store: call it off the async threads for
    /// large fleets).
    pub fn counts(&self) -> Result<StatusCounts, ProvisionerError> {
        self.shared.counts()
    }

    /// See [`Provisioner::caught_up`].
    pub fn caught_up(&self) -> bool {
        *self.shared.caught_up.borrow()
    }

    /// Whether both tasks still run (false once stopped or failed).
    pub fn running(&self) -> bool {
        !self.shared.ended.load(Ordering::Acquire)
    }
}

/// Removes an identity from the in-flight set when its task ends, however it ends.
struct InFlight {
    shared: Arc<Shared>,
    identity: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.identity);
    }
}

/// What one consumed message asks for.
enum Applied {
    Nothing,
    Due(String),
    Reject(&'static str, String),
}

impl Provisioner {
    /// Opens the state in `config.state_dir`, the durable consumer on `CHORUS_LIFECYCLE` (which
    /// must exist) and the dead-letter stream (created when missing), and starts provisioning.
    /// Requests go out on `transport` as `config.callerid` in `config.collective`.
    pub async fn start(
        backbone: Arc<dyn Backbone>,
        transport: Arc<dyn Transport>,
        config: ProvisionerConfig,
    ) -> Result<Provisioner, ProvisionerError> {
        config.validate()?;
        let store = StateStore::open(&config.state_dir)?;
        deadletter::ensure_stream(&*backbone).await?;
        let consumer = backbone.consumer(CHORUS_LIFECYCLE, &config.consumer_config()).await?;
        let mut rpc = RpcClient::new(transport, config.callerid.clone(), config.collective.clone());
        if let Some(sender) = &config.senderid {
            rpc = rpc.with_senderid(sender.clone());
        }
        let sink: Arc<dyn EventSink> = Arc::new(BackboneSink(backbone.clone()));
        let emitter = Mutex::new(Emitter::new(sink.clone(), store.next_seq()?, config.site.clone()));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (due_tx, due_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(config.concurrency)),
            config,
            backbone,
            rpc,
            store,
            emitter,
            sink,
            stats: Arc::default(),
            in_flight: Mutex::new(HashSet::new()),
            shutdown: shutdown_rx,
            caught_up: watch::channel(false).0,
            ended: std::sync::atomic::AtomicBool::new(false),
        });
        let ending = |shared: Arc<Shared>| {
            move |r: Result<(), ProvisionerError>| {
                shared.ended.store(true, Ordering::Release);
                r
            }
        };
        let consumer = tokio::spawn(consume(shared.clone(), consumer, due_tx).map(ending(shared.clone())));
        let dispatcher = tokio::spawn(dispatch_loop(shared.clone(), due_rx).map(ending(shared.clone())));
        Ok(Provisioner { shared, shutdown: shutdown_tx, consumer, dispatcher })
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The live counters, for a metrics exporter.
    pub fn stats_handle(&self) -> Arc<ProvisionerStats> {
        self.shared.stats.clone()
    }

    /// The record of one node.
    pub fn node(&self, identity: &str) -> Result<Option<NodeRecord>, ProvisionerError> {
        self.shared.store.get(identity)
    }

    /// Every node record, in identity order.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, ProvisionerError> {
        self.shared.store.all()
    }

    /// Nodes by status.
    pub fn counts(&self) -> Result<StatusCounts, ProvisionerError> {
        self.shared.counts()
    }

    /// A monitoring handle (metrics, health) that outlives moves of the provisioner.
    pub fn monitor(&self) -> Monitor {
        Monitor { shared: self.shared.clone() }
    }

    /// Whether the consumer has read everything that was stored when it started (until then
    /// nothing is provisioned).
    pub fn caught_up(&self) -> bool {
        *self.shared.caught_up.borrow()
    }

    /// Whether the provisioner stopped on its own (a state store failure); [`Provisioner::stop`]
    /// returns why.
    pub fn is_finished(&self) -> bool {
        self.consumer.is_finished() || self.dispatcher.is_finished()
    }

    /// Stops gracefully: no new event is read and no new attempt starts; attempts in progress
    /// finish the step they are in, record it, and stop, so a restarted provisioner resumes
    /// them at the next step. Returns the first error that stopped a task.
    pub async fn stop(self) -> Result<(), ProvisionerError> {
        let _ = self.shutdown.send(true);
        let join = |r: Result<Result<(), ProvisionerError>, tokio::task::JoinError>| match r {
            Ok(r) => r,
            Err(e) => Err(ProvisionerError::Task(e.to_string())),
        };
        let consumed = join(self.consumer.await);
        let dispatched = join(self.dispatcher.await);
        self.shared.store.flush().await?;
        consumed.and(dispatched)
    }
}

/// Reads startup and provisioned events, records them, acknowledges them, and hands nodes
/// that became due to the dispatcher.
async fn consume(
    shared: Arc<Shared>,
    mut consumer: Box<dyn Consumer>,
    due: mpsc::UnboundedSender<String>,
) -> Result<(), ProvisionerError> {
    let cfg = &shared.config;
    let mut shutdown = shared.shutdown.clone();
    let mut errors = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let fetched = tokio::select! {
            r = consumer.fetch(cfg.batch_size, cfg.fetch_wait) => r,
            _ = shutdown.changed() => return Ok(()),
        };
        let deliveries = match fetched {
            Ok(d) => {
                errors = 0;
                d
            }
            Err(e) => {
                errors = errors.saturating_add(1);
                let pause = Duration::from_millis(200).saturating_mul(1 << errors.min(6)).min(Duration::from_secs(10));
                tracing::warn!(error = %e, ?pause, "provisioner: reading {CHORUS_LIFECYCLE} failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                continue;
            }
        };
        if deliveries.is_empty() {
            shared.caught_up.send_if_modified(|c| !std::mem::replace(c, true));
            continue;
        }
        let mut letters = Vec::new();
        let mut lettered = HashSet::new();
        let mut now_due = Vec::new();
        for (i, d) in deliveries.iter().enumerate() {
            match shared.apply(&d.message)? {
                Applied::Nothing => {}
                Applied::Due(identity) => now_due.push(identity),
                Applied::Reject(code, reason) => {
                    tracing::warn!(sequence = d.message.sequence, subject = %d.message.subject, %reason, "provisioner: dead-lettering");
                    letters.push(DeadLetter::new(&cfg.consumer, &d.message, code, reason));
                    lettered.insert(i);
                }
            }
        }
        // Acknowledge only what is on disk.
        shared.store.flush().await?;
        let letters_stored = match deadletter::publish(&*shared.backbone, &letters).await {
            Ok(()) => {
                shared.stats.dead_lettered.fetch_add(letters.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "provisioner: dead letters not stored; their messages will be redelivered");
                false
            }
        };
        for (i, d) in deliveries.iter().enumerate() {
            if !letters_stored && lettered.contains(&i) {
                continue;
            }
            if let Err(e) = d.ack().await {
                // Redelivered later and recognised as a duplicate.
                tracing::debug!(error = %e, sequence = d.message.sequence, "provisioner: ack failed");
            }
        }
        for identity in now_due {
            let _ = due.send(identity);
        }
        if deliveries.len() < cfg.batch_size
            && !*shared.caught_up.borrow()
            && consumer.pending().await.is_ok_and(|p| p == 0)
        {
            shared.caught_up.send_if_modified(|c| !std::mem::replace(c, true));
        }
    }
}

/// Starts attempts for nodes the consumer reports and, every `sweep_interval`, for every due
/// node; on shutdown waits for the attempts in progress.
async fn dispatch_loop(shared: Arc<Shared>, mut due: mpsc::UnboundedReceiver<String>) -> Result<(), ProvisionerError> {
    let mut shutdown = shared.shutdown.clone();
    let mut caught_up = shared.caught_up.subscribe();
    let mut ticker = tokio::time::interval(shared.config.sweep_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: JoinSet<()> = JoinSet::new();
    let result = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        tokio::select! {
            _ = shutdown.changed() => break Ok(()),
            Some(identity) = due.recv() => {
                if *caught_up.borrow() {
                    shared.dispatch(identity, &mut running);
                }
            }
            _ = ticker.tick() => {
                if *caught_up.borrow() {
                    if let Err(e) = shared.sweep(&mut running) {
                        break Err(e);
                    }
                }
            }
            Ok(()) = caught_up.changed() => {
                if *caught_up.borrow_and_update() {
                    if let Err(e) = shared.sweep(&mut running) {
                        break Err(e);
                    }
                }
            }
            Some(joined) = running.join_next(), if !running.is_empty() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "provisioner: a provisioning task panicked");
                }
            }
        }
    };
    while running.join_next().await.is_some() {}
    result
}

impl Shared {
    fn emitter(&self) -> std::sync::MutexGuard<'_, Emitter> {
        self.emitter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one consumed message in the node's state.
    fn apply(&self, message: &StoredMessage) -> Result<Applied, ProvisionerError> {
        let record = match EventRecord::decode(&message.payload) {
            Ok(r) => r,
            Err(e) => return Ok(Applied::Reject(e.code(), e.to_string())),
        };
        let Event::Lifecycle(event) = &record.data else {
            return Ok(Applied::Reject("rejected", format!("{} is not a lifecycle event", record.data.event_type())));
        };
        let identity = event.identity();
        // Identities usually contain dots; what matters is that the directed subject is valid.
        let directed = node_subject(&self.config.collective, identity);
        if identity.is_empty() || chorus_backbone::subject::validate_publish_subject(&directed).is_err() {
            return Ok(Applied::Reject("rejected", format!("node identity {identity:?} cannot be addressed over RPC")));
        }
        let seen = EventRef {
            event_id: record.id.clone(),
            sequence: message.sequence,
            time: record.time,
            component: event.component().to_owned(),
        };
        let now = Utc::now();
        let stats = &self.stats;
        match event {
            Lifecycle::Startup(_) => {
                if !self.config.components.iter().any(|c| c == event.component()) {
                    return Ok(Applied::Reject(
                        "rejected",
                        format!("startup of component {} is not a provisioning component", event.component()),
                    ));
                }
                ProvisionerStats::bump(&stats.startups);
                let outcome = self.store.modify(identity, |record, _| {
                    record.get_or_insert_with(|| NodeRecord::new(identity, now)).on_startup(seen, now)
                })?;
                match outcome {
                    StartupOutcome::Duplicate => ProvisionerStats::bump(&stats.duplicate_startups),
                    StartupOutcome::Stale => ProvisionerStats::bump(&stats.stale_startups),
                    StartupOutcome::Reprovision => {
                        ProvisionerStats::bump(&stats.reprovisions);
                        tracing::info!(%identity, "provisioner: provisioned node started in provisioning mode again");
                    }
                    StartupOutcome::New | StartupOutcome::Restarted => {}
                }
                Ok(if outcome.is_due() { Applied::Due(identity.to_owned()) } else { Applied::Nothing })
            }
            Lifecycle::Provisioned(_) => {
                ProvisionerStats::bump(&stats.provisioned_events);
                let ours = event.component() == self.config.event_component && record.site == self.config.site;
                self.store.modify(identity, |node, next_seq| {
                    // Never number an event below one of ours already stored.
                    let mut emitter = self.emitter();
                    if ours && record.seq >= emitter.next_seq() {
                        *emitter = Emitter::new(self.sink.clone(), record.seq + 1, self.config.site.clone());
                        *next_seq = Some(record.seq + 1);
                    }
                    node.get_or_insert_with(|| NodeRecord::new(identity, now)).on_provisioned(seen, now)
                })?;
                Ok(Applied::Nothing)
            }
            other => Ok(Applied::Reject(
                "rejected",
                format!("{} event on a subject the provisioner reads", other.lifecycle_type()),
            )),
        }
    }

    /// Starts an attempt for `identity` unless one is already waiting or running.
    fn dispatch(self: &Arc<Self>, identity: String, running: &mut JoinSet<()>) {
        if !self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(identity.clone()) {
            return;
        }
        let guard = InFlight { shared: self.clone(), identity: identity.clone() };
        let this = self.clone();
        ProvisionerStats::bump(&this.stats.queued);
        running.spawn(async move {
            let _guard = guard;
            let mut shutdown = this.shutdown.clone();
            let permit = tokio::select! {
                p = this.permits.clone().acquire_owned() => p.ok(),
                _ = shutdown.changed() => None,
            };
            this.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let Some(_permit) = permit else { return };
            if *shutdown.borrow() {
                return;
            }
            ProvisionerStats::bump(&this.stats.in_flight);
            if let Err(e) = this.provision(&identity).await {
                tracing::error!(%identity, error = %e, "provisioner: attempt aborted; the sweep retries it");
            }
            this.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Starts an attempt for every due node.
    fn sweep(self: &Arc<Self>, running: &mut JoinSet<()>) -> Result<(), ProvisionerError> {
        let now = Utc::now();
        for record in self.store.all()? {
            if record.is_due(now) {
                self.dispatch(record.identity, running);
            }
        }
        Ok(())
    }

    /// One attempt on one node: the remaining steps, then the `provisioned` event.
    async fn provision(&self, identity: &str) -> Result<(), ProvisionerError> {
        let Some(record) = self.store.get(identity)? else { return Ok(()) };
        if !record.is_due(Utc::now()) {
            return Ok(());
        }
        let boot = record.boot().map(str::to_owned);
        let boot = boot.as_deref();
        if record.outbox.is_none() {
            if record.attempts > 0 {
                ProvisionerStats::bump(&self.stats.retries);
            }
            for (i, step) in self.config.steps.iter().enumerate().skip(record.next_step) {
                if *self.shutdown.borrow() {
                    return Ok(());
                }
                let result = self.run_step(identity, step).await;
                let now = Utc::now();
                let current = match result {
                    Ok(()) => {
                        ProvisionerStats::bump(&self.stats.steps_ok);
                        self.store.modify(identity, |r, _| match r {
                            Some(r) if r.serves(boot) => {
                                r.step_done(i, now);
                                true
                            }
                            _ => false,
                        })?
                    }
                    Err(reason) => {
                        ProvisionerStats::bump(&self.stats.failed);
                        let error = format!("step {} ({}): {reason}", i + 1, step.label());
                        tracing::warn!(%identity, %error, "provisioner: attempt failed; will retry");
                        self.store.modify(identity, |r, _| {
                            if let Some(r) = r.as_mut().filter(|r| r.serves(boot)) {
                                r.attempt_failed(error, &self.config.backoff, now);
                            }
                        })?;
                        self.store.flush().await?;
                        return Ok(());
                    }
                };
                self.store.flush().await?;
                if !current {
                    tracing::info!(%identity, "provisioner: node restarted during the attempt; starting over");
                    return Ok(());
                }
            }
            // Stamp the event and keep it with the node before publishing it: a crash from here
            // on publishes the same event again.
            let stamped = self.store.modify(identity, |r, next_seq| match r {
                Some(r) if r.serves(boot) && r.outbox.is_none() => {
                    let event = self.emitter().stamp(Provisioned::new(identity, &self.config.event_component));
                    *next_seq = Some(event.seq + 1);
                    r.outbox = Some(String::from_utf8(event.encode()).expect("events encode to UTF-8 JSON"));
                    r.updated_at = Utc::now();
                    true
                }
                _ => false,
            })?;
            self.store.flush().await?;
            if !stamped {
                return Ok(());
            }
        }
        self.publish_outbox(identity).await
    }

    /// Publishes the node's stamped `provisioned` event and records the node provisioned.
    async fn publish_outbox(&self, identity: &str) -> Result<(), ProvisionerError> {
        let Some(encoded) = self.store.get(identity)?.and_then(|r| r.outbox) else { return Ok(()) };
        let event = EventRecord::decode(encoded.as_bytes())
            .map_err(|e| ProvisionerError::Corrupt(format!("stamped event of {identity}: {e}")))?;
        let message =
            to_message(&event).map_err(|e| ProvisionerError::Corrupt(format!("stamped event of {identity}: {e}")))?;
        match self.backbone.publish(message).await {
            Ok(ack) => {
                let seen = EventRef {
                    event_id: event.id.clone(),
                    sequence: if ack.stream == CHORUS_LIFECYCLE { ack.sequence } else { 0 },
                    time: event.time,
                    component: self.config.event_component.clone(),
                };
                let now = Utc::now();
                let done = self.store.modify(identity, |r, _| match r {
                    Some(r) if r.outbox.as_deref() == Some(encoded.as_str()) => {
                        r.confirmed(seen, now);
                        true
                    }
                    // The consumer read the event back before this confirmation.
                    Some(r) if r.provisioned.as_ref().is_some_and(|p| p.event_id == seen.event_id) => {
                        r.attempts = r.attempts.saturating_add(1);
                        r.updated_at = now;
                        true
                    }
                    _ => false,
                })?;
                self.store.flush().await?;
                if done {
                    ProvisionerStats::bump(&self.stats.provisioned);
                    tracing::info!(%identity, event = %event.id, "provisioner: node provisioned");
                }
            }
            Err(e) => {
                ProvisionerStats::bump(&self.stats.failed);
                let error = format!("publishing the provisioned event: {e}");
                tracing::warn!(%identity, %error, "provisioner: will retry");
                let now = Utc::now();
                self.store.modify(identity, |r, _| {
                    if let Some(r) = r.as_mut().filter(|r| r.outbox.as_deref() == Some(encoded.as_str())) {
                        r.attempt_failed(error, &self.config.backoff, now);
                    }
                })?;
                self.store.flush().await?;
            }
        }
        Ok(())
    }

    /// Runs one step on the node: a directed request, one OK reply expected.
    async fn run_step(&self, identity: &str, step: &Step) -> Result<(), String> {
        let timeout = step.timeout.unwrap_or(self.config.step_timeout);
        let options = RequestOptions {
            filter: Default::default(),
            target: Target::Node(identity.to_owned()),
            expected: Some(1),
            timeout,
            ttl: self.config.ttl,
        };
        let results = self
            .rpc
            .call(&step.agent, &step.action, step.data.clone(), options)
            .await
            .map_err(|e| format!("request not sent: {e}"))?;
        match results.replies.iter().find(|r| r.identity == identity) {
            None => Err(format!("no reply within {timeout:?}")),
            Some(r) if r.statuscode == StatusCode::Ok => Ok(()),
            Some(r) if !r.authorized => Err(format!("denied: {}", r.statusmsg)),
            Some(r) => Err(format!("{:?}: {}", r.statuscode, r.statusmsg)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(T0 + secs, 0).unwrap()
    }

    fn ev(id: &str, sequence: u64) -> EventRef {
        EventRef { event_id: id.into(), sequence, time: at(0), component: PROVISION_MODE_COMPONENT.into() }
    }

    #[test]
    fn config_defaults_and_yaml() {
        let c = ProvisionerConfig::from_yaml(
            "steps:\n  - {agent: rpcutil, action: ping}\n  - {agent: rpcutil, action: get_fact, data: {fact: country}, timeout: 5s}\n",
        )
        .unwrap();
        assert_eq!(c.components, vec!["provision_mode_server".to_string()]);
        assert_eq!(
            (c.consumer.as_str(), c.concurrency, c.event_component.as_str()),
            ("provisioner", 50, "provisioner")
        );
        assert_eq!(c.steps[1].data.get("fact"), Some(&serde_json::json!("country")));
        assert_eq!((c.steps[0].timeout, c.steps[1].timeout), (None, Some(Duration::from_secs(5))));
        assert_eq!(
            c.filter_subjects(),
            vec!["choria.lifecycle.event.startup.provision_mode_server", "choria.lifecycle.event.provisioned.*"]
        );
        assert_eq!(c, ProvisionerConfig::new(c.steps.clone()));
        let c = ProvisionerConfig::from_yaml(
            "components: [provision_mode_server, bootstrap]\nconcurrency: 5\nsweep_interval: 2s\nbackoff: {initial: 1s, max: 4s}\nstart: {from: new}\nsteps: [{agent: a, action: b}]\n",
        )
        .unwrap();
        assert_eq!(c.filter_subjects().len(), 3);
        assert_eq!(
            (c.backoff.initial, c.backoff.max, c.backoff.multiplier),
            (Duration::from_secs(1), Duration::from_secs(4), 2.0)
        );
        assert_eq!(c.start, StartPosition::New);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = |yaml: &str| ProvisionerConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(err("steps: [{agent: a, action: b, bogus: 1}]").contains("steps[0]: unknown field `bogus`"));
        assert!(err("stepz: []").contains("unknown field `stepz`"));
        assert!(err("components: [a]").contains("missing field `steps`"));
        assert!(err("steps: []").contains("steps must list at least one step"));
        assert!(err("steps: [{agent: a, action: b}]\ncomponents: []").contains("components must list"));
        assert!(err("steps: [{agent: a, action: b}]\ncomponents: [web.prod]").contains("components[0]"));
        assert!(err("steps: [{agent: 'rpc util', action: b}]").contains("steps[0].agent"));
        assert!(err("steps: [{agent: a, action: ''}]").contains("steps[0].action"));
        assert!(err("steps: [{agent: a, action: b, timeout: 0s}]").contains("steps[0].timeout"));
        assert!(err("steps: [{agent: a, action: b}]\nconcurrency: 0").contains("concurrency"));
        assert!(err("steps: [{agent: a, action: b}]\nbackoff: {initial: 10s, max: 1s}").contains("backoff.max"));
        assert!(err("steps: [{agent: a, action: b}]\nbackoff: {multiplier: 0.5}").contains("backoff.multiplier"));
        assert!(err("steps: [{agent: a, action: b}]\nconsumer: 'a.b'").contains("consumer"));
        assert!(err("steps: [{agent: a, action: b}]\nsweep_interval: 1ms").contains("sweep_interval"));
        assert!(err("steps: [{agent: a, action: b}]\nevent_component: 'x y'").contains("event_component"));
        assert!(err("steps: [{agent: a, action: b}]\nbatch_size: 0").contains("batch_size"));
        assert!(err("steps: [{agent: a, action: b}]\nstep_timeout: nonsense").contains("step_timeout"));
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(10), multiplier: 2.0 };
        let delays: Vec<u64> = (1..=6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
        let flat = Backoff { multiplier: 1.0, ..b };
        assert_eq!(flat.delay(50), Duration::from_secs(1));
    }

    #[test]
    fn first_startup_makes_a_node_due_and_duplicates_do_not() {
        let mut n = NodeRecord::new("a", at(0));
        assert!(!n.is_due(at(0)), "a record without a startup is not due");
        assert_eq!(n.on_startup(ev("s1", 10), at(1)), StartupOutcome::New);
        assert_eq!((n.status, n.next_attempt_at, n.next_step), (NodeStatus::Pending, Some(at(1)), 0));
        assert!(n.is_due(at(1)));
        assert_eq!(n.on_startup(ev("s1", 10), at(2)), StartupOutcome::Duplicate);
        assert_eq!(n.on_startup(ev("s1", 99), at(2)), StartupOutcome::Duplicate, "the same event stored again later");
        assert_eq!(n.on_startup(ev("s0", 5), at(2)), StartupOutcome::Stale, "an older boot");
        assert_eq!(n.startup.as_ref().unwrap().event_id, "s1");
    }

    #[test]
    fn failures_back_off_and_keep_progress() {
        let backoff = Backoff { initial: Duration::from_secs(5), max: Duration::from_secs(60), multiplier: 2.0 };
        let mut n = NodeRecord::new("a", at(0));
        n.on_startup(ev("s1", 10), at(0));
        n.step_done(0, at(1));
        n.attempt_failed("step 2: no reply".into(), &backoff, at(2));
        assert_eq!((n.status, n.attempts, n.next_step), (NodeStatus::Failed, 1, 1));
        assert_eq!(n.next_attempt_at, Some(at(7)));
        assert!(!n.is_due(at(6)) && n.is_due(at(7)));
        n.attempt_failed("again".into(), &backoff, at(7));
        assert_eq!((n.attempts, n.next_attempt_at), (2, Some(at(17))));
        assert_eq!(n.last_error.as_deref(), Some("again"));
        // A duplicate startup does not reset the backoff or the progress.
        assert_eq!(n.on_startup(ev("s1", 10), at(8)), StartupOutcome::Duplicate);
        assert_eq!((n.status, n.next_step, n.attempts), (NodeStatus::Failed, 1, 2));
        // A new boot does: all steps again, at once.
        assert_eq!(n.on_startup(ev("s2", 20), at(9)), StartupOutcome::Restarted);
        assert_eq!((n.status, n.next_step, n.attempts, n.last_error.clone()), (NodeStatus::Pending, 0, 0, None));
        assert!(n.is_due(at(9)));
        assert!(n.serves(Some("s2")) && !n.serves(Some("s1")), "an attempt for the old boot may not record");
    }

    #[test]
    fn provisioned_nodes_are_skipped_unless_they_start_in_provisioning_mode_after_it() {
        let mut n = NodeRecord::new("a", at(0));
        n.on_startup(ev("s1", 10), at(0));
        n.outbox = Some("stamped".into());
        n.confirmed(ev("p1", 50), at(1));
        assert_eq!(
            (n.status, n.attempts, n.times_provisioned, n.outbox.clone()),
            (NodeStatus::Provisioned, 1, 1, None)
        );
        assert!(!n.is_due(at(100)));
        assert!(!n.serves(Some("s1")), "nothing records into a provisioned node");
        // Our own event read back from the stream, and the original startup replayed.
        assert_eq!(n.on_provisioned(ev("p1", 50), at(2)), ProvisionedOutcome::Duplicate);
        assert_eq!(n.on_startup(ev("s1", 10), at(2)), StartupOutcome::Duplicate);
        // A startup stored before the provisioned event (a late copy of another boot) is stale.
        assert_eq!(n.on_startup(ev("s1b", 30), at(2)), StartupOutcome::Stale);
        assert_eq!(n.status, NodeStatus::Provisioned);
        // Back in provisioning mode after it: provisioned again.
        assert_eq!(n.on_startup(ev("s2", 60), at(3)), StartupOutcome::Reprovision);
        assert_eq!((n.status, n.next_step, n.attempts), (NodeStatus::Pending, 0, 0));
        assert!(n.is_due(at(3)));
        n.confirmed(ev("p2", 70), at(4));
        assert_eq!(n.times_provisioned, 2);
    }

    #[test]
    fn provisioned_events_from_the_stream_rebuild_the_state() {
        // A fresh state reading the stream from the start: startup, then its provisioned event.
        let mut n = NodeRecord::new("a", at(0));
        assert_eq!(n.on_startup(ev("s1", 10), at(0)), StartupOutcome::New);
        assert_eq!(n.on_provisioned(ev("p1", 50), at(0)), ProvisionedOutcome::Recorded);
        assert_eq!(n.status, NodeStatus::Provisioned);
        assert_eq!(n.on_provisioned(ev("p0", 40), at(0)), ProvisionedOutcome::Duplicate, "older provisioned event");
        // Provisioned by someone else before the startup we know of: stays pending.
        let mut m = NodeRecord::new("b", at(0));
        m.on_startup(ev("s5", 80), at(0));
        assert_eq!(m.on_provisioned(ev("p4", 70), at(0)), ProvisionedOutcome::Superseded);
        assert_eq!(m.status, NodeStatus::Pending);
        assert!(m.is_due(at(0)));
        // A provisioned event with no startup seen (a node provisioned by Choria).
        let mut o = NodeRecord::new("c", at(0));
        assert_eq!(o.on_provisioned(ev("p9", 5), at(0)), ProvisionedOutcome::Recorded);
        assert_eq!(o.on_startup(ev("s8", 3), at(0)), StartupOutcome::Stale);
        // A confirmation without a sequence learns it when the event is read back.
        let mut p = NodeRecord::new("d", at(0));
        p.on_startup(ev("s1", 10), at(0));
        p.confirmed(ev("p1", 0), at(0));
        assert_eq!(p.on_provisioned(ev("p1", 42), at(0)), ProvisionedOutcome::Duplicate);
        assert_eq!(p.provisioned.as_ref().unwrap().sequence, 42);
    }

    #[test]
    fn state_store_writes_record_and_sequence_together() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StateStore::open(dir.path()).unwrap();
            assert_eq!(s.next_seq().unwrap(), 1);
            s.modify("n1", |r, seq| {
                let r = r.get_or_insert_with(|| NodeRecord::new("n1", at(0)));
                r.on_startup(ev("s1", 1), at(0));
                *seq = Some(8);
            })
            .unwrap();
            // Unchanged records are not rewritten; absent ones not created.
            s.modify("n2", |_, _| ()).unwrap();
            s.db.flush().unwrap();
        }
        let s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.next_seq().unwrap(), 8);
        let all = s.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].identity.as_str(), all[0].status), ("n1", NodeStatus::Pending));
        assert!(s.get("n2").unwrap().is_none());
    }

    // -- The whole provisioner, in process: embedded backbone, local RPC transport. ----------

    mod in_process {
        use super::*;
        use chorus_backbone::embedded::EmbeddedBackbone;
        use chorus_producers::rpc::{agents, Agent, LocalTransport, NodeContext, RpcServer, ServerOptions};
        use chorus_producers::streams::{ensure_platform_streams, StreamLimits};
        use chorus_schemas::lifecycle::Startup;
        use chorus_schemas::subject::CHORUS_DEADLETTER;

        struct Site {
            backbone: Arc<dyn Backbone>,
            transport: Arc<LocalTransport>,
            server: RpcServer,
            dir: tempfile::TempDir,
        }

        async fn site() -> Site {
            let dir = tempfile::tempdir().unwrap();
            let backbone: Arc<dyn Backbone> =
                Arc::new(EmbeddedBackbone::open_path(dir.path().join("streams")).unwrap());
            ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
            let policies = dir.path().join("policies");
            std::fs::create_dir_all(&policies).unwrap();
            std::fs::write(
                policies.join("rpcutil.policy"),
                "policy default deny\nallow\tchoria=provisioner\tping get_fact\t*\t*\n",
            )
            .unwrap();
            let transport = Arc::new(LocalTransport::new());
            let agents: Vec<Arc<dyn Agent>> = vec![Arc::new(agents::RpcUtil)];
            let options = ServerOptions { wildcard_directed: true, ..Default::default() };
            let server = RpcServer::new(transport.clone(), agents, Some(policies), options).unwrap();
            Site { backbone, transport, server, dir }
        }

        impl Site {
            async fn host(&self, identity: &str) {
                let emitter = Arc::new(Emitter::new(Arc::new(BackboneSink(self.backbone.clone())), 1, None));
                self.server.add_node(NodeContext::new(identity, "choria"), emitter).await.unwrap();
            }

            async fn startup(&self, identity: &str, component: &str) -> EventRecord {
                let record = EventRecord::new(Startup::new(identity, component, "1.0"), 1);
                self.backbone.publish(to_message(&record).unwrap()).await.unwrap();
                record
            }

            fn config(&self) -> ProvisionerConfig {
                let mut data = JsonObject::new();
                data.insert("fact".into(), "identity".into());
                let mut c = ProvisionerConfig::new(vec![
                    Step::new("rpcutil", "ping"),
                    Step::new("rpcutil", "get_fact").with_data(data),
                ]);
                c.state_dir = self.dir.path().join("state");
                c.step_timeout = Duration::from_millis(500);
                c.sweep_interval = Duration::from_millis(200);
                c.backoff =
                    Backoff { initial: Duration::from_millis(200), max: Duration::from_millis(400), multiplier: 2.0 };
                c.fetch_wait = Duration::from_millis(100);
                c
            }

            async fn start(&self) -> Provisioner {
                Provisioner::start(self.backbone.clone(), self.transport.clone(), self.config()).await.unwrap()
            }

            /// Lifecycle events of type `provisioned` per identity.
            async fn provisioned_events(&self) -> Vec<EventRecord> {
                let mut out = Vec::new();
                let mut replay =
                    self.backbone.replay(CHORUS_LIFECYCLE, chorus_backbone::ReplayOptions::default()).await.unwrap();
                use futures::StreamExt;
                while let Some(m) = replay.next().await {
                    // The junk message the test publishes does not decode.
                    if let Ok(r) = EventRecord::decode(&m.unwrap().payload) {
                        if matches!(r.data, Event::Lifecycle(Lifecycle::Provisioned(_))) {
                            out.push(r);
                        }
                    }
                }
                out
            }
        }

        async fn until<F: Fn(&Provisioner) -> bool>(p: &Provisioner, what: &str, ok: F) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while !ok(p) {
                assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {:?}", p.stats());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        fn status(p: &Provisioner, identity: &str) -> Option<NodeStatus> {
            p.node(identity).unwrap().map(|n| n.status)
        }

        /// `/metrics` and `/healthz` over HTTP: counters and node counts from a provisioner
        /// that provisioned two nodes and failed one, then 503 once it stopped.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn metrics_and_health_over_http() {
            let site = site().await;
            for n in ["a.example.net", "b.example.net"] {
                site.host(n).await;
            }
            for n in ["a.example.net", "b.example.net", "late.example.net"] {
                site.startup(n, PROVISION_MODE_COMPONENT).await;
            }
            let p = site.start().await;
            until(&p, "a and b provisioned, late failed", |p| {
                p.stats().provisioned == 2 && p.stats().in_flight == 0 && p.stats().failed >= 1
            })
            .await;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(http::serve(listener, p.monitor(), async {
                let _ = stopped.await;
            }));
            let client = reqwest::Client::new();
            let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
            assert_eq!(metrics.status(), 200);
            let text = metrics.text().await.unwrap();
            for line in [
                "chorus_provisioner_provisioned_total 2",
                "chorus_provisioner_startups_total 3",
                "chorus_provisioner_steps_ok_total 4",
                "chorus_provisioner_in_flight 0",
                "chorus_provisioner_nodes{status=\"provisioned\"} 2",
                "chorus_provisioner_nodes{status=\"failed\"} 1",
                "# TYPE chorus_provisioner_failed counter",
            ] {
                assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
            }
            let health = client.get(format!("{base}/healthz")).send().await.unwrap();
            assert_eq!(health.status(), 200);
            let body: serde_json::Value = serde_json::from_str(&health.text().await.unwrap()).unwrap();
            assert_eq!((body["running"].as_bool(), body["caught_up"].as_bool()), (Some(true), Some(true)), "{body}");

            let monitor = p.monitor();
            p.stop().await.unwrap();
            assert!(!monitor.running());
            let health = client.get(format!("{base}/healthz")).send().await.unwrap();
            assert_eq!(health.status(), 503);
            let _ = stop_http.send(());
            server.await.unwrap().unwrap();
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn provisions_retries_reprovisions_and_dead_letters() {
            let site = site().await;
            for n in ["a.example.net", "b.example.net"] {
                site.host(n).await;
            }
            // A normal server's startup is not read; a malformed message is dead-lettered.
            site.startup("server.example.net", "server").await;
            site.backbone
                .publish(chorus_backbone::Message::new(
                    "junk-1",
                    "choria.lifecycle.event.startup.provision_mode_server",
                    &b"{oops"[..],
                ))
                .await
                .unwrap();
            for n in ["a.example.net", "b.example.net", "late.example.net"] {
                site.startup(n, PROVISION_MODE_COMPONENT).await;
            }
            let p = site.start().await;
            until(&p, "a and b provisioned, late failed", |p| {
                status(p, "a.example.net") == Some(NodeStatus::Provisioned)
                    && status(p, "b.example.net") == Some(NodeStatus::Provisioned)
                    && p.node("late.example.net").unwrap().is_some_and(|n| n.attempts >= 2)
            })
            .await;
            let late = p.node("late.example.net").unwrap().unwrap();
            assert_eq!((late.status, late.next_step), (NodeStatus::Failed, 0));
            assert!(late.last_error.as_deref().unwrap().contains("step 1 (rpcutil#ping): no reply"), "{late:?}");
            assert!(p.node("server.example.net").unwrap().is_none());

            // The late node comes up: the sweep retries it.
            site.host("late.example.net").await;
            // The record turns provisioned before the attempt's flush and its counter bump.
            until(&p, "late provisioned", |p| {
                status(p, "late.example.net") == Some(NodeStatus::Provisioned) && p.stats().in_flight == 0
            })
            .await;
            let s = p.stats();
            assert_eq!((s.provisioned, s.dead_lettered), (3, 1), "{s:?}");
            assert!(s.failed >= 2 && s.retries >= 2, "{s:?}");

            // b restarts in provisioning mode after it was provisioned: provisioned again; a's
            // startup stored again under another message id is a duplicate.
            let events = site.provisioned_events().await;
            assert_eq!(events.len(), 3);
            assert!(events.iter().all(|e| matches!(&e.data, Event::Lifecycle(l) if l.component() == "provisioner")));
            let mut replay = site.backbone.replay(CHORUS_LIFECYCLE, Default::default()).await.unwrap();
            use futures::StreamExt;
            let mut original = None;
            while let Some(m) = replay.next().await {
                let m = m.unwrap();
                if let Ok(r) = EventRecord::decode(&m.payload) {
                    if r.subject == "a.example.net" && matches!(r.data, Event::Lifecycle(Lifecycle::Startup(_))) {
                        original = Some(m);
                    }
                }
            }
            let original = original.unwrap();
            site.backbone
                .publish(chorus_backbone::Message::new("copy-of-a", original.subject.clone(), original.payload.clone()))
                .await
                .unwrap();
            site.startup("b.example.net", PROVISION_MODE_COMPONENT).await;
            until(&p, "b provisioned twice and a's copy skipped", |p| {
                p.node("b.example.net").unwrap().is_some_and(|n| n.times_provisioned == 2)
                    && p.stats().duplicate_startups >= 1
            })
            .await;
            p.stop().await.unwrap();

            let events = site.provisioned_events().await;
            let per_node = |id: &str| events.iter().filter(|e| e.subject == id).count();
            assert_eq!((per_node("a.example.net"), per_node("b.example.net"), per_node("late.example.net")), (1, 2, 1));
            let mut seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            seqs.sort();
            assert_eq!(seqs, vec![1, 2, 3, 4], "the provisioner numbers its events");

            let letters = site.backbone.stream_info(CHORUS_DEADLETTER).await.unwrap().messages;
            assert_eq!(letters, 1);

            // A restart (same state) provisions nothing again, even with the consumer replaying
            // the whole stream; its events continue the sequence.
            site.backbone.delete_consumer(CHORUS_LIFECYCLE, "provisioner").await.unwrap();
            let p = site.start().await;
            until(&p, "the replay read", |p| p.caught_up() && p.stats().provisioned_events >= 4).await;
            site.startup("c.example.net", PROVISION_MODE_COMPONENT).await;
            site.host("c.example.net").await;
            until(&p, "c provisioned", |p| status(p, "c.example.net") == Some(NodeStatus::Provisioned)).await;
            let s = p.stats();
            assert_eq!(s.provisioned, 1, "only the new node: {s:?}");
            assert!(s.duplicate_startups >= 4, "{s:?}");
            p.stop().await.unwrap();
            let events = site.provisioned_events().await;
            assert_eq!(events.len(), 5);
            assert_eq!(events.iter().find(|e| e.subject == "c.example.net").unwrap().seq, 5);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_fresh_state_rebuilds_from_the_stream_and_provisions_nothing_twice() {
            let site = site().await;
            site.host("a.example.net").await;
            site.startup("a.example.net", PROVISION_MODE_COMPONENT).await;
            let p = site.start().await;
            until(&p, "a provisioned", |p| status(p, "a.example.net") == Some(NodeStatus::Provisioned)).await;
            p.stop().await.unwrap();
            // State lost, consumer gone: the stream says a is provisioned.
            std::fs::remove_dir_all(site.dir.path().join("state")).unwrap();
            site.backbone.delete_consumer(CHORUS_LIFECYCLE, "provisioner").await.unwrap();
            let p = site.start().await;
            until(&p, "caught up", |p| p.caught_up() && p.stats().provisioned_events >= 1).await;
            assert_eq!(status(&p, "a.example.net"), Some(NodeStatus::Provisioned));
            assert_eq!(p.stats().provisioned, 0);
            p.stop().await.unwrap();
            assert_eq!(site.provisioned_events().await.len(), 1);
        }
    }
}
