//! Who may call which action of an agent on which node: Choria's Action Policy and Rego
//! policies, deciding as Choria decides.
//!
//! A policy directory holds `<agent>.policy` files ([`file`]), an optional `groups` file
//! ([`groups`]) and optional Rego policies under `rego/` ([`rego`]). Which authorizer
//! decides is [`PolicySettings::provider`], Choria's `rpcauthprovider`:
//!
//! * `action_policy` (the default): `<agent>.policy`; without one, `<default_name>.policy`
//!   only when `enable_default` is set; without either, deny.
//! * `rego_policy`: `rego/<agent>.rego`, else `rego/default.rego`; without either, deny.
//! * `action_policy_and_rego`: both must allow — the Action Policy says who may call what,
//!   the Rego policy (when there is one for the agent, or a default) constrains the
//!   request's inputs.
//!
//! Files are read again for every request, as Choria does, so an edit (a revoked caller)
//! applies to the very next request; a file is parsed again only when its bytes changed, and
//! a request reaching many hosted nodes reads each file once ([`ActionPolicy::prepare`]).
//!
//! Everything fails closed: no directory, no file, an unreadable file, a hard error in a
//! matching rule or a Rego error all deny, with a reason that names the file and line.
//! Lines that cannot be used are reported once per change ([`Prepared::problems`]) so the
//! server can log and audit them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chorus_schemas::RpcRequest;
use serde::{Deserialize, Serialize};

use super::NodeContext;

pub mod file;
pub mod groups;
pub mod rego;

#[cfg(test)]
mod tests;

pub use file::{PolicyFile, Problem};
pub use groups::Groups;
pub use rego::RegoPolicy;

/// Which authorizer decides (Choria's `rpcauthprovider`).
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// Action Policy files.
    #[default]
    ActionPolicy,
    /// Rego policies alone.
    RegoPolicy,
    /// Action Policy, and the agent's Rego policy (if any) on the request's inputs.
    ActionPolicyAndRego,
}

/// How a node reads its policy directory (Choria's `plugin.actionpolicy.*` settings).
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Which authorizer decides.
    #[serde(default)]
    pub provider: Provider,
    /// Use `<default_name>.policy` for agents without a policy file of their own.
    #[serde(default)]
    pub enable_default: bool,
    /// Base name of the default policy file.
    #[serde(default = "default_name")]
    pub default_name: String,
    /// The decision of a policy file without a `policy default` line when no rule matches.
    /// (As in Choria, it does not allow agents without any policy file.)
    #[serde(default)]
    pub allow_unconfigured: bool,
}

fn default_name() -> String {
    "default".into()
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            provider: Provider::default(),
            enable_default: false,
            default_name: default_name(),
            allow_unconfigured: false,
        }
    }
}

/// The outcome of an authorization, with a reason fit for an audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Whether the request may run.
    pub allowed: bool,
    /// Which file and rule (or absence of either) decided.
    pub reason: String,
}

impl PolicyDecision {
    pub(crate) fn allow(reason: impl Into<String>) -> Self {
        PolicyDecision { allowed: true, reason: reason.into() }
    }

    pub(crate) fn deny(reason: impl Into<String>) -> Self {
        PolicyDecision { allowed: false, reason: reason.into() }
    }
}

/// A file as last read, and what it parsed into.
#[derive(Clone)]
enum Parsed {
    Policy(Arc<PolicyFile>),
    Groups(Arc<Groups>),
    Rego(Result<Arc<RegoPolicy>, String>),
}

/// The policies of a server: a directory (or none) and how to read it. Shared by every node
/// a server hosts; each decision is per node, since rules depend on facts and classes.
pub struct ActionPolicy {
    dir: Option<PathBuf>,
    settings: PolicySettings,
    parsed: Mutex<HashMap<PathBuf, (Vec<u8>, Parsed)>>,
    /// Problems reported, with the parsed file version (its address) they were reported for:
    /// a changed file reports its problems again, an unchanged one does not.
    reported: Mutex<HashMap<String, usize>>,
}

