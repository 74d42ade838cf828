//! The finite state machine and the task that owns it.
//!
//! One task owns the current state and applies transitions one at a time, whether they come
//! from watchers or from the handle. That gives every transition a single, total order: its
//! event is stored before the new state is published to the watchers, so the event stream
//! always shows a transition before anything the watchers did because of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_schemas::{MachineInstance, Transition};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::manifest::Manifest;
use chorus_runtime::Shutdown;

use super::MachineError;
use chorus_platform::Emitter;

/// What happened when a transition was fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fired {
    /// The machine moved.
    Moved { from: String, to: String },
    /// The transition was valid but its destination is the current state. As in looplab/fsm,
    /// which Choria uses, this is not a transition: no event, no watcher notification. It is
    /// what keeps a watcher that fires the same transition every interval from flooding the
    /// stream.
    Stayed,
}

/// States and transitions of a manifest, and the current state.
#[derive(Debug)]
pub(crate) struct Fsm {
    current: String,
    /// Transition name to (valid from-states, destination).
    transitions: HashMap<String, (Vec<String>, String)>,
}

impl Fsm {
    pub(crate) fn new(manifest: &Manifest) -> Self {
        Fsm {
            current: manifest.initial_state.clone(),
            transitions: manifest
                .transitions
                .iter()
                .map(|t| (t.name.clone(), (t.from.clone(), t.destination.clone())))
                .collect(),
        }
    }

    pub(crate) fn state(&self) -> &str {
        &self.current
    }

    /// What firing `name` would do, without doing it.
    pub(crate) fn check(&self, name: &str) -> Result<Fired, MachineError> {
        let (from, destination) =
            self.transitions.get(name).ok_or_else(|| MachineError::UnknownTransition(name.to_string()))?;
        if !from.contains(&self.current) {
            return Err(MachineError::InvalidTransition { transition: name.to_string(), state: self.current.clone() });
        }
        if *destination == self.current {
            return Ok(Fired::Stayed);
        }
        Ok(Fired::Moved { from: self.current.clone(), to: destination.clone() })
    }

    pub(crate) fn fire(&mut self, name: &str) -> Result<Fired, MachineError> {
        let fired = self.check(name)?;
        if let Fired::Moved { to, .. } = &fired {
            self.current = to.clone();
        }
        Ok(fired)
    }
}

/// Slows down a machine that keeps changing state, as Choria does: two watchers that send
/// the machine back and forth would otherwise run their checks in a tight loop on every
/// node. The first transitions of a burst are free, each further one waits a little longer,
/// up to 5 s; a minute without transitions ends the burst.
#[derive(Debug, Default)]
pub(crate) struct TransitionThrottle {
    burst: u32,
    last: Option<Instant>,
}

impl TransitionThrottle {
    const FREE: u32 = 10;
    const STEP: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(5);
    const QUIET: Duration = Duration::from_secs(60);

    /// How long to wait before a transition made at `now`.
    pub(crate) fn delay(&mut self, now: Instant) -> Duration {
        if self.last.is_none_or(|last| now.saturating_duration_since(last) >= Self::QUIET) {
            self.burst = 0;
        }
        self.last = Some(now);
        self.burst += 1;
        match self.burst.checked_sub(Self::FREE) {
            None | Some(0) => Duration::ZERO,
            Some(over) => Self::STEP.saturating_mul(over).min(Self::MAX),
        }
    }
}

/// A request to the machine task.
pub(crate) enum Command {
    /// Fire a transition; the reply is the state afterwards.
    Transition { name: String, reply: oneshot::Sender<Result<String, MachineError>> },
}

