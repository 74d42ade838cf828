//! Autonomous agents: finite state machines from Choria `machine.yaml` manifests, driven by
//! watchers, that keep a node in shape with no broker and no operator.
//!
//! A machine is a directory with a `machine.yaml` ([`Manifest`]) and the scripts and files it
//! refers to. [`Machine::start`] runs it on the current tokio runtime: the machine sits in
//! one state at a time, its watchers (exec, file, schedule, timer) check the node while the
//! machine is in one of their `state_match` states and fire transitions, and every
//! transition and watcher state change is emitted as the same event Choria publishes
//! (`io.choria.machine.v1.transition`, `io.choria.machine.watcher.<type>.v1.state`), so
//! `choria machine watch`, Scout and tally understand a Chorus fleet.
//!
//! Nothing here needs the network: events go to an [`Emitter`], normally over the node's
//! outbox, and a failure to store one is logged and otherwise ignored. A machine never stops
//! because the site is unreachable.
//!
//! ```no_run
//! # async fn example(emitter: std::sync::Arc<chorus_platform::Emitter>) -> Result<(), Box<dyn std::error::Error>> {
//! use chorus_producers::machine::{Machine, Manifest};
//! use chorus_runtime::service::{Service, Shutdown};
//!
//! let dir = std::path::PathBuf::from("/etc/chorus/machines/hvac");
//! let manifest = Manifest::load(&dir)?;
//! let mut machine = Machine::start(manifest, "node1.example.net", dir, emitter, Shutdown::new())?;
//! println!("HVAC is {}", machine.state());
//! machine.stop().await?;
//! # Ok(()) }
//! ```

mod cron;
pub mod data;
mod duration;
mod fsm;
pub mod manifest;
mod watchers;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chorus_runtime::{Health, Service, ServiceError, Shutdown, Tasks};
use chorus_schemas::MachineInstance;
use futures::FutureExt as _;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

pub use duration::{parse_duration, DurationError};
pub use manifest::{
    ExecProperties, ExpressionProperties, FileProperties, KvProperties, Manifest, ManifestError, NagiosProperties,
    ScheduleProperties, Subscription, TimerProperties, TransitionDef, WatcherDef, WatcherProperties,
};

use chorus_platform::Emitter;
use fsm::{Command, Fsm};
use watchers::WatcherCtx;

/// Errors of a running machine.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The manifest is not valid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The manifest has no transition of this name.
    #[error("unknown transition {0:?}")]
    UnknownTransition(String),
    /// The transition exists but the current state is not one of its `from` states.
    #[error("transition {transition:?} is not valid from state {state:?}")]
    InvalidTransition {
        /// The transition that was fired.
        transition: String,
        /// The state the machine was in.
        state: String,
    },
    /// The machine was stopped.
    #[error("machine is stopped")]
    Stopped,
}

/// What a node offers its machines besides their directory.
#[derive(Clone, Default)]
pub struct MachineNode {
    /// The site's backbone, for governors and `kv` watchers (none when the node runs
    /// offline: those watchers then fail their checks).
    pub backbone: Option<Arc<dyn chorus_backbone::Backbone>>,
    /// The node's facts, as `expression` watchers see them (`facts`, `get_fact`).
    pub facts: serde_json::Value,
    /// Where the machine's data store (`machine_data.json`) is kept; the machine directory
    /// when unset, as in Choria. Must exist.
    pub data_dir: Option<PathBuf>,
}

/// Starts autonomous agents; see [`Machine::start`].
pub struct Machine;

impl Machine {
    /// Starts `manifest` for node `identity` on the current tokio runtime. Scripts and files
    /// are found in `machine_dir`; events go to `emitter`. The machine starts in
    /// `initial_state`, which counts as entered: watchers active in it check right away
    /// (after the random `splay_start` delay). Each start gets a new instance id, as in Choria.
    ///
    /// The machine stops with `shutdown` (or [`Service::stop`] on its handle).
    ///
    /// Fails only if the manifest does not validate. Must be called within a tokio runtime.
    pub fn start(
        manifest: Manifest,
        identity: impl Into<String>,
        machine_dir: PathBuf,
        emitter: Arc<Emitter>,
        shutdown: Shutdown,
    ) -> Result<MachineHandle, MachineError> {
        Self::start_on(manifest, identity, machine_dir, emitter, MachineNode::default(), shutdown)
    }

