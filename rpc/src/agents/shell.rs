//! `shell`: run a command with `sh -c`.
//!
//! Dangerous by design — it is remote code execution as the node agent's user — and
//! therefore only reachable through an Action Policy that allows it; with no policy it is
//! denied like everything else.

use std::time::Duration;

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};

use super::{process, string_input, ActionContext, ActionReply, Agent};

/// Timeout when the request gives none.
const DEFAULT_TIMEOUT: u64 = 60;
/// Longest timeout a request may ask for.
const MAX_TIMEOUT: u64 = 3600;

/// The `shell` agent with its one action, `run`: inputs `command` (string) and
/// `timeout_secs` (1..=3600, default 60); outputs `stdout`, `stderr`, `exitcode`,
/// `timed_out` and `truncated`.
///
/// The command runs in its own process group, and on timeout the whole group is killed, so
/// `sh -c 'sleep 1000 & wait'` does not leave `sleep` behind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shell;

#[async_trait]
impl Agent for Shell {
    fn name(&self) -> &str {
        "shell"
    }

    fn ddl(&self) -> Option<&crate::ddl::Ddl> {
        super::builtin_ddl("shell")
    }

    fn actions(&self) -> Vec<String> {
        vec!["run".into()]
    }

    async fn handle(&self, action: &str, data: &JsonObject, _ctx: &ActionContext<'_>) -> ActionReply {
        if action != "run" {
            return ActionReply::error(StatusCode::UnknownAction, format!("unknown action {action} for agent shell"));
        }
        let command = match string_input(data, "command") {
            Ok(c) => c,
            Err(reply) => return reply,
        };
        let timeout = match data.get("timeout_secs") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(v) => match v.as_u64() {
                Some(t) if (1..=MAX_TIMEOUT).contains(&t) => t,
                _ => {
                    return ActionReply::error(
                        StatusCode::InvalidData,
                        format!("timeout_secs must be an integer from 1 to {MAX_TIMEOUT}"),
                    )
                }
            },
        };
        run(command, Duration::from_secs(timeout)).await
    }
}

async fn run(command: &str, timeout: Duration) -> ActionReply {
    let mut sh = tokio::process::Command::new("sh");
    sh.arg("-c").arg(command);
    let finished = match process::run(sh, timeout).await {
        Ok(finished) => finished,
        Err(e) => return ActionReply::error(StatusCode::UnknownError, format!("cannot start sh: {e}")),
    };
    let data = match json!({
        "stdout": String::from_utf8_lossy(&finished.stdout.bytes),
        "stderr": String::from_utf8_lossy(&finished.stderr.bytes),
        "exitcode": finished.exit_code(),
        "timed_out": finished.timed_out,
        "truncated": finished.stdout.truncated || finished.stderr.truncated,
    }) {
        Value::Object(map) => map,
        _ => unreachable!("json! object literal"),
    };
    if finished.timed_out {
        ActionReply {
            status: StatusCode::Aborted,
            message: format!("command timed out after {}s", timeout.as_secs()),
            data,
        }
    } else {
        ActionReply::ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_commands_and_reports_exit_codes() {
        let r = run("echo out; echo err >&2; exit 3", Duration::from_secs(10)).await;
        assert_eq!(r.status, StatusCode::Ok);
        assert_eq!(r.data["stdout"], "out\n");
        assert_eq!(r.data["stderr"], "err\n");
        assert_eq!(r.data["exitcode"], 3);
        assert_eq!(r.data["timed_out"], false);
    }

    #[tokio::test]
    async fn timeouts_kill_the_whole_process_group() {
        let started = std::time::Instant::now();
        let r = run("echo before; sleep 30 & sleep 30", Duration::from_secs(1)).await;
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert_eq!(r.status, StatusCode::Aborted);
        assert_eq!(r.data["timed_out"], true);
        assert_eq!(r.data["stdout"], "before\n");
        // A finished command whose background child holds stdout also meets the deadline.
        let started = std::time::Instant::now();
        let r = run("sleep 30 &", Duration::from_secs(1)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(r.data["timed_out"], true);
    }

    #[tokio::test]
    async fn output_is_capped() {
        let r = run("head -c 300000 /dev/zero", Duration::from_secs(10)).await;
        assert_eq!(r.data["stdout"].as_str().unwrap().len(), super::super::MAX_OUTPUT);
        assert_eq!(r.data["truncated"], true);
    }
}
