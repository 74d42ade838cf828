//! The `machine.yaml` manifest of an autonomous agent, in Choria's format.
//!
//! Loading is strict on purpose: a machine runs unattended on every node, so a typo that
//! Choria would silently ignore (an unknown key, a `success_transition` naming no transition,
//! a `state_match` state that never occurs) is an error here, and every error names the field
//! at fault the way it is written in the YAML, e.g.
//! `watchers[1].success_transition: unknown transition "air_goodd"`.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;

use super::cron::CronSchedule;
use super::duration::{format_duration, GoDuration};

/// Why a manifest was rejected.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// The manifest file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file that was read.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid; `field` is its path in the YAML (`watchers[1].interval`).
    #[error("{}{field}: {reason}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Invalid {
        /// The manifest file, when loaded with [`Manifest::load`].
        file: Option<PathBuf>,
        /// Path of the offending field, `manifest` when the document as a whole is wrong.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ManifestError {
    /// The path of the offending field (`watchers[1].success_transition`), if the manifest
    /// was read at all.
    pub fn field(&self) -> Option<&str> {
        match self {
            ManifestError::Invalid { field, .. } => Some(field),
            ManifestError::Read { .. } => None,
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ManifestError::Invalid { file: None, field: field.into(), reason: reason.into() }
    }

    /// `serde_path_to_error` keeps the path where serde lost it; `prefix` is where the
    /// deserialized value sits in the whole manifest (for `properties`).
    fn from_serde<E: std::fmt::Display>(prefix: &str, e: serde_path_to_error::Error<E>) -> Self {
        // Syntax errors end in an unknown segment (`transitions[0].?`): name the part that
        // is known, the message carries the line and column.
        let path = e.path().to_string();
        let path = path.trim_end_matches('?').trim_end_matches('.');
        let path = if path.is_empty() { "." } else { path };
        let field = match (prefix, path) {
            ("", ".") => "manifest".to_string(),
            ("", p) => p.to_string(),
            (prefix, ".") => prefix.to_string(),
            (prefix, p) if p.starts_with('[') => format!("{prefix}{p}"),
            (prefix, p) => format!("{prefix}.{p}"),
        };
        // serde_yaml starts some messages with its own path (the same one, or the parent's
        // for an unknown field); say it once.
        let mut reason = e.inner().to_string();
        if let Some((head, rest)) = reason.split_once(": ") {
            let ours = path.strip_prefix(head).is_some_and(|r| r.is_empty() || r.starts_with(['.', '[']));
            if ours {
                reason = rest.to_string();
            }
        }
        ManifestError::invalid(field, reason)
    }
}

/// A validated machine manifest. Build one with [`Manifest::from_yaml`] or [`Manifest::load`];
/// [`super::Machine::start`] validates again, so a manifest edited in code cannot start a
/// broken machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Machine name; with the node identity it identifies the machine in every event.
    pub name: String,
    /// Machine version (SemVer), carried in every event.
    pub version: String,
    /// The state the machine starts in.
    pub initial_state: String,
    /// Upper bound of a random delay before the watchers start, so a fleet restarted at once
    /// does not run every check at the same instant.
    pub splay_start: Duration,
    /// The transitions; the machine's states are the initial state and every state they name.
    pub transitions: Vec<TransitionDef>,
    /// The watchers, which observe the node and fire transitions.
    pub watchers: Vec<WatcherDef>,
}

/// A named move from any of `from` to `destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionDef {
    /// Transition name, fired by watchers and by hand.
    pub name: String,
    /// States the transition is valid from.
    pub from: Vec<String>,
    /// State the machine is in afterwards.
    pub destination: String,
    /// Free text for people reading the manifest.
    pub description: Option<String>,
    /// Fire this transition when another machine on the node fires `event` (Choria's
    /// `subscribe`, since 0.30.0).
    pub subscribe: Vec<Subscription>,
}

/// A transition of another machine on the same node that fires one of this machine's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The other machine's name.
    pub machine_name: String,
    /// The transition it fires.
    pub event: String,
}

/// A watcher: checks something while the machine is in one of `state_match` and fires
/// `success_transition` or `fail_transition` depending on what it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherDef {
    /// Watcher name, unique in the machine; it is the `name` of its state events.
    pub name: String,
    /// States the watcher is active in; empty means all.
    pub state_match: Vec<String>,
    /// Transition fired on failure (exec exit ≠ 0, file missing, schedule off, timer expired).
    pub fail_transition: Option<String>,
    /// Transition fired on success (exec exit 0, file changed, schedule on).
    pub success_transition: Option<String>,
    /// How often the watcher checks (exec, file). Unset for exec means "only on entering a
    /// matching state"; file defaults to 5 s.
    pub interval: Option<Duration>,
    /// How often the current watcher state is re-published even without a change, which is
    /// what lets consumers recover from lost events. At least one minute.
    pub announce_interval: Option<Duration>,
    /// Other machines of the node that must be in a given state for the watcher to check
    /// (Choria's `foreign_state_required`), besides `state_match`.
    pub foreign_state_required: Vec<ForeignState>,
    /// The type-specific settings; the variant is the watcher `type`.
    pub properties: WatcherProperties,
}

/// A state another machine of the node must be in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a required state: a mapping with machine_name and state")]
pub struct ForeignState {
    /// The machine's `name`.
    pub machine_name: String,
    /// Its state.
    pub state: String,
}

impl WatcherDef {
    /// The watcher type as written in the manifest (`exec`, `file`, `schedule`, `timer`).
    pub fn watcher_type(&self) -> &'static str {
        self.properties.watcher_type()
    }

    /// Whether the watcher is active while the machine is in `state`.
    pub fn active_in(&self, state: &str) -> bool {
        self.state_match.is_empty() || self.state_match.iter().any(|s| s == state)
    }
}