    /// As [`Machine::start`], with what the node offers its machines: the site's backbone
    /// (governors, `kv` watchers) and its facts (`expression` watchers).
    pub fn start_on(
        manifest: Manifest,
        identity: impl Into<String>,
        machine_dir: PathBuf,
        emitter: Arc<Emitter>,
        node: MachineNode,
        shutdown: Shutdown,
    ) -> Result<MachineHandle, MachineError> {
        manifest.validate()?;
        let instance = MachineInstance {
            identity: identity.into(),
            id: uuid::Uuid::new_v4().to_string(),
            machine: manifest.name.clone(),
            version: manifest.version.clone(),
        };
        let (state_tx, state_rx) = watch::channel(manifest.initial_state.clone());
        let mut tasks = Tasks::new(format!("machine {}", instance.machine), shutdown);
        let stop_rx = tasks.shutdown().clone();
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let (fired, _) = tokio::sync::broadcast::channel(64);
        let subscriptions =
            manifest.transitions.iter().flat_map(|t| t.subscribe.iter().map(|s| (t.name.clone(), s.clone()))).collect();
        info!(machine = %instance.machine, version = %instance.version, id = %instance.id,
            state = %manifest.initial_state, dir = %machine_dir.display(), "starting machine");

        tasks.spawn(
            "fsm",
            fsm::run(
                Fsm::new(&manifest),
                instance.clone(),
                emitter.clone(),
                commands_rx,
                state_tx,
                fired.clone(),
                stop_rx.clone(),
            )
            .map(Ok::<_, MachineError>),
        );

        let splay = random_below(manifest.splay_start);
        let others = OtherMachines::default();
        let shared = watchers::Shared {
            others: others.clone(),
            instance: instance.clone(),
            emitter,
            data: Arc::new(match &node.data_dir {
                Some(dir) => data::MachineData::load_moved(dir, &machine_dir),
                None => data::MachineData::load(&machine_dir),
            }),
            facts: Arc::new(node.facts),
            machine_dir,
            state: state_rx.clone(),
            stop: stop_rx.clone(),
            commands: commands_tx.clone(),
            backbone: node.backbone,
        };
        let stop = stop_rx;
        tasks.spawn("watchers", async move {
            if !splay.is_zero() {
                info!(machine = %shared.instance.machine, splay = ?splay, "delaying watchers by splay_start");
                tokio::select! {
                    _ = tokio::time::sleep(splay) => {}
                    _ = stop.requested() => return Ok::<_, MachineError>(()),
                }
            }
            let tasks: Vec<_> = manifest
                .watchers
                .into_iter()
                .map(|def| {
                    let name = def.name.clone();
                    (name, tokio::spawn(watchers::run(WatcherCtx { shared: shared.clone(), def })))
                })
                .collect();
            for (name, task) in tasks {
                if let Err(e) = task.await {
                    warn!(machine = %shared.instance.machine, watcher = %name, error = %e, "watcher task failed");
                }
            }
            Ok(())
        });

        Ok(MachineHandle { instance, state: state_rx, commands: commands_tx, tasks, fired, subscriptions, others })
    }
}

/// Connects the machines of one node:
///
/// * transitions, as their manifests subscribe (Choria's `subscribe`): when machine A fires
///   `event`, a machine whose transition subscribes `{machine_name: A, event}` fires that
///   transition. The delivery runs in the subscriber's own tasks (it shows in its health and
///   stops with it);
/// * states, for watchers with `foreign_state_required`: each machine can read the others'
///   current states (until this is called, a required machine counts as not running).
///
/// Returns how many subscriptions were connected (one naming a machine that is not running
/// is logged and left out).
pub fn connect_subscriptions(machines: &mut [MachineHandle]) -> usize {
    let states: HashMap<String, watch::Receiver<String>> =
        machines.iter().map(|m| (m.instance.machine.clone(), m.state.clone())).collect();
    let mut sources = HashMap::new();
    for m in machines.iter() {
        sources.insert(m.instance.machine.clone(), m.fired.clone());
    }
    let mut connected = 0;
    for target in machines.iter_mut() {
        if target.others.set(states.clone()).is_err() {
            warn!(machine = %target.instance.machine, "machines connected twice; the first connection stays");
        }
        for (transition, sub) in target.subscriptions.clone() {
            let Some(source) = sources.get(&sub.machine_name) else {
                warn!(machine = %target.instance.machine, %transition, source = %sub.machine_name,
                    "subscribed to a machine that does not run on this node");
                continue;
            };
            let mut fired = source.subscribe();
            let commands = target.commands.clone();
            let stop = target.tasks.shutdown().clone();
            target.tasks.spawn("subscription", async move {
                loop {
                    let name = tokio::select! {
                        r = fired.recv() => r,
                        _ = stop.requested() => return Ok::<_, MachineError>(()),
                    };
                    match name {
                        Ok(name) if name == sub.event => {
                            let (reply, _) = oneshot::channel();
                            if commands.send(Command::Transition { name: transition.clone(), reply }).await.is_err() {
                                return Ok(());
                            }
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        // The source machine stopped: nothing more will come.
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            stop.requested().await;
                            return Ok(());
                        }
                    }
                }
            });
            connected += 1;
        }
    }
    connected
}

