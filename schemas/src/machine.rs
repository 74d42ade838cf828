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
    pub const TYPES: [&'static str; 14] = [
        "exec",
        "file",
        "schedule",
        "timer",
        "nagios",
        "kv",
        "expression",
        "metric",
        "archive",
        "machines",
        "plugins",
        "gossip",
        "httpswitch",
        "ccm_manifest",
    ];

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
/// Every watcher type of current go-choria (`aagent/watchers/*`) is here, so every Choria
/// watcher state a stream holds decodes, shows in `chorus events tail` and is counted by the
/// dashboard. Fields Chorus does not act on are kept loosely typed (`serde_json::Value`), so a
/// newer Choria changing their shape still decodes. A type Choria adds later fails to decode
/// with [`crate::DecodeError::UnknownType`], which consumers treat as "not mine" rather than
/// as corruption.
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
    /// A `kv` watcher polled a key of a JetStream key-value bucket.
    Kv(KvDetails),
    /// An `expression` watcher evaluated its expressions over the machine's data and facts.
    Expression(OutcomeDetails),
    /// A `metric` watcher ran its command and gathered metrics.
    Metric(MetricDetails),
    /// An `archive` watcher fetched and unpacked an archive.
    Archive(ArchiveDetails),
    /// A `machines` watcher managed the autonomous agents of a signed specification.
    Machines(ManagedDetails),
    /// A `plugins` watcher (the newer name of `machines`) managed plugins.
    Plugins(ManagedDetails),
    /// A `gossip` watcher published its gossip.
    Gossip(GossipDetails),
    /// An `httpswitch` watcher (on/off switch over HTTP, Home Assistant).
    #[serde(rename = "httpswitch")]
    HttpSwitch(HttpSwitchDetails),
    /// A `ccm_manifest` watcher applied a configuration-management manifest.
    #[serde(rename = "ccm_manifest")]
    CcmManifest(OutcomeDetails),
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
            WatcherDetails::Kv(_) => "kv",
            WatcherDetails::Expression(_) => "expression",
            WatcherDetails::Metric(_) => "metric",
            WatcherDetails::Archive(_) => "archive",
            WatcherDetails::Machines(_) => "machines",
            WatcherDetails::Plugins(_) => "plugins",
            WatcherDetails::Gossip(_) => "gossip",
            WatcherDetails::HttpSwitch(_) => "httpswitch",
            WatcherDetails::CcmManifest(_) => "ccm_manifest",
        }
    }

    /// The watcher's state in one word, as an operator reads it: a check's status, a
    /// schedule's or timer's or key's state, a switch's status, else the outcome of the last
    /// run (`reported` for metrics, `published` for gossip, which have neither).
    pub fn state(&self) -> &str {
        match self {
            WatcherDetails::Exec(d) => &d.previous_outcome,
            WatcherDetails::File(d) => &d.previous_outcome,
            WatcherDetails::Schedule(d) => &d.state,
            WatcherDetails::Timer(d) => &d.state,
            WatcherDetails::Nagios(d) => &d.status,
            WatcherDetails::Kv(d) => &d.state,
            WatcherDetails::Expression(d) | WatcherDetails::CcmManifest(d) => &d.previous_outcome,
            WatcherDetails::Metric(_) => "reported",
            WatcherDetails::Archive(d) => &d.previous_outcome,
            WatcherDetails::Machines(d) | WatcherDetails::Plugins(d) => &d.previous_outcome,
            WatcherDetails::Gossip(_) => "published",
            WatcherDetails::HttpSwitch(d) => &d.status,
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
            WatcherDetails::Kv(_) => "io.choria.machine.watcher.kv.v1.state",
            WatcherDetails::Expression(_) => "io.choria.machine.watcher.expression.v1.state",
            WatcherDetails::Metric(_) => "io.choria.machine.watcher.metric.v1.state",
            WatcherDetails::Archive(_) => "io.choria.machine.watcher.archive.v1.state",
            WatcherDetails::Machines(_) => "io.choria.machine.watcher.machines.v1.state",
            WatcherDetails::Plugins(_) => "io.choria.machine.watcher.plugins.v1.state",
            WatcherDetails::Gossip(_) => "io.choria.machine.watcher.gossip.v1.state",
            WatcherDetails::HttpSwitch(_) => "io.choria.machine.watcher.httpswitch.v1.state",
            WatcherDetails::CcmManifest(_) => "io.choria.machine.watcher.ccm_manifest.v1.state",
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

/// Fields of a `kv` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KvDetails {
    /// Outcome of the last poll: `changed`, `unchanged`, `error` or `skipped`.
    #[serde(default)]
    pub state: String,
    /// The bucket.
    #[serde(default)]
    pub bucket: String,
    /// The key.
    #[serde(default)]
    pub key: String,
    /// `poll` or `watch`.
    #[serde(default)]
    pub mode: String,
}

/// Fields of watchers that only report how their last run went (`expression`,
/// `ccm_manifest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OutcomeDetails {
    /// Outcome of the last run, e.g. `success`, `fail`, `error`, `skipped`, `unknown`.
    #[serde(default)]
    pub previous_outcome: String,
    /// Duration of the last run in nanoseconds, where the watcher reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_run_time: Option<u64>,
}

/// Fields of a `metric` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MetricDetails {
    /// The metrics of the last run.
    pub metrics: MetricSample,
}

/// One run of a `metric` watcher's command (go-choria's `metricwatcher.Metric`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MetricSample {
    /// Labels of every metric of the run.
    #[serde(default, deserialize_with = "crate::util::null_as_default")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Metric values by name.
    #[serde(default, deserialize_with = "crate::util::null_as_default")]
    pub metrics: std::collections::BTreeMap<String, serde_json::Number>,
    /// When the command ran (Unix seconds).
    #[serde(default)]
    pub time: i64,
}

/// Fields of an `archive` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ArchiveDetails {
    /// Where the archive comes from.
    #[serde(default)]
    pub source: String,
    /// The file whose presence means the archive is unpacked.
    #[serde(default)]
    pub creates: String,
    /// Outcome of the last run.
    #[serde(default)]
    pub previous_outcome: String,
    /// Duration of the last run in nanoseconds.
    #[serde(default)]
    pub previous_run_time: u64,
}

/// Fields of a `machines` or `plugins` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ManagedDetails {
    /// The machines a `machines` watcher manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machines: Option<Vec<String>>,
    /// The plugins a `plugins` watcher manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<String>>,
    /// Outcome of the last run.
    #[serde(default)]
    pub previous_outcome: String,
    /// Duration of the last run in nanoseconds.
    #[serde(default)]
    pub previous_run_time: u64,
}

/// Fields of a `gossip` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GossipDetails {
    /// The subject it last published on.
    #[serde(default)]
    pub previous_subject: String,
    /// What it last published.
    #[serde(default)]
    pub previous_payload: String,
    /// When it last published (Unix seconds).
    #[serde(default)]
    pub previous_gossip: i64,
}

/// Fields of an `httpswitch` watcher state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HttpSwitchDetails {
    /// The switch's state as text.
    #[serde(default)]
    pub status: String,
    /// Whether the switch is on.
    #[serde(default)]
    pub is_on: bool,
    /// Operator annotations.
    #[serde(default, deserialize_with = "crate::util::null_as_default")]
    pub annotations: std::collections::BTreeMap<String, String>,
}
