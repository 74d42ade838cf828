//! The provisioner's configuration: the steps run on each node and how it reads, retries
//! and records.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chorus_backbone::{ConsumerConfig, StartPosition};
use chorus_runtime::{Backoff, Config, ConfigError};
use chorus_schemas::lifecycle::LifecycleType;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::subject::{self, validate_token};
use serde::{Deserialize, Serialize};

use super::{PROVISIONED_FILTER, PROVISION_MODE_COMPONENT};

/// One provisioning step: an RPC action run on the node, which must answer OK.
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    #[schemars(with = "Option<String>")]
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

    pub(super) fn label(&self) -> String {
        format!("{}#{}", self.agent, self.action)
    }
}

/// A failed node waits 10 s, then twice as long after each further failure, at most 10 min:
/// provisioning steps talk to nodes that may still be booting.
fn default_backoff() -> Backoff {
    Backoff::doubling(Duration::from_secs(10), Duration::from_secs(600))
}

/// Configuration of the provisioner (YAML or JSON; unknown fields are refused).
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionerConfig {
    /// Durable consumer name on the lifecycle stream; dead letters go to
    /// `chorus.deadletter.<consumer>`.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// The stream the lifecycle events are read from. Unset: `chorus provision` uses the
    /// one that holds the lifecycle subjects on the broker (`CHORUS_LIFECYCLE`, or Choria's
    /// `CHORIA_EVENTS` beside a Choria broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Components whose startup events mean "this node needs provisioning".
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// What to run on each node, in order (after enrolment, when `enrol` is set).
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Enrol nodes: issue each its credential for a key it proved it holds, push the
    /// configuration a helper decides, and restart it into its normal component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrol: Option<super::enrol::EnrolConfig>,
    /// Directory of the provisioner's state (sled).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Collective the nodes are reached in.
    #[serde(default = "default_collective")]
    pub collective: String,
    /// Caller id of the requests (what the nodes' Action Policy sees), on fleets that do not
    /// authenticate callers; with `security` it is the credential's.
    #[serde(default = "default_callerid")]
    pub callerid: String,
    /// The provisioner's key and client credential, and the issuers whose nodes it believes:
    /// requests are signed, and only replies signed by their node count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<chorus_rpc::ClientSecurity>,
    /// Sender id of the requests; this host's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub senderid: Option<String>,
    /// How long to wait for a node's reply to a step without its own `timeout`.
    #[serde(default = "default_step_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub step_timeout: Duration,
    /// Seconds a node accepts a request after it was made.
    #[serde(default = "default_ttl")]
    pub ttl: u64,
    /// Nodes provisioned at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How often failed nodes (whose backoff has passed) and pending nodes are picked up.
    #[serde(default = "default_sweep_interval", with = "humantime_serde")]
    #[schemars(with = "String")]
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
    #[schemars(with = "String")]
    pub fetch_wait: Duration,
    /// Run as one of several instances of which only the elected leader provisions: every
    /// instance reads the stream into its own state (`state_dir`, and a durable consumer
    /// named `<consumer>-<candidate>`), so a standby that takes over knows every node the
    /// leader provisioned. `candidate` must be given, one per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election: Option<chorus_platform::election::ElectionConfig>,
    /// Redelivery of an event not acknowledged after this long.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    #[schemars(with = "String")]
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
    /// The stream the lifecycle events are read from (`CHORUS_LIFECYCLE` unless set).
    pub fn lifecycle_stream(&self) -> &str {
        self.stream.as_deref().unwrap_or(chorus_schemas::subject::CHORUS_LIFECYCLE)
    }

    /// Defaults with these steps.
    pub fn new(steps: Vec<Step>) -> Self {
        ProvisionerConfig {
            consumer: default_consumer(),
            stream: None,
            components: default_components(),
            steps,
            state_dir: default_state_dir(),
            collective: default_collective(),
            callerid: default_callerid(),
            security: None,
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
            election: None,
            enrol: None,
        }
    }

    /// The steps each node goes through: enrolment's first, the configured ones, then
    /// enrolment's restart. A node's progress counts these.
    pub fn effective_steps(&self) -> Vec<Step> {
        let agent = chorus_rpc::agents::provision::AGENT;
        let mut steps = Vec::new();
        if self.enrol.is_some() {
            steps.push(Step::new(agent, super::enrol::ENROL_ACTION));
        }
        steps.extend(self.steps.iter().cloned());
        if self.enrol.as_ref().is_some_and(|e| e.restart) {
            steps.push(Step::new(agent, super::enrol::RESTART_ACTION));
        }
        steps
    }

    /// Reads and validates a YAML (or JSON) file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        chorus_runtime::config::load(path)
    }

    /// Parses and validates YAML (or JSON) text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        chorus_runtime::config::from_text(text)
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
        let name = match self.election.as_ref().and_then(|e| e.candidate.as_deref()) {
            Some(candidate) => format!("{}-{candidate}", self.consumer),
            None => self.consumer.clone(),
        };
        let mut c = ConsumerConfig::new(name).with_start(self.start.clone()).with_ack_wait(self.ack_wait);
        c.filter_subjects = self.filter_subjects();
        c
    }
}

