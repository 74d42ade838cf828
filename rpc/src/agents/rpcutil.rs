//! `rpcutil`: Choria's node introspection agent.

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};

use super::{string_input, ActionContext, ActionReply, Agent};

/// Choria's `rpcutil` agent: `ping`, `inventory`, `agent_inventory`, `get_fact` and
/// `daemon_stats`, answering from the node's context alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcUtil;

const ACTIONS: [&str; 5] = ["ping", "inventory", "agent_inventory", "get_fact", "daemon_stats"];

fn object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    }
}

#[async_trait]
impl Agent for RpcUtil {
    fn name(&self) -> &str {
        "rpcutil"
    }

    fn actions(&self) -> Vec<String> {
        ACTIONS.iter().map(|a| a.to_string()).collect()
    }

    async fn handle(&self, action: &str, data: &JsonObject, ctx: &ActionContext<'_>) -> ActionReply {
        let node = ctx.node;
        match action {
            "ping" => ActionReply::ok(object(json!({ "pong": chrono::Utc::now().timestamp() }))),
            "inventory" => ActionReply::ok(object(json!({
                "agents": ctx.agents,
                "facts": node.facts,
                "classes": node.classes,
                "version": node.version,
                "main_collective": node.collective,
                "collectives": [node.collective],
                "machines": node.machines,
            }))),
            "agent_inventory" => ActionReply::ok(object(json!({
                "agents": ctx.agents.iter().map(|a| json!({"agent": a, "name": a})).collect::<Vec<_>>(),
            }))),
            "get_fact" => match string_input(data, "fact") {
                Ok(fact) => ActionReply::ok(object(json!({
                    "fact": fact,
                    "value": node.fact(fact).cloned().unwrap_or(Value::Null),
                }))),
                Err(reply) => reply,
            },
            "daemon_stats" => {
                let s = ctx.stats;
                ActionReply::ok(object(json!({
                    "total": s.total,
                    "passed": s.passed,
                    "filtered": s.filtered,
                    "denied": s.denied,
                    "ttlexpired": s.ttl_expired,
                    "replies": s.replies,
                    "malformed": s.malformed,
                    "agents": ctx.agents,
                    "pid": std::process::id(),
                    "starttime": ctx.started,
                    "version": node.version,
                })))
            }
            other => ActionReply::error(StatusCode::UnknownAction, format!("unknown action {other} for agent rpcutil")),
        }
    }
}
