//! The reactor's configuration: rules, what they match, when they fire and what they do.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chorus_runtime::{Backoff, Config, ConfigError};
use chorus_schemas::subject::validate_token;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::template::{Expression, Template, ValueTemplate};

/// Configuration of a reactor (YAML or JSON; unknown fields are refused).
///
/// ```yaml
/// name: reactor1
/// state_dir: /var/lib/chorus/reactor
/// rules:
///   - name: restart_on_critical
///     match:
///       stream: CHORUS_MACHINE
///       type: io.choria.machine.watcher.nagios.v1.state
///       expression: data.status == "CRITICAL"
///     when: {count: 3, within: 10m}
///     throttle: 30m
///     actions:
///       - rpc: {agent: service, action: restart, data: {service: nginx}, identity: ["{{ event.subject }}"]}
/// ```
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorConfig {
    /// The reactor's name: the subject of its records and the key of its state. Instances of
    /// one active-standby reactor share it.
    #[serde(default = "default_name")]
    pub name: String,
    /// Directory of the reactor's state (positions, rule state, firings not yet done).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The rules, each with a unique name.
    pub rules: Vec<Rule>,
    /// Collective RPC actions are made in.
    #[serde(default = "default_collective")]
    pub collective: String,
    /// Caller id of RPC actions on fleets that do not authenticate callers; with `security`
    /// it is the credential's.
    #[serde(default = "default_callerid")]
    pub callerid: String,
    /// The reactor's key and client credential for RPC actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<chorus_rpc::ClientSecurity>,
    /// Site stamped on the reactor's records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Firings whose actions run at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Events evaluated per committed batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Where a stream the reactor has not read before is read from: `new` (the default:
    /// react to what happens from now on) or `first` (everything stored).
    #[serde(default)]
    pub start: Start,
    /// Run as one of several instances of which only the elected leader acts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election: Option<chorus_platform::election::ElectionConfig>,
    /// The stream holding the reactor's records (a standby reads the leader's there).
    #[serde(default = "default_records_stream")]
    pub records_stream: String,
    /// How often timed conditions (absence, debounce) are checked.
    #[serde(default = "default_tick", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub tick: Duration,
}

/// Where a stream the reactor has not read before is read from.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// Events stored from now on.
    #[default]
    New,
    /// Every event stored.
    First,
}

/// One rule.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name, a NATS subject token (it is part of the records' subjects).
    pub name: String,
    /// Which events the rule looks at.
    #[serde(rename = "match")]
    pub matches: Match,
    /// The grouping key, a template over the event: conditions, throttles and once-per-key
    /// count per key. The event's subject (the node) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When matching events make the rule fire; every matching event when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<When>,
    /// At most one firing per key within this time.
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub throttle: Option<Duration>,
    /// Fire only once the condition has held with no further matching event for this long
    /// (the last event is the cause).
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub debounce: Option<Duration>,
    /// Fire at most once per key, ever.
    #[serde(default)]
    pub once_per_key: bool,
    /// Run the actions under a lease of this governor (`chorus governor add`), so no more
    /// firings act at once, fleet-wide, than its capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governor: Option<String>,
    /// How long a firing waits for a lease before its actions fail.
    #[serde(default = "default_governor_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub governor_timeout: Duration,
    /// What a firing does, in order; an action that fails does not stop the next. Each is
    /// a map with one key, the kind (`- rpc: {...}`).
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    #[schemars(with = "Vec<Action>")]
    pub actions: Vec<Action>,
}

/// Which events a rule looks at; every field given must hold.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// The stream read (`CHORUS_LIFECYCLE` when absent).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// CloudEvents types; `*` in a type matches any run of characters.
    #[serde(default, rename = "type", with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub types: Vec<String>,
    /// NATS subject patterns (`*`, `>`) of the message.
    #[serde(default, with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<String>")]
    pub subject: Vec<String>,
    /// An expression over the event that must be true (Choria's expr language, as `-S`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

/// Conditions across events.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// Fire when this many matching events of one key arrived within `within`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The window of `count`, by event time.
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub within: Option<Duration>,
    /// Fire when a key that was seen has had no matching event for this long (once per
    /// silence: the next event arms it again).
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub absent_for: Option<Duration>,
    /// Fire when this expression's value for a key differs from its value at the key's
    /// previous matching event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<String>,
}

/// One action of a rule. Strings in an action are templates: `{{ expr }}` is replaced by
/// the expression's value over the event (a string that is one template keeps the value's
/// type).
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Action {
    /// An RPC request.
    Rpc(RpcAction),
    /// An HTTP request.
    Webhook(WebhookAction),
    /// A local command.
    Command(CommandAction),
    /// A CloudEvent published on the backbone.
    Publish(PublishAction),
}

