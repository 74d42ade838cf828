//! External agents: agents written in any language, run through Choria's external-agent
//! protocol (`io.choria.mcorpc.external.v1`), so Choria's external agents run unchanged.
//!
//! An agent is a DDL (`X.json`, with `"provider": "external"`) beside its executable (`X`,
//! or `X/X-linux_amd64` for multi-architecture builds), or both in a directory `X/`. For
//! each request the executable runs with three arguments (request file, reply file,
//! protocol), an environment of only `CHORIA_EXTERNAL_*` and `PATH`, and the node's facts in
//! a file; it writes `{"statuscode", "statusmsg", "data"}` to the reply file. Nodes check the
//! inputs against the DDL before it runs; a program that fails, exits non-zero, writes no
//! valid reply or outlives the DDL's timeout (plus 1.5 s, then its process group is killed)
//! gives an `Aborted` reply saying so. Before an agent is offered, it is asked once whether
//! it activates (`{"activate": true}`, within 2 s).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};

use super::{process, ActionContext, ActionReply, Agent, BUILTIN};
use crate::ddl::Ddl;

const RPC_REQUEST: &str = "io.choria.mcorpc.external.v1.rpc_request";
const ACTIVATION_REQUEST: &str = "io.choria.mcorpc.external.v1.activation_request";
/// Time an agent gets beyond its DDL's timeout before it is killed, as in Choria.
const GRACE: Duration = Duration::from_millis(1500);
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(2);

/// An agent run as an executable.
#[derive(Debug)]
pub struct ExternalAgent {
    ddl: Ddl,
    executable: PathBuf,
    config: PathBuf,
}

/// What loading an agents directory gave: the agents, and why others were left out.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The agents that activated.
    pub agents: Vec<ExternalAgent>,
    /// `(path, reason)` of each DDL not offered as an agent.
    pub skipped: Vec<(PathBuf, String)>,
}

impl ExternalAgent {
    /// Every external agent described in `dir` that activates. Agents named like a
    /// built-in one are refused; DDLs of other providers are not external agents.
    /// `config_dir` holds each agent's configuration as `<agent>.cfg` (`CHORIA_EXTERNAL_CONFIG`).
    pub async fn load_dir(dir: &Path, config_dir: &Path) -> Loaded {
        let mut loaded = Loaded::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                loaded.skipped.push((dir.to_path_buf(), format!("cannot read the agents directory: {e}")));
                return loaded;
            }
        };
        let mut ddls: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| match (p.is_dir(), p.file_name().and_then(|n| n.to_str()).map(str::to_string)) {
                (true, Some(name)) => Some(p.join(format!("{name}.json"))).filter(|d| d.is_file()),
                (false, _) if p.extension().is_some_and(|e| e == "json") => Some(p),
                _ => None,
            })
            .collect();
        ddls.sort();
        for path in ddls {
            match Self::load(&path, config_dir).await {
                Ok(Some(agent)) => loaded.agents.push(agent),
                Ok(None) => {}
                Err(reason) => loaded.skipped.push((path, reason)),
            }
        }
        loaded
    }

    /// The agent described by the DDL at `path`; `None` when the DDL is another provider's.
    async fn load(path: &Path, config_dir: &Path) -> Result<Option<ExternalAgent>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        let ddl = Ddl::parse(&text)?;
        if ddl.metadata.provider.as_deref() != Some("external") {
            return Ok(None);
        }
        let name = ddl.metadata.name.clone();
        if BUILTIN.contains(&name.as_str()) || name == "choria_util" || name == "discovery" {
            return Err(format!("external agents may not be called {name:?} (a built-in agent's name)"));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let executable = [base.join(&name), base.join(&name).join(format!("{name}-linux_{}", go_arch()))]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| format!("no executable {name} beside the DDL"))?;
        let agent = ExternalAgent { config: config_dir.join(format!("{name}.cfg")), ddl, executable };
        let reply = agent
            .execute(ACTIVATION_REQUEST, &json!({"agent": name}), &JsonObject::new(), ACTIVATION_TIMEOUT)
            .await
            .map_err(|e| format!("activation check failed: {e}"))?;
        if reply.get("activate") != Some(&Value::Bool(true)) {
            return Err("the agent did not activate".into());
        }
        Ok(Some(agent))
    }

    /// Runs the executable for one request of `protocol`, returning its reply document.
    async fn execute(
        &self,
        protocol: &str,
        request: &Value,
        facts: &JsonObject,
        timeout: Duration,
    ) -> Result<JsonObject, String> {
        let dir = std::env::temp_dir();
        let id = uuid::Uuid::new_v4().simple();
        let files =
            [dir.join(format!("request-{id}")), dir.join(format!("reply-{id}")), dir.join(format!("facts-{id}"))];
        let [request_file, reply_file, facts_file] = &files;
        let mut document = request.as_object().cloned().unwrap_or_default();
        document.insert(
            "$schema".into(),
            format!("https://choria.io/schemas/mcorpc/external/v1/{}.json", schema_name(protocol)).into(),
        );
        document.insert("protocol".into(), protocol.into());
        let result = async {
            let write = |path: &Path, bytes: Vec<u8>| {
                std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
            };
            write(request_file, serde_json::to_vec(&document).map_err(|e| e.to_string())?)?;
            write(reply_file, Vec::new())?;
            write(facts_file, serde_json::to_vec(facts).map_err(|e| e.to_string())?)?;
            let mut command = tokio::process::Command::new(&self.executable);
            command
                .arg(request_file)
                .arg(reply_file)
                .arg(protocol)
                .env_clear()
                .env("CHORIA_EXTERNAL_REQUEST", request_file)
                .env("CHORIA_EXTERNAL_REPLY", reply_file)
                .env("CHORIA_EXTERNAL_PROTOCOL", protocol)
                .env("CHORIA_EXTERNAL_CONFIG", &self.config)
                .env("CHORIA_EXTERNAL_FACTS", facts_file)
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .current_dir(&dir);
            let name = self.executable.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let finished = process::run(command, timeout).await.map_err(|e| format!("executing {name} failed: {e}"))?;
            for line in String::from_utf8_lossy(&finished.stderr.bytes).lines() {
                tracing::warn!(agent = %self.ddl.metadata.name, "{line}");
            }
            if finished.timed_out {
                return Err(format!("executing {name} failed: killed after {}s", timeout.as_secs_f64()));
            }
            if finished.exit_code() != 0 {
                return Err(format!("executing {name} failed: exit status {}", finished.exit_code()));
            }
            let reply = std::fs::read(reply_file).map_err(|e| format!("cannot read the reply: {e}"))?;
            match serde_json::from_slice(&reply) {
                Ok(Value::Object(reply)) => Ok(reply),
                Ok(_) => Err("failed to decode reply json: not an object".to_string()),
                Err(e) => Err(format!("failed to decode reply json: {e}")),
            }
        }
        .await;
        for file in &files {
            std::fs::remove_file(file).ok();
        }
        result
    }
}

