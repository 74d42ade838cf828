//! Rego policies, as Choria's `rego_policy` authorizer runs them, through `regorus` (a Rego
//! interpreter in Rust, maintained by Microsoft): decisions that look at the request's
//! inputs, such as `shell.run` only for commands matching a pattern.
//!
//! A policy is `<policy dir>/rego/<agent>.rego` (else `rego/default.rego`) in package
//! `io.choria.mcorpc.authpolicy`; the request is allowed when `allow` is `true`. Anything
//! else — undefined, not a boolean, a policy that does not compile, an evaluation error —
//! denies. Rego v1 syntax (`allow if { … }`), as OPA 1.x and Choria today.
//!
//! `input` is Choria's: `agent`, `action`, `callerid`, `collective`, `data` (the request's
//! inputs), `ttl`, `time` (RFC 3339), `facts`, `classes` and `agents` (sorted),
//! `provision_mode`; Chorus adds `identity` (the node) and `filter` (the request's
//! discovery filter, so a policy can refuse unfiltered fleet-wide requests).

use std::sync::Mutex;

use chorus_schemas::RpcRequest;
use serde_json::json;

use super::PolicyDecision;
use crate::NodeContext;

/// The rule every policy must define.
pub const ALLOW_RULE: &str = "data.io.choria.mcorpc.authpolicy.allow";

/// A compiled Rego policy.
pub struct RegoPolicy {
    path: String,
    engine: Mutex<regorus::Engine>,
}

impl RegoPolicy {
    /// Compiles `text`; `path` names the file in decisions and errors.
    pub fn parse(path: &str, text: &str) -> Result<Self, String> {
        let mut engine = regorus::Engine::new();
        engine.add_policy(path.to_string(), text.to_string()).map_err(|e| format!("{path}: {e}"))?;
        Ok(RegoPolicy { path: path.to_string(), engine: Mutex::new(engine) })
    }

    /// The decision for `request` on `node`, whose server has `agents`.
    pub fn decide(&self, request: &RpcRequest, node: &NodeContext, agents: &[String]) -> PolicyDecision {
        let mut classes = node.classes.clone();
        classes.sort();
        let mut agents = agents.to_vec();
        agents.sort();
        let time = chrono::DateTime::from_timestamp(request.time, 0).map(|t| t.to_rfc3339()).unwrap_or_default();
        let input = json!({
            "agent": request.agent,
            "action": request.action,
            "callerid": request.callerid,
            "collective": request.collective,
            "data": request.data,
            "ttl": request.ttl,
            "time": time,
            "facts": node.facts,
            "classes": classes,
            "agents": agents,
            "provision_mode": node.provision_mode,
            "identity": node.identity,
            "filter": request.filter,
        });
        let path = &self.path;
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        engine.set_input(regorus::Value::from(input));
        match engine.eval_rule(ALLOW_RULE.to_string()) {
            Ok(regorus::Value::Bool(true)) => PolicyDecision::allow(format!("allow by {path}")),
            Ok(regorus::Value::Bool(false)) => PolicyDecision::deny(format!("deny by {path}")),
            Ok(regorus::Value::Undefined) => PolicyDecision::deny(format!("deny by {path}: allow is undefined")),
            Ok(other) => PolicyDecision::deny(format!("deny by {path}: allow is not a boolean ({})", clip(&other))),
            Err(e) => PolicyDecision::deny(format!("deny: {path}: evaluation failed: {e}")),
        }
    }
}

impl std::fmt::Debug for RegoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoPolicy").field("path", &self.path).finish_non_exhaustive()
    }
}

fn clip(value: &regorus::Value) -> String {
    let text = value.to_json_str().unwrap_or_default();
    text.chars().take(80).collect()
}

/// Whether a Rego policy's text refers to the caller (so the node must authenticate it).
pub fn names_callers(text: &str) -> bool {
    text.contains("callerid")
}
