//! Autonomous Agent (Choria Machine) events: FSM transitions and watcher state
//! notifications, with the field names of go-choria `aagent/machine/notifications.go` and
//! `aagent/watchers/*/state_notification.go`, so `choria machine watch`, Scout and tally
//! keep working against a Chorus fleet.
//!
//! Note Choria's semantics of `id` here: it is the *machine instance* id (a UUID assigned when
//! the machine is loaded), not the event id. The event id lives only in the envelope.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::util::now_unix;

/// CloudEvents `source` of transitions and watcher states, as Choria sets it.
pub const SOURCE: &str = "io.choria.machine";

/// The identity of one running machine on one node; every transition and watcher event it
/// emits carries these four values, so producers keep one of these and stamp events from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MachineInstance {
    /// Node identity.
    pub identity: String,
    /// Machine instance id (UUID assigned when the machine was loaded).
    pub id: String,
    /// Machine name from `machine.yaml`.
    pub machine: String,
    /// Machine version from `machine.yaml`.
    pub version: String,
}

/// A machine moved between states. Published on `choria.machine.transition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Transition {
    /// Protocol identifier, `io.choria.machine.v1.transition`; equal to the CloudEvents `type`.
    pub protocol: String,
    /// Identity of the node running the machine.
    #[schemars(length(min = 1))]
    pub identity: String,
    /// Machine instance id (not the event id: see the module docs).
    pub id: String,
    /// Machine version.
    pub version: String,
    /// When the transition happened, Unix seconds (UTC).
    pub timestamp: i64,
    /// Machine name.
    pub machine: String,
    /// Name of the transition that fired.
    pub transition: String,
    /// State before the transition.
    pub from_state: String,
    /// State after the transition.
    pub to_state: String,
}

impl Transition {
    /// Protocol string and CloudEvents `type`.
    pub const PROTOCOL: &'static str = "io.choria.machine.v1.transition";

    /// A transition of `instance`, stamped now.
    pub fn new(
        instance: &MachineInstance,
        transition: impl Into<String>,
        from_state: impl Into<String>,
        to_state: impl Into<String>,
    ) -> Self {
        Transition {
            protocol: Self::PROTOCOL.into(),
            identity: instance.identity.clone(),
            id: instance.id.clone(),
            version: instance.version.clone(),
            timestamp: now_unix(),
            machine: instance.machine.clone(),
            transition: transition.into(),
            from_state: from_state.into(),
            to_state: to_state.into(),
        }
    }
}

/// Current state of one watcher of a machine. Published on
/// `choria.machine.watcher.<type>.state` after runs, on changes and every `announce_interval`,
/// which is what lets a consumer recover from lost events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WatcherState {
    /// Protocol identifier, `io.choria.machine.watcher.<type>.v1.state`; equal to the
    /// CloudEvents `type`.
    pub protocol: String,
    /// Identity of the node running the machine.
    #[schemars(length(min = 1))]
    pub identity: String,
    /// Machine instance id (not the event id: see the module docs).
    pub id: String,
    /// Machine version.
    pub version: String,
    /// When the state was taken, Unix seconds (UTC).
    pub timestamp: i64,
    /// Machine name.
    pub machine: String,
    /// Watcher name.
    pub name: String,
    /// The watcher `type` and its type-specific fields, at the same level as the fields above.
    #[serde(flatten)]
    pub details: WatcherDetails,
}

impl WatcherState {
    /// Watcher types Chorus decodes, in the order they are listed in schemas and docs.
    pub const TYPES: [&'static str; 5] = ["exec", "file", "schedule", "timer", "nagios"];

    /// The state of watcher `name` of `instance`, stamped now.
    pub fn new(instance: &MachineInstance, name: impl Into<String>, details: WatcherDetails) -> Self {
        WatcherState {
            protocol: details.protocol().into(),
            identity: instance.identity.clone(),
            id: instance.id.clone(),
            version: instance.version.clone(),
            timestamp: now_unix(),
            machine: instance.machine.clone(),
            name: name.into(),
            details,
        }
    }

    /// The watcher type (`exec`, `file`, ...).
    pub fn watcher_type(&self) -> &'static str {
        self.details.watcher_type()
    }
}

