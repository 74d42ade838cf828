//! Watchers: each runs as its own task, follows the machine state through a `watch`
//! channel, checks the node while the machine is in one of its `state_match` states, emits
//! its state events and asks the machine task to fire transitions.

mod exec;
mod expression;
mod file;
mod governed;
mod kv;
mod metric;
mod nagios;
mod process;
mod schedule;
mod timer;

use std::future::pending;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chorus_runtime::Shutdown;
use chorus_schemas::{MachineInstance, WatcherDetails, WatcherState};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::{debug, warn};

use super::fsm::Command;
use super::manifest::{WatcherDef, WatcherProperties};

/// What all watchers of one machine share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) instance: MachineInstance,
    pub(crate) emitter: Arc<chorus_platform::Emitter>,
    /// The machine's data store.
    pub(crate) data: Arc<crate::machine::data::MachineData>,
    /// The node's facts.
    pub(crate) facts: Arc<serde_json::Value>,
    pub(crate) machine_dir: PathBuf,
    pub(crate) state: watch::Receiver<String>,
    pub(crate) stop: Shutdown,
    pub(crate) commands: mpsc::Sender<Command>,
    /// The states of the node's other machines (`foreign_state_required`).
    pub(crate) others: crate::machine::OtherMachines,
    /// The site's backbone, for governors (none when the node runs offline).
    pub(crate) backbone: Option<Arc<dyn chorus_backbone::Backbone>>,
}

/// One watcher's view of its machine.
pub(crate) struct WatcherCtx {
    pub(crate) shared: Shared,
    pub(crate) def: WatcherDef,
}

impl WatcherCtx {
    fn machine(&self) -> &str {
        &self.shared.instance.machine
    }

    fn name(&self) -> &str {
        &self.def.name
    }

    /// The machine state now.
    fn current_state(&self) -> String {
        self.shared.state.borrow().clone()
    }

    /// A receiver of later state changes, and the state now (read through the receiver, so
    /// no change can fall between the two).
    fn subscribe(&self) -> (watch::Receiver<String>, String) {
        let mut rx = self.shared.state.clone();
        let state = rx.borrow_and_update().clone();
        (rx, state)
    }

    fn stop_signal(&self) -> Shutdown {
        self.shared.stop.clone()
    }

    /// Whether the watcher checks in `state`: one of its `state_match` states, and every
    /// machine it requires (`foreign_state_required`) in its required state, as Choria's
    /// `ShouldWatch`. A required machine that does not run on the node does not match.
    fn active_in(&self, state: &str) -> bool {
        self.def.active_in(state)
            && self.def.foreign_state_required.iter().all(|required| {
                let others = self.shared.others.get();
                others.and_then(|o| o.get(&required.machine_name)).is_some_and(|rx| *rx.borrow() == required.state)
            })
    }

    /// Emits a watcher state event. Failures are logged only: the machine keeps running.
    async fn notify(&self, details: WatcherDetails) {
        let event = WatcherState::new(&self.shared.instance, &self.def.name, details);
        if let Err(e) = self.shared.emitter.emit(event).await {
            warn!(machine = %self.machine(), watcher = %self.name(), error = %e, "could not emit watcher state");
        }
    }

    async fn success(&self) {
        self.fire(self.def.success_transition.as_deref()).await
    }

    async fn fail(&self) {
        self.fire(self.def.fail_transition.as_deref()).await
    }

    /// Fires a transition and waits for the machine to apply it. A transition that is not
    /// valid in the current state is normal (a check that keeps passing keeps firing its
    /// success transition) and only logged at debug.
    async fn fire(&self, transition: Option<&str>) {
        let Some(name) = transition else { return };
        let (reply, result) = oneshot::channel();
        if self.shared.commands.send(Command::Transition { name: name.to_string(), reply }).await.is_err() {
            return;
        }
        match result.await {
            Ok(Ok(state)) => {
                debug!(machine = %self.machine(), watcher = %self.name(), transition = name, %state, "fired")
            }
            Ok(Err(e)) => debug!(machine = %self.machine(), watcher = %self.name(), error = %e, "transition not fired"),
            Err(_) => {}
        }
    }
}

/// Runs one watcher until the machine stops.
pub(crate) async fn run(ctx: WatcherCtx) {
    if !ctx.def.foreign_state_required.is_empty() {
        // The other machines' states come once the node's machines are connected; a first
        // check before then would take them for not running.
        let stop = ctx.stop_signal();
        while ctx.shared.others.get().is_none() {
            tokio::select! {
                _ = stop.requested() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
    debug!(machine = %ctx.machine(), watcher = %ctx.name(), kind = ctx.def.watcher_type(), "watcher starting");
    match ctx.def.properties.clone() {
        WatcherProperties::Exec(p) => exec::run(ctx, p).await,
        WatcherProperties::File(p) => file::run(ctx, p).await,
        WatcherProperties::Schedule(p) => schedule::run(ctx, p).await,
        WatcherProperties::Timer(p) => timer::run(ctx, p).await,
        WatcherProperties::Nagios(p) => nagios::run(ctx, p).await,
        WatcherProperties::Metric(p) => metric::run(ctx, p).await,
        WatcherProperties::Expression(p) => expression::run(ctx, p).await,
        WatcherProperties::Kv(p) => kv::run(ctx, p).await,
    }
}

/// A ticker whose first tick is one period from now; `None` for a zero or missing period.
fn ticker(period: Option<Duration>) -> Option<Interval> {
    let period = period.filter(|p| !p.is_zero())?;
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Some(interval)
}

/// A ticker every `period` whose first tick comes at a random point within the first
/// period, so a fleet started together does not check in lockstep.
fn splayed_ticker(period: Duration) -> Interval {
    let first = Instant::now() + crate::machine::random_below(period);
    let mut interval = tokio::time::interval_at(first, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

/// The next tick of an optional ticker; never resolves for `None`.
async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => pending().await,
    }
}

/// What woke a watcher that checks every interval and on every state change.
enum Wake {
    /// Time to check: the interval passed or the machine's state changed.
    Check,
    /// Time to announce the current state again.
    Announce,
    /// The machine stops (or is gone).
    Stop,
}

/// Waits for the next [`Wake`] of such a watcher.
async fn next_wake(
    stop: &Shutdown,
    states: &mut watch::Receiver<String>,
    every: &mut Option<Interval>,
    announce: &mut Option<Interval>,
) -> Wake {
    tokio::select! {
        biased;
        _ = stop.requested() => Wake::Stop,
        state = next_state(states) => if state.is_some() { Wake::Check } else { Wake::Stop },
        _ = tick(every) => Wake::Check,
        _ = tick(announce) => Wake::Announce,
    }
}

/// Waits for the next machine state; `None` once the machine is gone.
async fn next_state(rx: &mut watch::Receiver<String>) -> Option<String> {
    rx.changed().await.ok()?;
    let state = rx.borrow_and_update().clone();
    Some(state)
}