/// Type-specific watcher settings (the `properties` key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatcherProperties {
    /// `type: exec`.
    Exec(ExecProperties),
    /// `type: file`.
    File(FileProperties),
    /// `type: schedule`.
    Schedule(ScheduleProperties),
    /// `type: timer`.
    Timer(TimerProperties),
    /// `type: nagios`.
    Nagios(NagiosProperties),
    /// `type: metric`.
    Metric(MetricProperties),
    /// `type: expression`.
    Expression(ExpressionProperties),
    /// `type: kv`.
    Kv(KvProperties),
}

impl WatcherProperties {
    /// The watcher types Chorus runs.
    pub const TYPES: [&'static str; 8] = ["exec", "expression", "file", "kv", "metric", "nagios", "schedule", "timer"];

    /// The `type` name of this variant.
    pub fn watcher_type(&self) -> &'static str {
        match self {
            WatcherProperties::Exec(_) => "exec",
            WatcherProperties::File(_) => "file",
            WatcherProperties::Schedule(_) => "schedule",
            WatcherProperties::Timer(_) => "timer",
            WatcherProperties::Nagios(_) => "nagios",
            WatcherProperties::Metric(_) => "metric",
            WatcherProperties::Expression(_) => "expression",
            WatcherProperties::Kv(_) => "kv",
        }
    }

    /// Smallest `interval` the type accepts, and whether it uses one at all. Choria's
    /// limits: polling faster than twice a second only burns CPU on every node. Schedule and
    /// timer watchers accept an `interval` and ignore it, as Choria's do.
    fn min_interval(&self) -> Option<Duration> {
        match self {
            WatcherProperties::Exec(_)
            | WatcherProperties::File(_)
            | WatcherProperties::Nagios(_)
            | WatcherProperties::Metric(_)
            | WatcherProperties::Kv(_) => Some(Duration::from_millis(500)),
            // "interval should be more than 1 second", as Choria says.
            WatcherProperties::Expression(_) => Some(Duration::from_secs(1)),
            WatcherProperties::Schedule(_) | WatcherProperties::Timer(_) => None,
        }
    }
}

/// Runs a command; exit 0 is success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecProperties {
    /// Shell command, run with `sh -c` in the machine directory (which is also on `PATH`).
    pub command: String,
    /// The command is killed (with its process group) and counted as failed after this long.
    /// Default 10 s.
    pub timeout: Duration,
    /// Extra `KEY=VALUE` environment entries.
    pub environment: Vec<String>,
    /// Do not publish a state event after successful runs, only after failures; for checks
    /// that run often and are only interesting when they fail.
    pub suppress_success_announce: bool,
    /// Run the command under a lease of this governor (`chorus governor add`), so no more
    /// nodes run it at once than the governor's capacity (Choria's rolling upgrades).
    pub governor: Option<String>,
    /// How long to wait for a lease; the run fails without one. Default 5 min.
    pub governor_timeout: Duration,
    /// Read the command's output as a JSON object and put each of its keys in the
    /// machine's data store (Choria's `parse_as_data`); output that is not one fails the run.
    pub parse_as_data: bool,
}

/// Watches a file for changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProperties {
    /// The file, relative to the machine directory unless absolute.
    pub path: PathBuf,
    /// Take the file as it is at start as the baseline, so only later changes count;
    /// otherwise an existing file counts as changed on the first check.
    pub gather_initial_state: bool,
}

/// Is "on" for `duration` after each cron match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleProperties {
    /// Five-field cron lines (no seconds), in the node's local time.
    pub schedules: Vec<String>,
    /// How long the schedule stays on after a match.
    pub duration: Duration,
    /// Turn on up to this long after a match, at a random point picked when the watcher
    /// starts (at most half the duration, as Choria requires), so a fleet does not start
    /// together.
    pub start_splay: Duration,
    /// On re-entering a matching state with the schedule unchanged, do not fire the
    /// transition again.
    pub skip_trigger_on_reenter: bool,
}

/// Fires `fail_transition` when a timer started on entering a matching state runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerProperties {
    /// Timer length.
    pub timer: Duration,
    /// Use a random length between zero and `timer` (picked once per machine start), so a
    /// fleet does not act in lockstep.
    pub splay: bool,
}

/// A Nagios-compatible check (Choria's Scout): a `plugin` command line, or a `builtin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NagiosProperties {
    /// The check plugin's command line (run with `sh -c` in the machine directory).
    pub plugin: Option<String>,
    /// A builtin check: `heartbeat` (always OK, with the time); Choria's `goss` and
    /// `choria_status` are accepted and report UNKNOWN on Chorus nodes.
    pub builtin: Option<String>,
    /// The plugin is killed and the check is UNKNOWN after this long. Default 10 s.
    pub timeout: Duration,
    /// Operator annotations carried in every state event.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Choria's `gossfile`, `last_message`, `pubcert_expire`, `token_expire` (for its
    /// builtins), accepted and kept.
    pub extra: std::collections::BTreeMap<String, String>,
}

/// Choria's `expression` watcher: conditions over the machine's data store (`data`), the
/// node's `facts` and `identity`, checked every interval (default 10 s) and on every state
/// change; fires `success_transition` when `success_when` becomes true, else
/// `fail_transition` when `fail_when` becomes true (once per change of outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpressionProperties {
    /// The success condition.
    pub success_when: Option<String>,
    /// The failure condition.
    pub fail_when: Option<String>,
}

/// Choria's `kv` watcher in `poll` mode: reads a key of a key-value bucket every interval
/// into the machine's data store; a changed value fires `success_transition`, a failed
/// read `fail_transition`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvProperties {
    /// The bucket.
    pub bucket: String,
    /// The key (`{{ .Identity }}`, `{{ .Machine }}` are replaced).
    pub key: String,
    /// Also fire on a read that found the value unchanged (`on_successful_get`).
    pub on_successful_get: bool,
    /// Also fire when the key was written again with the same value (`on_matching_update`).
    pub on_matching_update: bool,
    /// Name the data key `<bucket>_<key>` (default) rather than `<key>`.
    pub bucket_prefix: bool,
    /// The data key to use instead of the key.
    pub store_key: Option<String>,
    /// A dotted path into a JSON object value: only that part is stored.
    pub query: Option<String>,
}