impl Config for ProvisionerConfig {
    /// Rejects settings that cannot work, naming the field.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, m: &str| Err(ConfigError::invalid(field, m));
        let token = |field: &str, value: &str| {
            validate_token("token", value).map_err(|e| ConfigError::invalid(field, &e).with_source(e))
        };
        token("consumer", &self.consumer)?;
        if let Some(election) = &self.election {
            match &election.candidate {
                None => {
                    return bad("election.candidate", "name this instance: each reads the stream with its own consumer")
                }
                Some(c) => token("election.candidate", c)?,
            }
        }
        self.consumer_config().validate().map_err(|e| ConfigError::invalid("consumer", &e).with_source(e))?;
        if self.components.is_empty() {
            return bad("components", "must list at least one component");
        }
        for (i, c) in self.components.iter().enumerate() {
            token(&format!("components[{i}]"), c)?;
        }
        if self.steps.is_empty() && self.enrol.is_none() {
            return bad("steps", "must list at least one step (or enrol nodes)");
        }
        if let Some(enrol) = &self.enrol {
            if enrol.helper.first().is_some_and(String::is_empty) {
                return bad("enrol.helper", "must name a program");
            }
            if enrol.validity < Duration::from_secs(60) {
                return bad("enrol.validity", "must be >= 1m");
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            token(&format!("steps[{i}].agent"), &s.agent)?;
            if s.action.is_empty() || s.action.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return bad(&format!("steps[{i}].action"), &format!("{:?} is not an action name", s.action));
            }
            if s.timeout.is_some_and(|t| t.is_zero()) {
                return bad(&format!("steps[{i}].timeout"), "must be > 0");
            }
        }
        token("collective", &self.collective)?;
        if self.callerid.is_empty() {
            return bad("callerid", "must not be empty");
        }
        if self.senderid.as_deref().is_some_and(str::is_empty) {
            return bad("senderid", "must not be empty");
        }
        if self.step_timeout.is_zero() {
            return bad("step_timeout", "must be > 0");
        }
        if self.ttl == 0 {
            return bad("ttl", "must be > 0");
        }
        if self.concurrency == 0 {
            return bad("concurrency", "must be > 0");
        }
        if self.sweep_interval < Duration::from_millis(100) {
            return bad("sweep_interval", "must be >= 100ms");
        }
        self.backoff.validate("backoff")?;
        token("event_component", &self.event_component)?;
        if let Some(site) = &self.site {
            token("site", site)?;
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return bad("batch_size", "must be 1..=10000");
        }
        if self.fetch_wait.is_zero() {
            return bad("fetch_wait", "must be > 0");
        }
        Ok(())
    }
}
