//! Registration: every node tells the fleet what it is (facts, classes, agents with their
//! versions, collectives, version, machines) in Choria's `inventorycontent` format, so the
//! inventory can answer discovery without asking the nodes.
//!
//! A node publishes after a random splay at start (a fleet restarting together does not
//! publish in one burst), whenever its facts or agents change (facts re-read every
//! `check_interval` from the fact file and command), and every `interval` regardless, so a view that lost a message
//! converges. Choria republishes only on its interval; publishing on change is what lets
//! inventory discovery be trusted minutes, not an interval, after a fact changes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_rpc::agents::process;
use chorus_rpc::RpcServer;
use chorus_runtime::Shutdown;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lifecycle::random_splay;

/// When a node publishes its registration (`registration:` in the agent's configuration).
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// Publish registrations at all.
    pub enabled: bool,
    /// Republish this often even when nothing changed (Choria's `registerinterval`, 300 s).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// Longest random delay before the first publication.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub splay: Duration,
    /// How often the fact file and command are read again to notice a change.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub check_interval: Duration,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            enabled: true,
            interval: Duration::from_secs(300),
            splay: Duration::from_secs(5),
            check_interval: Duration::from_secs(30),
        }
    }
}

/// Where a node's facts come from: inline facts, overlaid by a file's, overlaid by a
/// command's (each a shallow merge, later keys winning, as Choria merges fact files).
#[derive(Clone, Debug, Default)]
pub struct FactSources {
    /// Facts written in the configuration.
    pub inline: Map<String, Value>,
    /// A YAML or JSON file holding one object.
    pub file: Option<PathBuf>,
    /// A program (and its arguments) printing one JSON object.
    pub command: Option<Vec<String>>,
}

/// Longest a fact command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl FactSources {
    /// Whether facts can change while the node runs (a file or a command is configured).
    pub fn is_dynamic(&self) -> bool {
        self.file.is_some() || self.command.is_some()
    }

    /// Reads every source and merges them. An unreadable source is an error naming it: a
    /// node that silently lost its facts would drop out of every fact filter.
    pub async fn read(&self) -> Result<Map<String, Value>, String> {
        let mut facts = self.inline.clone();
        if let Some(path) = &self.file {
            let text =
                tokio::fs::read_to_string(path).await.map_err(|e| format!("fact file {}: {e}", path.display()))?;
            let value: Value = serde_yaml::from_str(&text).map_err(|e| format!("fact file {}: {e}", path.display()))?;
            facts.extend(object(value).map_err(|e| format!("fact file {}: {e}", path.display()))?);
        }
        if let Some(argv) = &self.command {
            let (program, args) = argv.split_first().ok_or("fact command: empty")?;
            let mut command = tokio::process::Command::new(program);
            command.args(args);
            let finished = process::run(command, COMMAND_TIMEOUT)
                .await
                .map_err(|e| format!("fact command {program}: cannot start: {e}"))?;
            let why = if finished.timed_out {
                Some(format!("still running after {COMMAND_TIMEOUT:?}"))
            } else if finished.exit_code() != 0 {
                Some(format!(
                    "exit code {}: {}",
                    finished.exit_code(),
                    String::from_utf8_lossy(&finished.stderr.bytes).trim()
                ))
            } else if finished.stdout.truncated {
                Some(format!("more than {} bytes of output", process::MAX_OUTPUT))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(format!("fact command {program}: {why}"));
            }
            let value: Value = serde_json::from_slice(&finished.stdout.bytes)
                .map_err(|e| format!("fact command {program}: output is not JSON: {e}"))?;
            facts.extend(object(value).map_err(|e| format!("fact command {program}: {e}"))?);
        }
        Ok(facts)
    }
}

fn object(value: Value) -> Result<Map<String, Value>, String> {
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        other => Err(format!("expected an object of facts, got {}", kind(&other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// What a node's registration loop has done, for its health.
#[derive(Debug, Default)]
pub struct RegistrationStatus {
    published: std::sync::atomic::AtomicU64,
    problem: Mutex<Option<String>>,
}

impl RegistrationStatus {
    /// Registrations published so far.
    pub fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the last attempt to read facts or publish failed, until one succeeds.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        let mut current = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        if *current != problem {
            match &problem {
                Some(p) => tracing::warn!("registration: {p}"),
                None => tracing::info!("registration: recovered"),
            }
            *current = problem;
        }
    }
}

/// One hosted node's registration loop: what it publishes and where its facts come from.
pub struct Registrar {
    /// The server hosting the node.
    pub server: Arc<RpcServer>,
    /// The node's collective.
    pub collective: String,
    /// The node's identity.
    pub identity: String,
    /// Where its facts come from.
    pub sources: FactSources,
    /// When it publishes.
    pub config: RegistrationConfig,
    /// What the loop has done, for health.
    pub status: Arc<RegistrationStatus>,
}

impl Registrar {
    /// Publishes the node's registration until `shutdown`: after a splay, on a change of its
    /// facts or agents, and every interval. Fact changes are applied to the node's context
    /// first, so requests filter on the facts its registration announces. `read_at_start`
    /// says the node was started with facts just read from the sources, so they are read
    /// again only at the next check (a fact command such as facter can take seconds).
    pub async fn run(self, read_at_start: bool, shutdown: Shutdown) {
        let Registrar { server, collective, identity, sources, config, status } = self;
        tokio::select! {
            _ = tokio::time::sleep(random_splay(config.splay)) => {}
            _ = shutdown.requested() => return,
        }
        let mut republish = tokio::time::interval(config.interval);
        let mut check = tokio::time::interval(config.check_interval.max(Duration::from_millis(100)));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        republish.tick().await;
        let mut publish = true;
        let mut publish_problem: Option<String> = None;
        let mut agents = server.agents();
        let mut read_facts = !read_at_start;
        loop {
            let mut read_problem = None;
            // External agents added or removed while the node runs change what it is.
            let now = server.agents();
            if now != agents {
                agents = now;
                publish = true;
            }
            if sources.is_dynamic() && std::mem::replace(&mut read_facts, true) {
                match sources.read().await {
                    Ok(facts) => {
                        if let Some(mut ctx) = server.node(&collective, &identity).filter(|c| c.facts != facts) {
                            ctx.facts = facts;
                            match server.update_node(ctx) {
                                Ok(()) => publish = true,
                                Err(e) => read_problem = Some(e.to_string()),
                            }
                        }
                    }
                    Err(e) => read_problem = Some(e),
                }
            }
            if publish {
                match server.register(&collective, &identity).await {
                    Ok(_) => {
                        status.published.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        republish.reset();
                        publish = false;
                        publish_problem = None;
                    }
                    // Retried at the next check.
                    Err(e) => publish_problem = Some(format!("not published: {e}")),
                }
            }
            status.set_problem(read_problem.or_else(|| publish_problem.clone()));
            tokio::select! {
                _ = republish.tick() => publish = true,
                _ = check.tick() => {}
                _ = shutdown.requested() => return,
            }
        }
    }
}

/// Publishes the registration of every node `server` hosts in `collective` (a simulated
/// fleet's start), returning how many were published.
pub async fn register_all(
    server: &RpcServer,
    collective: &str,
    identities: impl IntoIterator<Item = impl AsRef<str>>,
) -> Result<usize, chorus_platform::PlatformError> {
    let mut n = 0;
    for identity in identities {
        if server.register(collective, identity.as_ref()).await?.is_some() {
            n += 1;
        }
    }
    Ok(n)
}