/// Gathers metrics with a command (Choria's `metric` watcher): its output is a JSON
/// `{"labels": {...}, "metrics": {"name": value}}`, or Nagios performance data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricProperties {
    /// The command (run with `sh -c` in the machine directory).
    pub command: String,
    /// How often it runs (Choria puts it in the properties; the watcher's own `interval`
    /// is used when this is absent).
    pub interval: Option<Duration>,
    /// Labels added to every metric.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Choria's `store` (the sample goes into the machine data store as `metric`, by
    /// watcher name), and `skip_prometheus`, `http`, `graphite_host`, `graphite_port`,
    /// `graphite_prefix`: accepted; Chorus publishes the metrics as state events.
    pub extra: std::collections::BTreeMap<String, String>,
}

/// Exec commands get this long unless the manifest says otherwise (Choria's documented
/// default).
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(10);
/// File watchers poll this often unless the manifest says otherwise.
pub const DEFAULT_FILE_INTERVAL: Duration = Duration::from_secs(5);
const MIN_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(60);
/// Shorter timers make a machine spin; Choria clamps to 1 s, Chorus says so instead.
const MIN_TIMER: Duration = Duration::from_millis(100);

impl Manifest {
    /// Parses and validates a manifest.
    pub fn from_yaml(yaml: &str) -> Result<Manifest, ManifestError> {
        let de = serde_yaml::Deserializer::from_str(yaml);
        let raw: RawManifest = serde_path_to_error::deserialize(de).map_err(|e| ManifestError::from_serde("", e))?;
        let manifest = raw.build()?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Reads and validates `path`, a `machine.yaml` or the machine directory holding one.
    /// Errors name the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Manifest, ManifestError> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path.push("machine.yaml");
        }
        let yaml =
            std::fs::read_to_string(&path).map_err(|source| ManifestError::Read { path: path.clone(), source })?;
        Manifest::from_yaml(&yaml).map_err(|e| match e {
            ManifestError::Invalid { field, reason, .. } => ManifestError::Invalid { file: Some(path), field, reason },
            other => other,
        })
    }

    /// All states of the machine: the initial state and every state the transitions name.
    pub fn states(&self) -> BTreeSet<&str> {
        let mut states = BTreeSet::from([self.initial_state.as_str()]);
        for t in &self.transitions {
            states.extend(t.from.iter().map(String::as_str));
            states.insert(&t.destination);
        }
        states
    }

    /// Checks everything that makes a manifest runnable: required fields, references
    /// between watchers, transitions and states, uniqueness and type limits.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.name.trim().is_empty() {
            return Err(err("name", "missing"));
        }
        if self.version.trim().is_empty() {
            return Err(err("version", "missing"));
        }
        if !is_semver(&self.version) {
            return Err(err("version", format!("{:?} is not a SemVer version such as \"1.0.0\"", self.version)));
        }
        if self.initial_state.trim().is_empty() {
            return Err(err("initial_state", "missing"));
        }
        if self.transitions.is_empty() {
            return Err(err("transitions", "empty, a machine needs at least one transition"));
        }

        let mut names = HashSet::new();
        for (i, t) in self.transitions.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(err(format!("transitions[{i}].name"), "missing"));
            }
            if !names.insert(t.name.as_str()) {
                return Err(err(format!("transitions[{i}].name"), format!("duplicate transition {:?}", t.name)));
            }
            if t.from.is_empty() {
                return Err(err(format!("transitions[{i}].from"), "empty"));
            }
            if let Some(j) = t.from.iter().position(|s| s.trim().is_empty()) {
                return Err(err(format!("transitions[{i}].from[{j}]"), "empty state name"));
            }
            if t.destination.trim().is_empty() {
                return Err(err(format!("transitions[{i}].destination"), "missing"));
            }
            for (j, sub) in t.subscribe.iter().enumerate() {
                let at = |f: &str| format!("transitions[{i}].subscribe[{j}].{f}");
                if sub.machine_name.trim().is_empty() {
                    return Err(err(at("machine_name"), "missing"));
                }
                if sub.event.trim().is_empty() {
                    return Err(err(at("event"), "missing"));
                }
            }
        }

        if self.watchers.is_empty() {
            return Err(err("watchers", "empty, a machine needs at least one watcher"));
        }
        let states = self.states();
        let mut watcher_names = HashSet::new();
        for (i, w) in self.watchers.iter().enumerate() {
            let field = |f: &str| format!("watchers[{i}].{f}");
            let kind = w.watcher_type();
            if w.name.trim().is_empty() {
                return Err(err(field("name"), "missing"));
            }
            if !watcher_names.insert(w.name.as_str()) {
                return Err(err(field("name"), format!("duplicate watcher {:?}", w.name)));
            }
            for (j, s) in w.state_match.iter().enumerate() {
                if !states.contains(s.as_str()) {
                    return Err(err(
                        field(&format!("state_match[{j}]")),
                        format!("unknown state {s:?} (states: {})", join(&states)),
                    ));
                }
            }
            for (key, transition) in
                [("success_transition", &w.success_transition), ("fail_transition", &w.fail_transition)]
            {
                if let Some(t) = transition {
                    if !names.contains(t.as_str()) {
                        return Err(err(field(key), format!("unknown transition {t:?}")));
                    }
                }
            }
            match (w.interval, w.properties.min_interval()) {
                (Some(interval), Some(min)) if interval < min => {
                    return Err(err(
                        field("interval"),
                        format!(
                            "{} is below the {kind} minimum of {}",
                            format_duration(interval),
                            format_duration(min)
                        ),
                    ));
                }
                _ => {}
            }
            if let Some(ai) = w.announce_interval {
                if ai < MIN_ANNOUNCE_INTERVAL {
                    return Err(err(
                        field("announce_interval"),
                        format!("{} is below the minimum of 1m", format_duration(ai)),
                    ));
                }
            }
            for (j, required) in w.foreign_state_required.iter().enumerate() {
                for (key, value) in [("machine_name", &required.machine_name), ("state", &required.state)] {
                    if value.trim().is_empty() {
                        return Err(err(field(&format!("foreign_state_required[{j}].{key}")), "missing"));
                    }
                }
            }
            let prop = |f: &str| format!("watchers[{i}].properties.{f}");
            match &w.properties {
                WatcherProperties::Exec(p) => {
                    if p.command.trim().is_empty() {
                        return Err(err(prop("command"), "missing"));
                    }
                    if p.timeout.is_zero() {
                        return Err(err(prop("timeout"), "must be more than 0"));
                    }
                    for (j, e) in p.environment.iter().enumerate() {
                        if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                            return Err(err(
                                prop(&format!("environment[{j}]")),
                                format!("expected KEY=VALUE, got {e:?}"),
                            ));
                        }
                    }
                }
                WatcherProperties::File(p) => {
                    if p.path.as_os_str().is_empty() {
                        return Err(err(prop("path"), "missing"));
                    }
                }
                WatcherProperties::Schedule(p) => {
                    if p.schedules.is_empty() {
                        return Err(err(prop("schedules"), "missing, at least one cron line is required"));
                    }
                    for (j, line) in p.schedules.iter().enumerate() {
                        CronSchedule::parse(line)
                            .map_err(|e| err(prop(&format!("schedules[{j}]")), format!("{line:?}: {e}")))?;
                    }
                    if p.duration.is_zero() {
                        return Err(err(prop("duration"), "missing"));
                    }
                    if p.start_splay > p.duration / 2 {
                        return Err(err(
                            prop("start_splay"),
                            format!(
                                "{} is more than half the duration {}",
                                format_duration(p.start_splay),
                                format_duration(p.duration)
                            ),
                        ));
                    }
                }
                WatcherProperties::Metric(p) => {
                    if p.command.trim().is_empty() {
                        return Err(err(prop("command"), "missing"));
                    }
                    if p.interval.or(w.interval).is_none() {
                        return Err(err(prop("interval"), "missing: how often the metrics are gathered"));
                    }
                }
                WatcherProperties::Nagios(p) => {
                    match (&p.plugin, &p.builtin) {
                        (Some(_), Some(_)) => return Err(err(prop("plugin"), "cannot set plugin and builtin")),
                        (None, None) => return Err(err(prop("plugin"), "missing: give plugin or builtin")),
                        (None, Some(b))
                            if !["heartbeat", "choria_status"].contains(&b.as_str()) && !b.starts_with("goss") =>
                        {
                            return Err(err(prop("builtin"), format!("unsupported builtin {b:?}")));
                        }
                        _ => {}
                    }
                    if p.timeout.is_zero() {
                        return Err(err(prop("timeout"), "must be more than 0"));
                    }
                }
                WatcherProperties::Expression(p) => {
                    if p.success_when.is_none() && p.fail_when.is_none() {
                        return Err(err(prop("success_when"), "missing: success_when or fail_when is required"));
                    }
                    for (key, text) in [("success_when", &p.success_when), ("fail_when", &p.fail_when)] {
                        if let Some(text) = text {
                            chorus_rpc::expression::Condition::compile(text).map_err(|e| err(prop(key), e))?;
                        }
                    }
                }
                WatcherProperties::Kv(p) => {
                    if !chorus_backbone::kv::is_bucket_name(&p.bucket) {
                        return Err(err(prop("bucket"), format!("{:?} is not a bucket name", p.bucket)));
                    }
                }
                WatcherProperties::Timer(p) => {
                    if w.success_transition.is_some() {
                        return Err(err(
                            field("success_transition"),
                            "timer watchers only fire fail_transition, when the timer runs out",
                        ));
                    }
                    if p.timer < MIN_TIMER {
                        return Err(err(
                            prop("timer"),
                            format!(
                                "{} is below the timer minimum of {}",
                                format_duration(p.timer),
                                format_duration(MIN_TIMER)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::invalid(field, reason)
}

fn join(states: &BTreeSet<&str>) -> String {
    states.iter().copied().collect::<Vec<_>>().join(", ")
}

/// `MAJOR.MINOR.PATCH` with optional `-pre` and `+build`.
fn is_semver(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

// The YAML as written. Everything is optional here so that a missing key is reported by
// `build` as `<field>: missing` rather than by serde as a message about the parent.

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a machine manifest: a mapping with name, version, initial_state, transitions and watchers"
)]
struct RawManifest {
    name: Option<String>,
    version: Option<String>,
    initial_state: Option<String>,
    splay_start: Option<u64>,
    transitions: Option<Vec<RawTransition>>,
    watchers: Option<Vec<RawWatcher>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a transition: a mapping with name, from and destination")]
struct RawTransition {
    name: Option<String>,
    from: Option<Vec<String>>,
    destination: Option<String>,
    description: Option<String>,
    subscribe: Option<Vec<RawSubscription>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a subscription: a mapping with machine_name and event")]
struct RawSubscription {
    machine_name: Option<String>,
    event: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a watcher: a mapping with name, type and properties")]
struct RawWatcher {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    state_match: Option<Vec<String>>,
    fail_transition: Option<String>,
    success_transition: Option<String>,
    interval: Option<GoDuration>,
    announce_interval: Option<GoDuration>,
    foreign_state_required: Option<Vec<ForeignState>>,
    /// Parsed by `build` once `type` is known.
    properties: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "exec properties: a mapping with command")]
struct RawExec {
    command: Option<String>,
    timeout: Option<GoDuration>,
    environment: Option<Vec<String>>,
    #[serde(default)]
    suppress_success_announce: bool,
    governor: Option<String>,
    governor_timeout: Option<GoDuration>,
    #[serde(default)]
    parse_as_data: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "expression properties: a mapping with success_when or fail_when")]
struct RawExpression {
    success_when: Option<String>,
    fail_when: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "kv properties: a mapping with bucket and key")]
struct RawKv {
    bucket: Option<String>,
    key: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    on_successful_get: bool,
    #[serde(default)]
    on_matching_update: bool,
    bucket_prefix: Option<bool>,
    republish_trigger: Option<String>,
    #[serde(default)]
    hiera_config: bool,
    store_key: Option<String>,
    query: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "file properties: a mapping with path")]
struct RawFile {
    path: Option<String>,
    #[serde(default)]
    gather_initial_state: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "schedule properties: a mapping with schedules and duration")]
struct RawSchedule {
    schedules: Option<Vec<String>>,
    duration: Option<GoDuration>,
    start_splay: Option<GoDuration>,
    #[serde(default)]
    skip_trigger_on_reenter: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "metric properties: a mapping with command and interval")]
struct RawMetric {
    command: Option<String>,
    interval: Option<GoDuration>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    skip_prometheus: Option<bool>,
    store: Option<bool>,
    http: Option<bool>,
    graphite_host: Option<String>,
    graphite_port: Option<serde_yaml::Value>,
    graphite_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "nagios properties: a mapping with plugin or builtin")]