/// What one request is decided with, read once for all the nodes it reaches.
pub struct Prepared {
    ready: Ready,
    problems: Vec<Problem>,
}

enum Ready {
    Deny(String),
    Policy { file: Arc<PolicyFile>, groups: Arc<Groups>, allow_unconfigured: bool, rego: Option<Arc<RegoPolicy>> },
    Rego(Arc<RegoPolicy>),
}

impl Prepared {
    /// The decision for `request` on `node`, whose server has `agents`.
    pub fn decide(&self, request: &RpcRequest, node: &NodeContext, agents: &[String]) -> PolicyDecision {
        match &self.ready {
            Ready::Deny(reason) => PolicyDecision::deny(reason.clone()),
            Ready::Rego(rego) => rego.decide(request, node, agents),
            Ready::Policy { file, groups, allow_unconfigured, rego } => {
                let decision = file.evaluate(&request.callerid, &request.action, node, groups, *allow_unconfigured);
                match rego {
                    Some(rego) if decision.allowed => {
                        let inputs = rego.decide(request, node, agents);
                        if inputs.allowed {
                            PolicyDecision::allow(format!("{}; inputs {}", decision.reason, inputs.reason))
                        } else {
                            inputs
                        }
                    }
                    _ => decision,
                }
            }
        }
    }

    /// Lines of the files read that cannot be used, not reported before.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

/// Reading a file: `None` when it does not exist.
type Read = Option<Result<Parsed, String>>;

impl ActionPolicy {
    /// Policies from `dir` read as `settings` say; `None` denies every request.
    pub fn new(dir: Option<PathBuf>, settings: PolicySettings) -> Self {
        ActionPolicy { dir, settings, parsed: Mutex::new(HashMap::new()), reported: Mutex::new(HashMap::new()) }
    }

    /// The policy directory, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Decides whether `request` may run on `node` (see [`ActionPolicy::prepare`]).
    pub fn authorize(&self, request: &RpcRequest, node: &NodeContext, agents: &[String]) -> PolicyDecision {
        self.prepare(&request.agent).decide(request, node, agents)
    }

    /// Reads what decides requests for `agent`, once per request. Never fails: every
    /// problem becomes a deny.
    pub fn prepare(&self, agent: &str) -> Prepared {
        let ready = self.ready(agent);
        let mut problems = Vec::new();
        if let Ready::Policy { file, groups, .. } = &ready {
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            let file_version = Arc::as_ptr(file) as usize;
            let groups_version = Arc::as_ptr(groups) as usize;
            let versioned = file.problems().iter().map(|p| (p, file_version));
            for (problem, version) in versioned.chain(groups.problems().iter().map(|p| (p, groups_version))) {
                if reported.insert(problem.to_string(), version) != Some(version) {
                    tracing::warn!(%problem, "action policy line cannot be used");
                    problems.push(problem.clone());
                }
            }
        }
        Prepared { ready, problems }
    }

