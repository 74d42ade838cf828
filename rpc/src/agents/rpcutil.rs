//! `rpcutil`: Choria's node introspection agent.

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};

use super::{string_input, ActionContext, ActionReply, Agent};

/// Choria's `rpcutil` agent, every action of its DDL (`agent_inventory`, `collective_info`,
/// `daemon_stats`, `get_config_item`, `get_data`, `get_fact`, `get_facts`, `inventory`,
/// `ping`) with the output names Choria's tools read, answering from the node's context.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcUtil;

const ACTIONS: [&str; 9] = [
    "agent_inventory",
    "collective_info",
    "daemon_stats",
    "get_config_item",
    "get_data",
    "get_fact",
    "get_facts",
    "inventory",
    "ping",
];

/// The node's configuration items `get_config_item` knows, by Choria's names.
fn config_item(node: &crate::NodeContext, item: &str) -> Option<Value> {
    Some(match item {
        "identity" => json!(node.identity),
        "main_collective" => json!(node.collective),
        "collectives" => json!([node.collective]),
        "version" => json!(node.version),
        "plugin.choria.server.provision" | "provision_mode" => json!(node.provision_mode),
        _ => return None,
    })
}

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

    fn ddl(&self) -> Option<&crate::ddl::Ddl> {
        super::builtin_ddl("rpcutil")
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
                // Chorus has no data plugins, and upgrades come from packages.
                "data_plugins": [],
                "upgradable": false,
            }))),
            "collective_info" => ActionReply::ok(object(json!({
                "main_collective": node.collective,
                "collectives": [node.collective],
            }))),
            "get_config_item" => match string_input(data, "item") {
                Ok(item) => match config_item(node, item) {
                    Some(value) => ActionReply::ok(object(json!({ "item": item, "value": value }))),
                    None => ActionReply::error(StatusCode::Aborted, "Unknown key"),
                },
                Err(reply) => reply,
            },
            "get_data" => match string_input(data, "source") {
                Ok(_) => ActionReply::error(StatusCode::Aborted, "Unknown data plugin"),
                Err(reply) => reply,
            },
            // The DDL's validation has checked the list (fact names, comma-separated).
            "get_facts" => match string_input(data, "facts") {
                Ok(text) => {
                    let values: JsonObject = text
                        .split(',')
                        .map(str::trim)
                        .map(|n| (n.to_string(), node.fact(n).cloned().unwrap_or(Value::Null)))
                        .collect();
                    ActionReply::ok(object(json!({ "values": values })))
                }
                Err(reply) => reply,
            },
            // Each agent's description flattened with its name, as Choria sends them; an agent
            // without a description is listed by name only.
            "agent_inventory" => ActionReply::ok(object(json!({
                "agents": ctx
                    .agents
                    .iter()
                    .map(|a| {
                        let mut item = ctx
                            .descriptions
                            .get(a)
                            .and_then(|m| serde_json::to_value(m).ok())
                            .and_then(|v| v.as_object().cloned())
                            .unwrap_or_else(|| object(json!({ "name": a })));
                        item.insert("agent".into(), json!(a));
                        Value::Object(item)
                    })
                    .collect::<Vec<_>>(),
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
                    // Choria's names: requests that decoded as requests, and those that did not.
                    "validated": s.total,
                    "unvalidated": s.malformed,
                    "agents": ctx.agents,
                    "pid": std::process::id(),
                    "starttime": ctx.started,
                    "version": node.version,
                    "threads": [format!(
                        "Chorus {} with {} worker threads",
                        env!("CARGO_PKG_VERSION"),
                        std::thread::available_parallelism().map_or(1, |n| n.get())
                    )],
                    "times": {"cstime": 0, "cutime": 0, "stime": 0, "utime": 0},
                    "configfile": "",
                    "events": 0,
                })))
            }
            other => ActionReply::error(StatusCode::UnknownAction, format!("unknown action {other} for agent rpcutil")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeContext;
    use chorus_schemas::RpcRequest;

    async fn call(action: &str, data: Value) -> ActionReply {
        let mut node = NodeContext::new("n1.example.net", "choria");
        node.facts = object(json!({"country": "uk", "os": {"family": "debian"}}));
        let request = RpcRequest::new("choria=ops", "ops", "choria", "rpcutil", action, object(data.clone()));
        let agents = vec!["rpcutil".to_string()];
        let descriptions = [("rpcutil".to_string(), RpcUtil.ddl().unwrap().metadata.clone())].into_iter().collect();
        let ctx = ActionContext {
            request: &request,
            node: &node,
            agents: &agents,
            descriptions: &descriptions,
            stats: Default::default(),
            started: 1,
        };
        RpcUtil.handle(action, &object(data), &ctx).await
    }

    fn keys(reply: &ActionReply) -> Vec<&str> {
        let mut keys: Vec<&str> = reply.data.keys().map(String::as_str).collect();
        keys.sort();
        keys
    }

    /// Every action of Choria's rpcutil DDL, with the outputs its DDL declares.
    #[tokio::test]
    async fn every_action_of_the_rpcutil_ddl_answers_with_its_outputs() {
        assert_eq!(RpcUtil.actions(), ACTIONS.map(String::from));
        assert_eq!(keys(&call("collective_info", json!({})).await), ["collectives", "main_collective"]);
        let inventory = call("inventory", json!({})).await;
        for key in [
            "agents",
            "classes",
            "collectives",
            "data_plugins",
            "facts",
            "machines",
            "main_collective",
            "upgradable",
            "version",
        ] {
            assert!(inventory.data.contains_key(key), "inventory lacks {key}: {:?}", keys(&inventory));
        }
        let inventory = call("agent_inventory", json!({})).await;
        let rpcutil = &inventory.data["agents"][0];
        assert_eq!((&rpcutil["agent"], &rpcutil["name"]), (&json!("rpcutil"), &json!("rpcutil")));
        for key in ["author", "description", "license", "timeout", "url", "version"] {
            assert!(rpcutil.get(key).is_some(), "agent_inventory lacks {key}: {rpcutil}");
        }
        let stats = call("daemon_stats", json!({})).await;
        for key in [
            "agents",
            "configfile",
            "events",
            "filtered",
            "passed",
            "pid",
            "replies",
            "starttime",
            "threads",
            "times",
            "total",
            "ttlexpired",
            "unvalidated",
            "validated",
            "version",
        ] {
            assert!(stats.data.contains_key(key), "daemon_stats lacks {key}");
        }
        let facts = call("get_facts", json!({"facts": "country, os.family,missing"})).await;
        assert_eq!(facts.data["values"], json!({"country": "uk", "os.family": "debian", "missing": null}));
        let get_facts = RpcUtil.ddl().unwrap().action("get_facts").unwrap();
        let refused = get_facts.validate(json!({"facts": "country;rm -rf"}).as_object().unwrap()).unwrap_err();
        assert_eq!(refused.0, StatusCode::InvalidData, "{refused:?}");
        assert_eq!(call("get_facts", json!({})).await.status, StatusCode::MissingData);
        let item = call("get_config_item", json!({"item": "main_collective"})).await;
        assert_eq!(
            (item.data["item"].as_str(), item.data["value"].as_str()),
            (Some("main_collective"), Some("choria"))
        );
        let unknown = call("get_config_item", json!({"item": "plugin.nope"})).await;
        assert_eq!((unknown.status, unknown.message.as_str()), (StatusCode::Aborted, "Unknown key"));
        let data = call("get_data", json!({"source": "sysctl"})).await;
        assert_eq!((data.status, data.message.as_str()), (StatusCode::Aborted, "Unknown data plugin"));
    }
}