struct RawNagios {
    plugin: Option<String>,
    builtin: Option<String>,
    timeout: Option<GoDuration>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
    gossfile: Option<String>,
    last_message: Option<String>,
    pubcert_expire: Option<String>,
    token_expire: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "timer properties: a mapping with timer")]
struct RawTimer {
    timer: Option<GoDuration>,
    #[serde(default)]
    splay: bool,
}

fn required(value: Option<String>, field: impl FnOnce() -> String) -> Result<String, ManifestError> {
    match value {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ManifestError::invalid(field(), "missing")),
    }
}

/// Choria writes an unset transition as `""`.
fn optional(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn properties<T: DeserializeOwned>(value: Option<serde_yaml::Value>, field: &str) -> Result<T, ManifestError> {
    let value = match value {
        None | Some(serde_yaml::Value::Null) => serde_yaml::Value::Mapping(Default::default()),
        Some(v) => v,
    };
    serde_path_to_error::deserialize(value).map_err(|e| ManifestError::from_serde(field, e))
}

impl RawManifest {
    fn build(self) -> Result<Manifest, ManifestError> {
        let transitions = self
            .transitions
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let subscribe = t
                    .subscribe
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(j, s)| {
                        Ok(Subscription {
                            machine_name: required(s.machine_name, || {
                                format!("transitions[{i}].subscribe[{j}].machine_name")
                            })?,
                            event: required(s.event, || format!("transitions[{i}].subscribe[{j}].event"))?,
                        })
                    })
                    .collect::<Result<_, ManifestError>>()?;
                Ok(TransitionDef {
                    name: required(t.name, || format!("transitions[{i}].name"))?,
                    from: t.from.unwrap_or_default(),
                    destination: required(t.destination, || format!("transitions[{i}].destination"))?,
                    description: optional(t.description),
                    subscribe,
                })
            })
            .collect::<Result<_, ManifestError>>()?;
        let watchers = self
            .watchers
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, w)| w.build(i))
            .collect::<Result<_, _>>()?;
        Ok(Manifest {
            name: required(self.name, || "name".into())?,
            version: required(self.version, || "version".into())?,
            initial_state: required(self.initial_state, || "initial_state".into())?,
            splay_start: Duration::from_secs(self.splay_start.unwrap_or(0)),
            transitions,
            watchers,
        })
    }
}