/// Runs the machine until stopped: applies transitions, emits their events, publishes states.
pub(crate) async fn run(
    mut fsm: Fsm,
    instance: MachineInstance,
    emitter: Arc<Emitter>,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<String>,
    fired: tokio::sync::broadcast::Sender<String>,
    stop: Shutdown,
) {
    let mut throttle = TransitionThrottle::default();
    loop {
        let command = tokio::select! {
            biased;
            _ = stop.requested() => break,
            command = commands.recv() => match command {
                Some(command) => command,
                None => break,
            },
        };
        match command {
            Command::Transition { name, reply } => {
                if let Ok(Fired::Moved { .. }) = fsm.check(&name) {
                    let delay = throttle.delay(Instant::now());
                    if !delay.is_zero() {
                        debug!(machine = %instance.machine, transition = %name, ?delay, "machine is flapping, slowing down");
                        tokio::select! {
                            biased;
                            _ = stop.requested() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
                let result = fsm.fire(&name);
                match &result {
                    Ok(Fired::Moved { from, to }) => {
                        info!(machine = %instance.machine, transition = %name, %from, %to, "machine transition");
                        // A machine must keep working when its events cannot be stored (Choria's
                        // events are fire-and-forget too); the node outbox normally never fails.
                        if let Err(e) = emitter.emit(Transition::new(&instance, &name, from, to)).await {
                            warn!(machine = %instance.machine, transition = %name, error = %e, "could not emit transition event");
                        }
                        state.send_replace(to.clone());
                        // Machines on the node that subscribe to it (none listening is fine).
                        fired.send(name.clone()).ok();
                    }
                    Ok(Fired::Stayed) => {
                        debug!(machine = %instance.machine, transition = %name, "transition keeps the current state")
                    }
                    Err(e) => debug!(machine = %instance.machine, error = %e, "transition not fired"),
                }
                reply.send(result.map(|_| fsm.state().to_string())).ok();
            }
        }
    }
    debug!(machine = %instance.machine, "machine task stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fsm() -> Fsm {
        let m = Manifest::from_yaml(
            r#"
name: m
version: 1.0.0
initial_state: unknown
transitions:
  - {name: air_bad, from: [unknown, idle, running], destination: running}
  - {name: air_good, from: [unknown, idle, running], destination: idle}
  - {name: off, from: [idle], destination: off}
watchers:
  - {name: t, type: timer, fail_transition: air_bad, properties: {timer: 1s}}
"#,
        )
        .unwrap();
        Fsm::new(&m)
    }

    #[test]
    fn moves_along_valid_transitions() {
        let mut f = fsm();
        assert_eq!(f.state(), "unknown");
        assert_eq!(f.fire("air_good").unwrap(), Fired::Moved { from: "unknown".into(), to: "idle".into() });
        assert_eq!(f.fire("air_good").unwrap(), Fired::Stayed);
        assert_eq!(f.fire("off").unwrap(), Fired::Moved { from: "idle".into(), to: "off".into() });
        assert_eq!(f.state(), "off");
    }

    #[test]
    fn throttle_slows_bursts_and_resets_after_a_quiet_minute() {
        let mut b = TransitionThrottle::default();
        let start = Instant::now();
        let delays: Vec<_> = (0..12).map(|i| b.delay(start + Duration::from_millis(i * 10))).collect();
        assert!(delays[..10].iter().all(|d| d.is_zero()), "{delays:?}");
        assert_eq!(delays[10..], [Duration::from_millis(250), Duration::from_millis(500)]);
        let later: Vec<_> = (12..40).map(|i| b.delay(start + Duration::from_millis(i * 10))).collect();
        assert_eq!(*later.last().unwrap(), Duration::from_secs(5));
        // A minute after the last transition the burst is over.
        assert_eq!(b.delay(start + Duration::from_secs(61)), Duration::ZERO);
    }

    #[test]
    fn rejects_invalid_and_unknown_transitions() {
        let mut f = fsm();
        assert_eq!(f.fire("off").unwrap_err().to_string(), "transition \"off\" is not valid from state \"unknown\"");
        assert_eq!(f.fire("nope").unwrap_err().to_string(), "unknown transition \"nope\"");
        assert_eq!(f.state(), "unknown");
    }
}