    fn ready(&self, agent: &str) -> Ready {
        let Some(dir) = &self.dir else {
            return Ready::Deny(format!(
                "no policy file for agent {agent}: no policy directory configured (default deny)"
            ));
        };
        // The agent name becomes a file name: never let it leave the directory.
        if agent.is_empty() || agent.starts_with('.') || agent.contains(['/', '\\', '\0']) {
            return Ready::Deny(format!("invalid agent name {agent:?}"));
        }
        let rego = || -> Result<Option<Arc<RegoPolicy>>, String> {
            let rego_dir = dir.join("rego");
            for path in [rego_dir.join(format!("{agent}.rego")), rego_dir.join("default.rego")] {
                match self.read(&path, Kind::Rego) {
                    None => continue,
                    Some(Ok(Parsed::Rego(compiled))) => {
                        return compiled.map(Some).map_err(|e| format!("unusable Rego policy: {e}"));
                    }
                    Some(Ok(_)) => unreachable!("a rego path parses as rego"),
                    Some(Err(e)) => return Err(e),
                }
            }
            Ok(None)
        };
        match self.settings.provider {
            Provider::RegoPolicy => match rego() {
                Ok(Some(policy)) => Ready::Rego(policy),
                Ok(None) => Ready::Deny(format!(
                    "no Rego policy for agent {agent} (neither rego/{agent}.rego nor rego/default.rego in {}; \
                     default deny)",
                    dir.display()
                )),
                Err(e) => Ready::Deny(e),
            },
            provider => {
                let file = match self.policy_file(dir, agent) {
                    Ok(file) => file,
                    Err(reason) => return Ready::Deny(reason),
                };
                let groups = match self.read(&dir.join("groups"), Kind::Groups) {
                    Some(Ok(Parsed::Groups(groups))) => groups,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "cannot read the policy groups file; no groups");
                        Arc::new(Groups::default())
                    }
                    _ => Arc::new(Groups::default()),
                };
                let rego = match provider {
                    Provider::ActionPolicyAndRego => match rego() {
                        Ok(rego) => rego,
                        Err(e) => return Ready::Deny(e),
                    },
                    _ => None,
                };
                Ready::Policy { file, groups, allow_unconfigured: self.settings.allow_unconfigured, rego }
            }
        }
    }

    /// The Action Policy file for `agent`, parsed.
    fn policy_file(&self, dir: &Path, agent: &str) -> Result<Arc<PolicyFile>, String> {
        let agent_path = dir.join(format!("{agent}.policy"));
        let mut tried = vec![agent_path.clone()];
        let mut found = self.read(&agent_path, Kind::Policy);
        if found.is_none() && self.settings.enable_default {
            let default_path = dir.join(format!("{}.policy", self.settings.default_name));
            tried.push(default_path.clone());
            found = self.read(&default_path, Kind::Policy);
        }
        match found {
            Some(Ok(Parsed::Policy(file))) => Ok(file),
            Some(Ok(_)) => unreachable!("a policy path parses as a policy"),
            Some(Err(e)) => Err(format!("unusable policy: {e}")),
            None => {
                let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
                Err(format!("no policy file for agent {agent} ({} not found; default deny)", tried.join(" nor ")))
            }
        }
    }

    /// Reads `path` and parses it, reusing the last parse when the bytes are unchanged.
    fn read(&self, path: &Path, kind: Kind) -> Read {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return Some(Err(format!("reading {}: {e}", path.display()))),
        };
        let mut cache = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, parsed)) = cache.get(path) {
            if *cached == bytes {
                return Some(Ok(parsed.clone()));
            }
        }
        // Choria reads bytes; invalid UTF-8 reads as U+FFFD.
        let text = String::from_utf8_lossy(&bytes);
        let name = path.display().to_string();
        let parsed = match kind {
            Kind::Policy => Parsed::Policy(Arc::new(PolicyFile::parse(path, &text))),
            Kind::Groups => Parsed::Groups(Arc::new(Groups::parse(&name, &text))),
            Kind::Rego => Parsed::Rego(RegoPolicy::parse(&name, &text).map(Arc::new)),
        };
        cache.insert(path.to_path_buf(), (bytes, parsed.clone()));
        Some(Ok(parsed))
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Policy,
    Groups,
    Rego,
}

impl fmt::Debug for ActionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActionPolicy").field("dir", &self.dir).field("settings", &self.settings).finish()
    }
}

/// Where the policies of `dir` first name a caller (`path:line`), if they do: an agent
/// that cannot authenticate callers must not rely on caller ids.
pub fn first_named_caller(dir: &Path) -> Option<String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    if let Ok(rego) = std::fs::read_dir(dir.join("rego")) {
        paths.extend(rego.filter_map(|e| e.ok().map(|e| e.path())));
    }
    paths.sort();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        match path.extension().and_then(|e| e.to_str()) {
            Some("policy") => {
                if let Some(line) = PolicyFile::parse(&path, &text).first_named_caller() {
                    return Some(format!("{}:{line}", path.display()));
                }
            }
            Some("rego") if rego::names_callers(&text) => return Some(path.display().to_string()),
            _ => {}
        }
    }
    None
}