/// A running machine. Dropping the handle stops the machine (without waiting for it).
pub struct MachineHandle {
    instance: MachineInstance,
    state: watch::Receiver<String>,
    commands: mpsc::Sender<Command>,
    tasks: Tasks,
    /// The transitions the machine fires, for machines that subscribe to them.
    fired: tokio::sync::broadcast::Sender<String>,
    /// (own transition, what it subscribes to).
    subscriptions: Vec<(String, manifest::Subscription)>,
    /// The states of the node's other machines, once connected.
    others: OtherMachines,
}

/// The states of the other machines of a node, set by [`connect_subscriptions`].
pub(crate) type OtherMachines = Arc<std::sync::OnceLock<HashMap<String, watch::Receiver<String>>>>;

impl MachineHandle {
    /// The current state.
    pub fn state(&self) -> String {
        self.state.borrow().clone()
    }

    /// The identity, instance id, name and version stamped on the machine's events.
    pub fn instance(&self) -> &MachineInstance {
        &self.instance
    }

    /// A receiver of the current state, which sees every state change (it may skip
    /// intermediate states if it does not look in time).
    pub fn subscribe(&self) -> watch::Receiver<String> {
        self.state.clone()
    }

    /// Fires transition `name` by hand (Choria's `machine_transition`) and returns the state
    /// afterwards, once the transition event has been handed to the emitter. A transition to
    /// the current state succeeds without an event.
    pub async fn transition(&self, name: &str) -> Result<String, MachineError> {
        if self.tasks.shutdown().is_requested() {
            return Err(MachineError::Stopped);
        }
        self.remote().transition(name).await
    }

    /// A cloneable handle that reads the state and fires transitions, for the node's agents.
    pub fn remote(&self) -> MachineRemote {
        MachineRemote { instance: self.instance.clone(), state: self.state.clone(), commands: self.commands.clone() }
    }
}

/// What an RPC agent may do with a running machine: read it, fire its transitions.
#[derive(Clone)]
pub struct MachineRemote {
    instance: MachineInstance,
    state: watch::Receiver<String>,
    commands: mpsc::Sender<Command>,
}

impl MachineRemote {
    /// Identity, instance id, name and version.
    pub fn instance(&self) -> &MachineInstance {
        &self.instance
    }

    /// The current state.
    pub fn state(&self) -> String {
        self.state.borrow().clone()
    }

    /// Fires transition `name`, as [`MachineHandle::transition`].
    pub async fn transition(&self, name: &str) -> Result<String, MachineError> {
        let (reply, result) = oneshot::channel();
        self.commands
            .send(Command::Transition { name: name.to_string(), reply })
            .await
            .map_err(|_| MachineError::Stopped)?;
        result.await.map_err(|_| MachineError::Stopped)?
    }
}

impl Drop for MachineHandle {
    fn drop(&mut self) {
        self.tasks.shutdown().request();
    }
}

#[async_trait::async_trait]
impl Service for MachineHandle {
    fn name(&self) -> &str {
        self.tasks.service()
    }

    fn health(&self) -> Health {
        self.tasks.health().with("state", self.state())
    }

    fn failed(&self) -> bool {
        self.tasks.failed()
    }

    /// Stops the watchers (killing running commands) and the machine, and waits for them.
    /// Idempotent.
    async fn stop(&mut self) -> Result<(), ServiceError> {
        self.tasks.stop().await
    }
}

/// A random duration in `[0, max)`, for splays. Uses the OS randomness behind UUIDv4, which
/// is plenty to spread a fleet and avoids another dependency.
pub(crate) fn random_below(max: Duration) -> Duration {
    let nanos = max.as_nanos().min(u64::MAX as u128) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    let random = uuid::Uuid::new_v4().as_u64_pair().0;
    Duration::from_nanos(random % nanos)
}