impl Action {
    /// `rpc`, `webhook`, `command` or `publish`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Rpc(_) => "rpc",
            Action::Webhook(_) => "webhook",
            Action::Command(_) => "command",
            Action::Publish(_) => "publish",
        }
    }
}

/// An RPC request; it succeeds when at least one node replied and every reply is OK.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpcAction {
    /// Agent.
    pub agent: String,
    /// Action.
    pub action: String,
    /// Inputs.
    #[serde(default)]
    pub data: serde_json::Map<String, Value>,
    /// Node identities (exact: sent to each node directly; `/regex/`: a filter).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity: Vec<String>,
    /// Fact filters (`country=uk`, `os.release>=12`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fact: Vec<String>,
    /// Class filters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class: Vec<String>,
    /// Compound filters (`-S`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compound: Vec<String>,
    /// How long to wait for replies.
    #[serde(default = "default_rpc_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

/// An HTTP request with the firing's id as `Idempotency-Key`; 2xx succeeds, 5xx, 429 and
/// transport errors are retried.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookAction {
    /// URL (a template).
    pub url: String,
    /// Method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body; the firing record with its event when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Attempts in all.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Pause between attempts.
    #[serde(default = "default_action_backoff")]
    pub backoff: Backoff,
    /// Time allowed per attempt.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

/// A local command, without a shell; the firing's id is in `CHORUS_FIRING`, the event's
/// JSON on standard input. Exit status 0 succeeds.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAction {
    /// Program and arguments (templates).
    pub run: Vec<String>,
    /// Extra environment (templates).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Time allowed; the command is killed after it.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

/// A CloudEvent published on `subject`, with the firing's id and the action's index as its
/// id (so it is stored once, however often the action runs).
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishAction {
    /// NATS subject (a template); a stream must capture it.
    pub subject: String,
    /// CloudEvents type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// CloudEvents data (templates); the cause event's data when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

fn default_name() -> String {
    "reactor".into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("chorus-data/reactor")
}
fn default_collective() -> String {
    "choria".into()
}
fn default_callerid() -> String {
    "choria=reactor".into()
}
fn default_concurrency() -> usize {
    16
}
fn default_batch_size() -> usize {
    512
}
fn default_records_stream() -> String {
    chorus_schemas::subject::CHORUS_REACTOR.into()
}
fn default_tick() -> Duration {
    Duration::from_secs(1)
}
fn default_stream() -> String {
    chorus_schemas::subject::CHORUS_LIFECYCLE.into()
}
fn default_governor_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_rpc_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_method() -> String {
    "POST".into()
}
fn default_attempts() -> u32 {
    5
}
fn default_action_backoff() -> Backoff {
    Backoff::doubling(Duration::from_millis(500), Duration::from_secs(30))
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(60)
}

/// A list given as one value or several.
mod one_or_many {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Either::deserialize(d)? {
            Either::One(s) => vec![s],
            Either::Many(v) => v,
        })
    }
}

impl ReactorConfig {
    /// Reads and validates a YAML (or JSON) file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        chorus_runtime::config::load(path)
    }

    /// Parses and validates YAML (or JSON) text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        chorus_runtime::config::from_text(text)
    }

    /// The streams the rules read, each once, in order of first use.
    pub fn streams(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.rules.iter().map(|r| r.matches.stream.clone()).filter(|s| seen.insert(s.clone())).collect()
    }
}

impl Config for ReactorConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, m: &str| Err(ConfigError::invalid(field, m));
        let token = |field: &str, value: &str| {
            validate_token("token", value).map_err(|e| ConfigError::invalid(field, &e).with_source(e))
        };
        token("name", &self.name)?;
        token("collective", &self.collective)?;
        if let Some(site) = &self.site {
            token("site", site)?;
        }
        if self.callerid.is_empty() {
            return bad("callerid", "must not be empty");
        }
        if self.concurrency == 0 {
            return bad("concurrency", "must be > 0");
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return bad("batch_size", "must be 1..=10000");
        }
        if self.tick < Duration::from_millis(10) {
            return bad("tick", "must be >= 10ms");
        }
        if self.rules.is_empty() {
            return bad("rules", "must list at least one rule");
        }
        let mut names = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let at = |f: &str| format!("rules[{i}].{f}");
            token(&at("name"), &rule.name)?;
            if !names.insert(rule.name.as_str()) {
                return bad(&at("name"), &format!("{:?} names two rules", rule.name));
            }
            rule.validate(&at)?;
        }
        Ok(())
    }
}