impl RawWatcher {
    fn build(self, i: usize) -> Result<WatcherDef, ManifestError> {
        let name = required(self.name, || format!("watchers[{i}].name"))?;
        let kind = required(self.kind, || format!("watchers[{i}].type"))?;
        let field = format!("watchers[{i}].properties");
        let properties = match kind.as_str() {
            "exec" => {
                let p: RawExec = properties(self.properties, &field)?;
                WatcherProperties::Exec(ExecProperties {
                    command: required(p.command, || format!("{field}.command"))?,
                    timeout: p.timeout.map_or(DEFAULT_EXEC_TIMEOUT, |d| d.0),
                    environment: p.environment.unwrap_or_default(),
                    suppress_success_announce: p.suppress_success_announce,
                    governor: optional(p.governor),
                    governor_timeout: p.governor_timeout.map_or(Duration::from_secs(300), |d| d.0),
                    parse_as_data: p.parse_as_data,
                })
            }
            "file" => {
                let p: RawFile = properties(self.properties, &field)?;
                WatcherProperties::File(FileProperties {
                    path: required(p.path, || format!("{field}.path"))?.into(),
                    gather_initial_state: p.gather_initial_state,
                })
            }
            "schedule" => {
                let p: RawSchedule = properties(self.properties, &field)?;
                WatcherProperties::Schedule(ScheduleProperties {
                    schedules: p.schedules.unwrap_or_default(),
                    duration: match p.duration {
                        Some(d) => d.0,
                        None => return Err(ManifestError::invalid(format!("{field}.duration"), "missing")),
                    },
                    skip_trigger_on_reenter: p.skip_trigger_on_reenter,
                    start_splay: p.start_splay.map_or(Duration::ZERO, |d| d.0),
                })
            }
            "timer" => {
                let p: RawTimer = properties(self.properties, &field)?;
                WatcherProperties::Timer(TimerProperties {
                    timer: match p.timer {
                        Some(d) => d.0,
                        None => return Err(ManifestError::invalid(format!("{field}.timer"), "missing")),
                    },
                    splay: p.splay,
                })
            }
            "expression" => {
                let p: RawExpression = properties(self.properties, &field)?;
                WatcherProperties::Expression(ExpressionProperties {
                    success_when: optional(p.success_when),
                    fail_when: optional(p.fail_when),
                })
            }
            "kv" => {
                let p: RawKv = properties(self.properties, &field)?;
                match p.mode.as_deref().unwrap_or("poll") {
                    "poll" => {}
                    // As Choria: "watch mode not supported".
                    "watch" => {
                        return Err(ManifestError::invalid(
                            format!("{field}.mode"),
                            "watch mode is not supported (as in Choria); use poll",
                        ))
                    }
                    other => {
                        return Err(ManifestError::invalid(
                            format!("{field}.mode"),
                            format!("{other:?}: should be poll or watch"),
                        ))
                    }
                }
                if optional(p.republish_trigger).is_some() {
                    return Err(ManifestError::invalid(
                        format!("{field}.republish_trigger"),
                        "not supported on Chorus nodes",
                    ));
                }
                if p.hiera_config {
                    return Err(ManifestError::invalid(
                        format!("{field}.hiera_config"),
                        "not supported on Chorus nodes",
                    ));
                }
                WatcherProperties::Kv(KvProperties {
                    bucket: required(p.bucket, || format!("{field}.bucket"))?,
                    key: required(p.key, || format!("{field}.key"))?,
                    on_successful_get: p.on_successful_get,
                    on_matching_update: p.on_matching_update,
                    bucket_prefix: p.bucket_prefix.unwrap_or(true),
                    store_key: optional(p.store_key),
                    query: optional(p.query),
                })
            }
            "metric" => {
                let p: RawMetric = properties(self.properties, &field)?;
                let flag = |b: Option<bool>| b.map(|b| b.to_string());
                let port = p.graphite_port.map(|v| match v {
                    serde_yaml::Value::String(s) => s,
                    other => serde_yaml::to_string(&other).unwrap_or_default().trim().to_owned(),
                });
                let extra = [
                    ("skip_prometheus", flag(p.skip_prometheus)),
                    ("store", flag(p.store)),
                    ("http", flag(p.http)),
                    ("graphite_host", p.graphite_host),
                    ("graphite_port", port),
                    ("graphite_prefix", p.graphite_prefix),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                .collect();
                WatcherProperties::Metric(MetricProperties {
                    command: required(p.command, || format!("{field}.command"))?,
                    interval: p.interval.map(|d| d.0),
                    labels: p.labels,
                    extra,
                })
            }
            "nagios" => {
                let p: RawNagios = properties(self.properties, &field)?;
                let extra = [
                    ("gossfile", p.gossfile),
                    ("last_message", p.last_message),
                    ("pubcert_expire", p.pubcert_expire),
                    ("token_expire", p.token_expire),
                ]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                .collect();
                WatcherProperties::Nagios(NagiosProperties {
                    plugin: optional(p.plugin),
                    builtin: optional(p.builtin),
                    timeout: p.timeout.map_or(DEFAULT_EXEC_TIMEOUT, |d| d.0),
                    annotations: p.annotations,
                    extra,
                })
            }
            other => {
                return Err(ManifestError::invalid(
                    format!("watchers[{i}].type"),
                    format!("unknown watcher type {other:?} (supported: {})", WatcherProperties::TYPES.join(", ")),
                ))
            }
        };
        Ok(WatcherDef {
            name,
            state_match: self.state_match.unwrap_or_default(),
            fail_transition: optional(self.fail_transition),
            success_transition: optional(self.success_transition),
            interval: self.interval.map(|d| d.0),
            announce_interval: self.announce_interval.map(|d| d.0),
            foreign_state_required: self.foreign_state_required.unwrap_or_default(),
            properties,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HVAC: &str = r#"
name: HVAC
version: "1.0.0"
initial_state: unknown
splay_start: 30
transitions:
  - name: air_bad
    from: [unknown, idle, running]
    destination: running
    description: bad air, run the HVAC
  - {name: air_good, from: [unknown, idle, running], destination: idle}
watchers:
  - name: monitor
    type: exec
    state_match: [unknown, idle, running]
    success_transition: air_good
    fail_transition: air_bad
    interval: "1m"
    properties:
      command: monitor.sh
      environment: ["ROOM=lab"]
  - name: idle_too_long
    type: timer
    state_match: [idle]
    fail_transition: air_bad
    properties: {timer: 1h, splay: true}
"#;

    /// The error of `HVAC` after replacing `from` with `to`.
    fn err_after(from: &str, to: &str) -> String {
        assert!(HVAC.contains(from), "test fixture lacks {from:?}");
        Manifest::from_yaml(&HVAC.replacen(from, to, 1)).unwrap_err().to_string()
    }

    fn assert_err(from: &str, to: &str, expected: &str) {
        let e = err_after(from, to);
        assert!(e.starts_with(expected), "replacing {from:?} with {to:?}:\n got: {e}\nwant: {expected}…");
    }

    /// What Choria accepts, Chorus accepts with its meaning: `subscribe`, a schedule's
    /// `start_splay`, an `interval` on schedule and timer watchers (which Choria ignores).
    /// What Choria refuses stays refused: a timer's `success_transition` ("timer watcher
    /// does not support success events"), a start splay over half the duration.
    #[test]
    fn choria_fields_are_accepted_with_their_meaning() {
        let yaml = r#"
name: M
version: 1.0.0
initial_state: idle
transitions:
  - name: go
    from: [idle]
    destination: busy
    subscribe: [{machine_name: Other, event: started}]
  - {name: stop, from: [busy], destination: idle}
watchers:
  - name: window
    type: schedule
    interval: 1m
    state_match: [idle]
    success_transition: go
    fail_transition: stop
    properties: {schedules: ["0 * * * *"], duration: 10m, start_splay: 5m}
  - name: timeout
    type: timer
    interval: 10s
    fail_transition: stop
    properties: {timer: 1h}
"#;
        let m = Manifest::from_yaml(yaml).unwrap();
        assert_eq!(
            m.transitions[0].subscribe,
            [Subscription { machine_name: "Other".into(), event: "started".into() }]
        );
        match &m.watchers[0].properties {
            WatcherProperties::Schedule(p) => assert_eq!(p.start_splay, Duration::from_secs(300)),
            other => panic!("{other:?}"),
        }
        let too_much =
            Manifest::from_yaml(&yaml.replace("start_splay: 5m", "start_splay: 6m")).unwrap_err().to_string();
        assert!(too_much.contains("watchers[0].properties.start_splay"), "{too_much}");
        let timer_success = yaml.replace(
            "    fail_transition: stop
    properties: {timer: 1h}",
            "    success_transition: go
    properties: {timer: 1h}",
        );
        assert!(Manifest::from_yaml(&timer_success).unwrap_err().to_string().contains("success_transition"));
        let no_event = yaml.replace("event: started", "event: ''");
        assert!(Manifest::from_yaml(&no_event).unwrap_err().to_string().contains("subscribe[0].event"));
    }

    #[test]
    fn parses_the_hvac_example() {
        let m = Manifest::from_yaml(HVAC).unwrap();
        assert_eq!(m.name, "HVAC");
        assert_eq!(m.version, "1.0.0");
        assert_eq!(m.initial_state, "unknown");
        assert_eq!(m.splay_start, Duration::from_secs(30));
        assert_eq!(m.transitions.len(), 2);
        assert_eq!(m.transitions[0].description.as_deref(), Some("bad air, run the HVAC"));
        assert_eq!(m.states().into_iter().collect::<Vec<_>>(), ["idle", "running", "unknown"]);
        let w = &m.watchers[0];
        assert_eq!(w.watcher_type(), "exec");
        assert_eq!(w.interval, Some(Duration::from_secs(60)));
        assert!(w.active_in("idle") && !w.active_in("off"));
        match &w.properties {
            WatcherProperties::Exec(p) => {
                assert_eq!(p.command, "monitor.sh");
                assert_eq!(p.timeout, DEFAULT_EXEC_TIMEOUT);
                assert_eq!(p.environment, ["ROOM=lab"]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            m.watchers[1].properties,
            WatcherProperties::Timer(TimerProperties { timer: Duration::from_secs(3600), splay: true })
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/machines/hvac");
        let m = Manifest::load(path).unwrap();
        assert_eq!(m.name, "HVAC");
        let types: BTreeSet<_> = m.watchers.iter().map(|w| w.watcher_type()).collect();
        assert_eq!(types.len(), 4, "the example shows every watcher type");
    }

    #[test]
    fn unknown_transition_is_named() {
        assert_err(
            "success_transition: air_good",
            "success_transition: air_goodd",
            r#"watchers[0].success_transition: unknown transition "air_goodd""#,
        );
        assert_err(
            "fail_transition: air_bad\n    properties: {timer",
            "fail_transition: nope\n    properties: {timer",
            r#"watchers[1].fail_transition: unknown transition "nope""#,
        );
    }

    #[test]
    fn required_top_level_fields() {
        assert_err("initial_state: unknown\n", "", "initial_state: missing");
        assert_err("initial_state: unknown\n", "initial_state: \"\"\n", "initial_state: missing");
        assert_err("name: HVAC\n", "", "name: missing");
        assert_err("version: \"1.0.0\"\n", "", "version: missing");
        assert_err("version: \"1.0.0\"", "version: one", "version: \"one\" is not a SemVer");
    }

    #[test]
    fn transition_errors() {
        assert_err(
            "from: [unknown, idle, running]\n    destination",
            "from: []\n    destination",
            "transitions[0].from: empty",
        );
        assert_err("from: [unknown, idle, running]\n    destination", "destination", "transitions[0].from: empty");
        assert_err(
            "from: [unknown, idle, running], destination: idle}",
            "from: [unknown, \"\"], destination: idle}",
            "transitions[1].from[1]: empty state name",
        );
        assert_err("    destination: running\n", "", "transitions[0].destination: missing");
        assert_err("name: air_good,", "name: air_bad,", "transitions[1].name: duplicate transition \"air_bad\"");
        let no_transitions = "name: x\nversion: 1.0.0\ninitial_state: a\nwatchers: []\n";
        assert_eq!(
            Manifest::from_yaml(no_transitions).unwrap_err().to_string(),
            "transitions: empty, a machine needs at least one transition"
        );
    }

    #[test]
    fn watcher_errors() {
        assert_err(
            "type: timer",
            "type: homekit",
            "watchers[1].type: unknown watcher type \"homekit\" (supported: exec, expression, file, kv, metric, nagios, schedule, timer)",
        );
        assert_err("type: timer", "type: nagios", "watchers[1].properties.timer: unknown field `timer`");
        assert_err("    type: exec\n", "", "watchers[0].type: missing");
        assert_err("command: monitor.sh\n", "", "watchers[0].properties.command: missing");
        assert_err(
            "    properties:\n      command: monitor.sh\n      environment: [\"ROOM=lab\"]\n",
            "",
            "watchers[0].properties.command: missing",
        );
        assert_err("name: idle_too_long", "name: monitor", "watchers[1].name: duplicate watcher \"monitor\"");
        assert_err(
            "state_match: [idle]",
            "state_match: [idel]",
            "watchers[1].state_match[0]: unknown state \"idel\" (states: idle, running, unknown)",
        );
        assert_err(
            "\"ROOM=lab\"",
            "\"ROOM\"",
            "watchers[0].properties.environment[0]: expected KEY=VALUE, got \"ROOM\"",
        );
        assert_err(
            "fail_transition: air_bad\n    properties: {timer",
            "success_transition: air_good\n    properties: {timer",
            "watchers[1].success_transition: timer watchers only fire fail_transition",
        );
        assert_err(
            "timer: 1h",
            "timer: 10ms",
            "watchers[1].properties.timer: 10ms is below the timer minimum of 100ms",
        );
        assert_err("{timer: 1h, splay: true}", "{splay: true}", "watchers[1].properties.timer: missing");
    }

    #[test]
    fn interval_limits() {
        assert_err(
            "interval: \"1m\"",
            "interval: 100ms",
            "watchers[0].interval: 100ms is below the exec minimum of 500ms",
        );
        assert_err("interval: \"1m\"", "interval: 1x", "watchers[0].interval: invalid duration \"1x\": unknown unit");
        assert_err(
            "interval: \"1m\"",
            "interval: 60",
            "watchers[0].interval: invalid type: integer `60`, expected a duration string",
        );
        // Choria accepts an interval on a timer and ignores it; so does Chorus.
        let timer = HVAC.replacen(
            "fail_transition: air_bad\n    properties: {timer",
            "fail_transition: air_bad\n    interval: 1s\n    properties: {timer",
            1,
        );
        assert!(Manifest::from_yaml(&timer).is_ok());
        assert_err(
            "interval: \"1m\"",
            "interval: \"1m\"\n    announce_interval: 10s",
            "watchers[0].announce_interval: 10s is below the minimum of 1m",
        );
        // Exactly the minimum is fine.
        Manifest::from_yaml(&HVAC.replace("interval: \"1m\"", "interval: 500ms")).unwrap();
    }

    #[test]
    fn unknown_fields_carry_their_path() {
        assert_err(
            "splay_start: 30\n",
            "splay_start: 30\nsplay: 30\n",
            "splay: unknown field `splay`, expected one of `name`",
        );
        assert_err(
            "    interval: \"1m\"",
            "    intreval: \"1m\"",
            "watchers[0].intreval: unknown field `intreval`, expected one of",
        );
        assert_err(
            "command: monitor.sh",
            "command: monitor.sh\n      disown: true",
            "watchers[0].properties.disown: unknown field `disown`, expected one of `command`",
        );
        assert_err(
            "description: bad air",
            "descripton: bad air",
            "transitions[0].descripton: unknown field `descripton`",
        );
        assert_err("splay_start: 30", "splay_start: soon", "splay_start: invalid type: string \"soon\", expected u64");
        assert_err(
            "{timer: 1h, splay: true}",
            "{timer: 1h, splay: sometimes}",
            "watchers[1].properties.splay: invalid type",
        );
        assert_err(
            "{timer: 1h, splay: true}",
            "hello",
            "watchers[1].properties: invalid type: string \"hello\", expected timer properties",
        );
        let e = Manifest::from_yaml("- a\n- b").unwrap_err().to_string();
        assert_eq!(e, "manifest: invalid type: sequence, expected a machine manifest: a mapping with name, version, initial_state, transitions and watchers");
    }

    #[test]
    fn file_and_schedule_properties() {
        let yaml = r#"
name: m
version: 0.1.0
initial_state: a
transitions: [{name: go, from: [a], destination: b}, {name: back, from: [b], destination: a}]
watchers:
  - {name: f, type: file, success_transition: go, fail_transition: back, interval: 1s, properties: {path: flag, gather_initial_state: true}}
  - {name: s, type: schedule, success_transition: go, fail_transition: back, properties: {schedules: ["0 2 * * *", "@hourly"], duration: 1h}}
"#;
        let m = Manifest::from_yaml(yaml).unwrap();
        assert_eq!(
            m.watchers[0].properties,
            WatcherProperties::File(FileProperties { path: "flag".into(), gather_initial_state: true })
        );
        let bad = |from: &str, to: &str| Manifest::from_yaml(&yaml.replacen(from, to, 1)).unwrap_err().to_string();
        assert!(bad("\"0 2 * * *\"", "\"0 25 * * *\"")
            .starts_with("watchers[1].properties.schedules[0]: \"0 25 * * *\": hour: 25"));
        assert_eq!(
            bad("schedules: [\"0 2 * * *\", \"@hourly\"], ", ""),
            "watchers[1].properties.schedules: missing, at least one cron line is required"
        );
        assert_eq!(bad(", duration: 1h", ""), "watchers[1].properties.duration: missing");
        assert_eq!(bad("path: flag, ", ""), "watchers[0].properties.path: missing");
        assert_eq!(
            bad("interval: 1s", "interval: 499ms"),
            "watchers[0].interval: 499ms is below the file minimum of 500ms"
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("machine.yaml");
        std::fs::write(&path, HVAC.replace("success_transition: air_good\n", "success_transition: air_good_typo\n"))
            .unwrap();
        // A directory is read as <dir>/machine.yaml.
        let e = Manifest::load(dir.path()).unwrap_err();
        assert_eq!(e.field(), Some("watchers[0].success_transition"));
        assert!(e.to_string().starts_with(&format!("{}: watchers[0].success_transition", path.display())), "{e}");
        let e = Manifest::load(dir.path().join("nope.yaml")).unwrap_err();
        assert!(matches!(e, ManifestError::Read { .. }) && e.field().is_none());
    }

    #[test]
    fn broken_yaml_is_reported() {
        let e = Manifest::from_yaml("name: [unclosed").unwrap_err();
        assert!(e.field().is_some(), "{e}");
        let e = Manifest::from_yaml("").unwrap_err();
        assert!(e.to_string().starts_with("manifest: ") || e.to_string().starts_with("name: missing"), "{e}");
    }
}
