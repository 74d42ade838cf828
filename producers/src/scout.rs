//! `scout`: Choria's Scout agent over the node's checks (its machines), so
//! `chorus scout trigger|maintenance|resume|status` (and Choria's `choria scout`) act on a
//! Chorus node as on a Choria one.
//!
//! * `checks`: every machine with its state and version.
//! * `trigger`, `maintenance`, `resume` (`checks`: names, all when empty): fire
//!   `FORCE_CHECK`, `MAINTENANCE` or `RESUME` on each; the reply lists what `transitioned`,
//!   what `failed` (the transition is not valid in the machine's state) and what was
//!   `skipped` (not asked for).

use async_trait::async_trait;
use chorus_rpc::{ActionContext, ActionReply, Agent};
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};

use crate::machine::MachineRemote;

/// The `scout` agent.
pub struct Scout {
    machines: Vec<MachineRemote>,
}

impl Scout {
    /// Scout over these machines.
    pub fn new(machines: Vec<MachineRemote>) -> Self {
        Scout { machines }
    }

    async fn fire(&self, transition: &str, data: &JsonObject) -> ActionReply {
        let wanted: Vec<String> = match data.get("checks") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            Some(Value::String(s)) => s.split(',').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect(),
            Some(_) => return ActionReply::error(StatusCode::InvalidData, "checks must be a list of check names"),
        };
        let (mut transitioned, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for m in &self.machines {
            let name = &m.instance().machine;
            if !wanted.is_empty() && !wanted.contains(name) {
                skipped.push(name.clone());
                continue;
            }
            match m.transition(transition).await {
                Ok(_) => transitioned.push(name.clone()),
                Err(_) => failed.push(name.clone()),
            }
        }
        let unknown: Vec<&String> =
            wanted.iter().filter(|w| !self.machines.iter().any(|m| &m.instance().machine == *w)).collect();
        let data = json!({"transitioned": transitioned, "failed": failed, "skipped": skipped, "unknown": unknown});
        ActionReply::ok(data.as_object().cloned().unwrap_or_default())
    }
}

#[async_trait]
impl Agent for Scout {
    fn name(&self) -> &str {
        "scout"
    }

    fn actions(&self) -> Vec<String> {
        ["checks", "maintenance", "resume", "trigger"].map(String::from).to_vec()
    }

    async fn handle(&self, action: &str, data: &JsonObject, _ctx: &ActionContext<'_>) -> ActionReply {
        match action {
            "checks" => {
                let checks: Vec<Value> = self
                    .machines
                    .iter()
                    .map(|m| json!({"name": m.instance().machine, "state": m.state(), "version": m.instance().version}))
                    .collect();
                ActionReply::ok(json!({"checks": checks}).as_object().cloned().unwrap_or_default())
            }
            "trigger" => self.fire("FORCE_CHECK", data).await,
            "maintenance" => self.fire("MAINTENANCE", data).await,
            "resume" => self.fire("RESUME", data).await,
            other => ActionReply::error(StatusCode::UnknownAction, format!("unknown action {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Machine, Manifest};
    use chorus_platform::{Emitter, MemorySink};
    use chorus_runtime::Shutdown;
    use std::sync::Arc;

    const CHECK: &str = r#"
name: check_disk
version: 1.0.0
initial_state: OK
transitions:
  - {name: FORCE_CHECK, from: [OK], destination: FORCE_CHECK}
  - {name: MAINTENANCE, from: [OK, FORCE_CHECK], destination: MAINTENANCE}
  - {name: RESUME, from: [MAINTENANCE], destination: OK}
watchers:
  - {name: t, type: timer, state_match: [FORCE_CHECK], fail_transition: RESUME, properties: {timer: 1h}}
"#;

    async fn call(agent: &Scout, action: &str, data: Value) -> ActionReply {
        let node = chorus_rpc::NodeContext::new("n1", "choria");
        let data = data.as_object().cloned().unwrap_or_default();
        chorus_rpc::agents::handle_as(agent, &node, "choria=ops", action, &data).await
    }

    #[tokio::test]
    async fn scout_lists_and_moves_the_nodes_checks() {
        let dir = tempfile::tempdir().unwrap();
        let emitter = Arc::new(Emitter::new(Arc::new(MemorySink::default()), 1, None));
        let m = Machine::start(Manifest::from_yaml(CHECK).unwrap(), "n1", dir.path().into(), emitter, Shutdown::new())
            .unwrap();
        let scout = Scout::new(vec![m.remote()]);
        let checks = call(&scout, "checks", json!({})).await;
        assert_eq!(checks.data["checks"][0]["state"], "OK");
        let r = call(&scout, "maintenance", json!({"checks": ["check_disk", "nope"]})).await;
        assert_eq!(
            (r.data["transitioned"].clone(), r.data["unknown"].clone()),
            (json!(["check_disk"]), json!(["nope"]))
        );
        assert_eq!(m.state(), "MAINTENANCE");
        let r = call(&scout, "trigger", json!({})).await;
        assert_eq!(r.data["failed"], json!(["check_disk"]), "no forced check in maintenance");
        call(&scout, "resume", json!({})).await;
        assert_eq!(m.state(), "OK");
        let r = call(&scout, "trigger", json!({"checks": ["other"]})).await;
        assert_eq!(r.data["skipped"], json!(["check_disk"]));
    }
}