impl Rule {
    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let bad = |field: &str, m: &str| Err(ConfigError::invalid(at(field), m));
        let m = &self.matches;
        chorus_schemas::subject::validate_token("stream", &m.stream)
            .map_err(|e| ConfigError::invalid(at("match.stream"), &e))?;
        for s in &m.subject {
            chorus_backbone::subject::validate_filter(s).map_err(|e| ConfigError::invalid(at("match.subject"), &e))?;
        }
        if m.types.iter().any(String::is_empty) {
            return bad("match.type", "must not be empty");
        }
        if let Some(e) = &m.expression {
            Expression::compile(e).map_err(|e| ConfigError::invalid(at("match.expression"), &e))?;
        }
        if let Some(k) = &self.key {
            Template::compile(k).map_err(|e| ConfigError::invalid(at("key"), &e))?;
        }
        if let Some(when) = &self.when {
            let given = [when.count.is_some(), when.absent_for.is_some(), when.changed.is_some()];
            if given.iter().filter(|g| **g).count() != 1 {
                return bad("when", "give exactly one of count (with within), absent_for, changed");
            }
            if let Some(n) = when.count {
                if n == 0 {
                    return bad("when.count", "must be > 0");
                }
                if when.within.is_none_or(|w| w.is_zero()) {
                    return bad("when.within", "count needs a window > 0");
                }
            } else if when.within.is_some() {
                return bad("when.within", "only goes with count");
            }
            if when.absent_for.is_some_and(|d| d.is_zero()) {
                return bad("when.absent_for", "must be > 0");
            }
            if when.absent_for.is_some() && self.debounce.is_some() {
                return bad("debounce", "an absence already waits; debounce does not go with absent_for");
            }
            if let Some(c) = &when.changed {
                Expression::compile(c).map_err(|e| ConfigError::invalid(at("when.changed"), &e))?;
            }
        }
        if self.governor.as_deref().is_some_and(|g| !chorus_backbone::kv::is_bucket_name(g)) {
            return bad("governor", "a governor name: letters, digits, - and _");
        }
        if self.throttle.is_some_and(|d| d.is_zero()) {
            return bad("throttle", "must be > 0");
        }
        if self.debounce.is_some_and(|d| d.is_zero()) {
            return bad("debounce", "must be > 0");
        }
        for (j, action) in self.actions.iter().enumerate() {
            let field = |f: &str| at(&format!("actions[{j}].{}.{f}", action.kind()));
            // JSON documents (RPC data, webhook body, published data) are templates at any
            // depth; the other strings are templates themselves.
            let mut documents: Vec<(&str, Value)> = Vec::new();
            let strings: Vec<(&str, String)> = match action {
                Action::Rpc(r) => {
                    if r.agent.is_empty() || r.action.is_empty() {
                        return Err(ConfigError::invalid(field("agent"), "agent and action must be given"));
                    }
                    if r.timeout.is_zero() {
                        return Err(ConfigError::invalid(field("timeout"), "must be > 0"));
                    }
                    documents.push(("data", Value::Object(r.data.clone())));
                    let mut all = Vec::new();
                    for (name, list) in
                        [("identity", &r.identity), ("fact", &r.fact), ("class", &r.class), ("compound", &r.compound)]
                    {
                        all.extend(list.iter().map(|s| (name, s.clone())));
                    }
                    all
                }
                Action::Webhook(w) => {
                    if w.attempts == 0 {
                        return Err(ConfigError::invalid(field("attempts"), "must be > 0"));
                    }
                    w.backoff.validate(&field("backoff"))?;
                    reqwest::Method::from_bytes(w.method.as_bytes())
                        .map_err(|e| ConfigError::invalid(field("method"), &e))?;
                    documents.extend(w.body.clone().map(|b| ("body", b)));
                    let mut all = vec![("url", w.url.clone())];
                    all.extend(w.headers.values().map(|v| ("headers", v.clone())));
                    all
                }
                Action::Command(c) => {
                    if c.run.is_empty() || c.run[0].is_empty() {
                        return Err(ConfigError::invalid(field("run"), "must name a program"));
                    }
                    let mut all: Vec<_> = c.run.iter().map(|s| ("run", s.clone())).collect();
                    all.extend(c.env.values().map(|v| ("env", v.clone())));
                    all
                }
                Action::Publish(p) => {
                    if p.event_type.is_empty() {
                        return Err(ConfigError::invalid(field("type"), "must not be empty"));
                    }
                    documents.extend(p.data.clone().map(|d| ("data", d)));
                    vec![("subject", p.subject.clone())]
                }
            };
            for (name, text) in strings {
                Template::compile(&text).map_err(|e| ConfigError::invalid(field(name), &e))?;
            }
            for (name, document) in documents {
                ValueTemplate::compile(&document).map_err(|e| ConfigError::invalid(field(name), &e))?;
            }
        }
        Ok(())
    }
}