fn schema_name(protocol: &str) -> &str {
    protocol.rsplit('.').next().unwrap_or(protocol)
}

/// The machine's architecture as Go names it, for multi-architecture executables.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

#[async_trait]
impl Agent for ExternalAgent {
    fn name(&self) -> &str {
        &self.ddl.metadata.name
    }

    fn actions(&self) -> Vec<String> {
        self.ddl.actions.iter().map(|a| a.action.clone()).collect()
    }

    fn ddl(&self) -> Option<&Ddl> {
        Some(&self.ddl)
    }

    async fn handle(&self, action: &str, data: &JsonObject, ctx: &ActionContext<'_>) -> ActionReply {
        let r = ctx.request;
        let request = json!({
            "agent": self.name(), "action": action, "requestid": r.requestid, "senderid": r.senderid,
            "callerid": r.callerid, "collective": r.collective, "ttl": r.ttl, "msgtime": r.time, "data": data,
        });
        let seconds = if self.ddl.metadata.timeout == 0 { 10 } else { self.ddl.metadata.timeout };
        let timeout = Duration::from_secs(seconds) + GRACE;
        let reply = match self.execute(RPC_REQUEST, &request, &ctx.node.facts, timeout).await {
            Ok(reply) => reply,
            Err(e) => {
                let message = format!("Could not call external agent {}#{action}: {e}", self.name());
                return ActionReply::error(StatusCode::Aborted, message);
            }
        };
        let status = match reply.get("statuscode").map(Value::as_u64) {
            None => Some(StatusCode::Ok),
            Some(code) => code.and_then(StatusCode::from_code),
        };
        let Some(status) = status else {
            return ActionReply::error(
                StatusCode::Aborted,
                format!("{}#{action} replied with an invalid statuscode", self.name()),
            );
        };
        let mut data = match reply.get("data") {
            None | Some(Value::Null) => JsonObject::new(),
            Some(Value::Object(data)) => data.clone(),
            Some(_) => {
                return ActionReply::error(
                    StatusCode::Aborted,
                    "Could not set reply defaults: reply data is in the wrong format",
                )
            }
        };
        // Outputs the agent left out get their DDL defaults.
        if let Some(described) = self.ddl.action(action) {
            for (name, output) in &described.output {
                if let Some(default) = output.default.as_ref().filter(|d| !d.is_null()) {
                    data.entry(name.clone()).or_insert_with(|| default.clone());
                }
            }
        }
        let message = reply.get("statusmsg").and_then(Value::as_str).map(str::to_string);
        ActionReply { status, message: message.unwrap_or_else(|| status.default_message().into()), data }
    }
}
