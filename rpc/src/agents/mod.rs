//! RPC agents: named sets of actions a node performs on request.
//!
//! An agent sees only the request's action and inputs plus an [`ActionContext`] describing
//! the node; it never sees the transport, the policy or the event stream, which the server
//! handles uniformly for every agent. One agent value serves every node a server hosts, so
//! agents keep no per-node state.

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::{RpcRequest, StatusCode};

use super::ddl::Ddl;
use super::server::StatsSnapshot;
use super::NodeContext;

mod external;
mod package;
pub mod process;
pub mod provision;
mod rpcutil;
mod service;
mod shell;

pub use external::{ExternalAgent, Loaded};
pub use package::Package;
pub use process::MAX_OUTPUT;
pub use provision::{Enrollee, Enrolment, Provision};
pub use rpcutil::RpcUtil;
pub use service::Service;
pub use shell::Shell;

/// What an action produced: MCORPC's `statuscode`, `statusmsg` and `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionReply {
    /// Result status.
    pub status: StatusCode,
    /// Human-readable status.
    pub message: String,
    /// Outputs.
    pub data: JsonObject,
}

impl ActionReply {
    /// The action ran: status OK with `data`.
    pub fn ok(data: JsonObject) -> Self {
        ActionReply { status: StatusCode::Ok, message: StatusCode::Ok.default_message().into(), data }
    }

    /// The action did not run or failed, with a message saying why.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        ActionReply { status, message: message.into(), data: JsonObject::new() }
    }
}

impl From<(StatusCode, String, JsonObject)> for ActionReply {
    fn from((status, message, data): (StatusCode, String, JsonObject)) -> Self {
        ActionReply { status, message, data }
    }
}

/// What an action may know about where it runs.
#[derive(Debug, Clone, Copy)]
pub struct ActionContext<'a> {
    /// The request being served (caller, request id, ...).
    pub request: &'a RpcRequest,
    /// The node it is served on.
    pub node: &'a NodeContext,
    /// Names of every agent the node has, sorted.
    pub agents: &'a [String],
    /// What the agents' descriptions say of them (name, version, author, ...), by name, for
    /// those that have one.
    pub descriptions: &'a std::collections::BTreeMap<String, crate::ddl::Metadata>,
    /// The node's RPC counters at the time the request arrived.
    pub stats: StatsSnapshot,
    /// When the server hosting the node started, Unix seconds.
    pub started: i64,
}

/// A named set of actions.
#[async_trait]
pub trait Agent: Send + Sync {
    /// The agent's name, as in the broadcast subject and policy file name.
    fn name(&self) -> &str;

    /// The actions it has. Asked once, when the agent is registered with a server;
    /// requests for any other action get `UnknownAction` without reaching
    /// [`Agent::handle`].
    fn actions(&self) -> Vec<String>;

    /// Performs `action` (one of [`Agent::actions`]) with inputs `data`, after the request
    /// was authorized and its inputs checked against [`Agent::ddl`].
    async fn handle(&self, action: &str, data: &JsonObject, ctx: &ActionContext<'_>) -> ActionReply;

    /// The agent's description (Choria's JSON DDL), whose inputs nodes check before
    /// [`Agent::handle`] and clients before sending. `None`: inputs are the agent's business.
    fn ddl(&self) -> Option<&Ddl> {
        None
    }
}

/// The agents built into Chorus, by name.
pub const BUILTIN: [&str; 4] = ["package", "rpcutil", "service", "shell"];

/// The description of a built-in agent, by name: what `chorus rpc` checks inputs against.
pub fn builtin_ddl(agent: &str) -> Option<&'static Ddl> {
    match agent {
        "package" => Some(&PACKAGE_DDL),
        "rpcutil" => Some(&RPCUTIL_DDL),
        "service" => Some(&SERVICE_DDL),
        "shell" => Some(&SHELL_DDL),
        _ => None,
    }
}

static RPCUTIL_DDL: std::sync::LazyLock<Ddl> = std::sync::LazyLock::new(|| {
    Ddl::parse(include_str!("ddl/rpcutil.json")).expect("the built-in rpcutil DDL is valid")
});
static PACKAGE_DDL: std::sync::LazyLock<Ddl> = std::sync::LazyLock::new(|| {
    Ddl::parse(include_str!("ddl/package.json")).expect("the built-in package DDL is valid")
});
static SERVICE_DDL: std::sync::LazyLock<Ddl> = std::sync::LazyLock::new(|| {
    Ddl::parse(include_str!("ddl/service.json")).expect("the built-in service DDL is valid")
});
static SHELL_DDL: std::sync::LazyLock<Ddl> =
    std::sync::LazyLock::new(|| Ddl::parse(include_str!("ddl/shell.json")).expect("the built-in shell DDL is valid"));

/// Reads a required string input, or says why not.
pub(crate) fn string_input<'a>(data: &'a JsonObject, name: &str) -> Result<&'a str, ActionReply> {
    match data.get(name) {
        None | Some(serde_json::Value::Null) => {
            Err(ActionReply::error(StatusCode::MissingData, format!("missing required input {name}")))
        }
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(ActionReply::error(StatusCode::InvalidData, format!("input {name} must be a string"))),
    }
}

/// For tests of agents that run system tools: stand-in executables, made by `scripts` from
/// the directory they live in (where they may keep state), put first on `PATH`. Each test
/// runs in a process of its own (nextest), so changing `PATH` touches no other test.
/// Runs `action` of `agent` with `data` on `node` for `callerid`, as the server would
/// after its checks (policy, inputs): for tests of agents, here and in the crates that
/// write agents (the node's scout agent).
pub async fn handle_as(
    agent: &dyn Agent,
    node: &NodeContext,
    callerid: &str,
    action: &str,
    data: &JsonObject,
) -> ActionReply {
    let request = RpcRequest::new(callerid, "test", node.collective.clone(), agent.name(), action, data.clone());
    let ctx = ActionContext {
        request: &request,
        node,
        agents: &[],
        descriptions: &Default::default(),
        stats: Default::default(),
        started: 0,
    };
    agent.handle(action, data, &ctx).await
}

/// Runs `action` of `agent` with `data` on a bare node (`n1`, no facts, no other agents),
/// as the server would after its checks: for agent tests.
#[cfg(test)]
pub(crate) async fn handle_on_bare_node(agent: &dyn Agent, action: &str, data: &JsonObject) -> ActionReply {
    handle_as(agent, &NodeContext::new("n1", "choria"), "choria=ops", action, data).await
}

#[cfg(test)]
pub(crate) fn stand_ins_on_path(
    scripts: impl Fn(&std::path::Path) -> Vec<(&'static str, String)>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, script) in scripts(dir.path()) {
        let path = dir.path().join(name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let path_var = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    std::env::set_var("PATH", path_var);
    dir
}