/// Type-specific part of a watcher state; the variant is the watcher `type` field.
///
/// Only the watcher types whose fields Chorus models are here. Events of other Choria watcher
/// types (kv, metric, ...) fail to decode with [`crate::DecodeError::UnknownType`], which
/// consumers treat as "not mine" rather than as corruption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WatcherDetails {
    /// An `exec` watcher ran a command.
    Exec(ExecDetails),
    /// A `file` watcher checked a file.
    File(FileDetails),
    /// A `schedule` watcher changed state.
    Schedule(ScheduleDetails),
    /// A `timer` watcher changed state.
    Timer(TimerDetails),
    /// A `nagios` watcher ran its check (what Choria Scout is built on).
    Nagios(NagiosDetails),
}

impl WatcherDetails {
    /// The watcher type name, e.g. `exec`.
    pub fn watcher_type(&self) -> &'static str {
        match self {
            WatcherDetails::Exec(_) => "exec",
            WatcherDetails::File(_) => "file",
            WatcherDetails::Schedule(_) => "schedule",
            WatcherDetails::Timer(_) => "timer",
            WatcherDetails::Nagios(_) => "nagios",
        }
    }

    /// Protocol string and CloudEvents type, e.g. `io.choria.machine.watcher.exec.v1.state`.
    pub fn protocol(&self) -> &'static str {
        match self {
            WatcherDetails::Exec(_) => "io.choria.machine.watcher.exec.v1.state",
            WatcherDetails::File(_) => "io.choria.machine.watcher.file.v1.state",
            WatcherDetails::Schedule(_) => "io.choria.machine.watcher.schedule.v1.state",
            WatcherDetails::Timer(_) => "io.choria.machine.watcher.timer.v1.state",
            WatcherDetails::Nagios(_) => "io.choria.machine.watcher.nagios.v1.state",
        }
    }
}

/// Fields of an `exec` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecDetails {
    /// The command the watcher runs.
    pub command: String,
    /// Outcome of the last run: `success`, `error`, `skipped` or `unknown` (kept as text so a
    /// newer Choria outcome does not make the event undecodable).
    pub previous_outcome: String,
    /// Duration of the last run in nanoseconds (Go `time.Duration`).
    pub previous_run_time: u64,
}

/// Fields of a `file` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileDetails {
    /// The watched path.
    pub path: String,
    /// Outcome of the last check: `changed`, `unchanged`, `error`, `skipped` or `unknown`.
    pub previous_outcome: String,
}

/// Fields of a `schedule` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleDetails {
    /// Schedule state, e.g. `on`, `off` or `unknown`.
    pub state: String,
}

/// Fields of a `timer` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TimerDetails {
    /// Timer state, e.g. `running` or `stopped`.
    pub state: String,
    /// Timer length in nanoseconds (Go `time.Duration`).
    pub timer: u64,
}

/// Fields of a `nagios` watcher state: a Nagios-compatible check and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NagiosDetails {
    /// The check plugin (command line), or empty for a builtin check.
    #[serde(default)]
    pub plugin: String,
    /// `OK`, `WARNING`, `CRITICAL` or `UNKNOWN` (kept as text so a newer state decodes).
    pub status: String,
    /// The plugin's exit code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    pub status_code: i64,
    /// The plugin's output (first line, without performance data).
    #[serde(default)]
    pub output: String,
    /// When the check ran (Unix seconds).
    #[serde(default)]
    pub check_time: i64,
    /// Performance data, as Choria parses it (label, value, unit, ...).
    #[serde(default)]
    pub perfdata: Vec<serde_json::Value>,
    /// How long the check took, seconds.
    #[serde(default)]
    pub runtime: Option<serde_json::Number>,
    /// The latest results, newest last (Choria keeps 15).
    #[serde(default)]
    pub history: Vec<serde_json::Value>,
    /// Operator annotations of the check.
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}
