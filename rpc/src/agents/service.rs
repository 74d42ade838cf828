//! `service`: Choria's service agent (`status`, `start`, `stop`, `restart`) with its DDL,
//! driving systemd through `systemctl` as found on `PATH`.
//!
//! `status` is `running` when `systemctl is-active` says `active`, `stopped` when it says
//! `inactive`, `failed`, `activating` or `deactivating`; anything else is an error. Starting
//! a running service or stopping a stopped one fails as in Choria, with the status in the
//! reply. One `systemctl` call at a time per process.

use std::time::Duration;

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::json;

use super::{process, string_input, ActionContext, ActionReply, Agent};

/// How long one `systemctl` call may take.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(50);

static SYSTEMCTL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The `service` agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Service;

/// `systemctl <verb> --system <service>`: its exit code, stdout and stderr.
async fn systemctl(verb: &str, service: &str) -> Result<(i32, String, String), String> {
    let mut command = tokio::process::Command::new("systemctl");
    command.args([verb, "--system", "--", service]);
    let finished = process::run(command, SYSTEMCTL_TIMEOUT).await.map_err(|e| format!("cannot run systemctl: {e}"))?;
    if finished.timed_out {
        return Err(format!("systemctl {verb} {service} did not finish within {}s", SYSTEMCTL_TIMEOUT.as_secs()));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    Ok((finished.exit_code(), text(&finished.stdout.bytes), text(&finished.stderr.bytes)))
}

/// `running` or `stopped`, as `systemctl is-active` says.
async fn status(service: &str) -> Result<&'static str, String> {
    let (_, out, err) = systemctl("is-active", service).await?;
    match out.as_str() {
        "active" | "reloading" => Ok("running"),
        "inactive" | "failed" | "activating" | "deactivating" => Ok("stopped"),
        other => Err(format!("cannot tell the status of {service:?}: systemctl says {other:?} {err}")),
    }
}

fn with_status(status: StatusCode, message: String, state: &str) -> ActionReply {
    let data = json!({ "status": state }).as_object().cloned().unwrap_or_default();
    ActionReply { status, message, data }
}

#[async_trait]
impl Agent for Service {
    fn name(&self) -> &str {
        "service"
    }

    fn ddl(&self) -> Option<&crate::ddl::Ddl> {
        super::builtin_ddl("service")
    }

    fn actions(&self) -> Vec<String> {
        ["restart", "start", "status", "stop"].map(String::from).to_vec()
    }

    async fn handle(&self, action: &str, data: &JsonObject, _ctx: &ActionContext<'_>) -> ActionReply {
        let service = match string_input(data, "service") {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        let _one_at_a_time = SYSTEMCTL.lock().await;
        let before = match status(service).await {
            Ok(s) => s,
            Err(e) => return ActionReply::error(StatusCode::Aborted, e),
        };
        match (action, before) {
            ("status", state) => return with_status(StatusCode::Ok, "OK".into(), state),
            ("start", "running") => {
                let message = format!("Could not start '{service}': Service is already running");
                return with_status(StatusCode::Aborted, message, "running");
            }
            ("stop", "stopped") => {
                let message = format!("Could not stop '{service}': Service is already stopped");
                return with_status(StatusCode::Aborted, message, "stopped");
            }
            _ => {}
        }
        let outcome = systemctl(action, service).await;
        let after = match status(service).await {
            Ok(s) => s,
            Err(e) => return ActionReply::error(StatusCode::Aborted, e),
        };
        match outcome {
            Ok((0, _, _)) => with_status(StatusCode::Ok, "OK".into(), after),
            Ok((code, _, err)) => {
                with_status(StatusCode::Aborted, format!("Could not {action} '{service}': {err} (exit {code})"), after)
            }
            Err(e) => with_status(StatusCode::Aborted, e, after),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in `systemctl`, first on PATH: services are files in a directory, running
    /// when the file says so; `broken` cannot be started.
    fn stand_in() -> tempfile::TempDir {
        super::super::stand_ins_on_path(|dir| {
            let script = format!(
                r#"#!/bin/sh
verb="$1"; svc="$4"; state="{dir}/$svc"
case "$verb" in
  is-active) if [ "$(cat "$state" 2>/dev/null)" = running ]; then echo active; else echo inactive; exit 3; fi ;;
  start|restart) if [ "$svc" = broken ]; then echo "Job for broken.service failed" >&2; exit 1; fi; echo running > "$state" ;;
  stop) echo stopped > "$state" ;;
  *) exit 2 ;;
esac
"#,
                dir = dir.display()
            );
            vec![("systemctl", script)]
        })
    }

    async fn call(action: &str, service: &str) -> ActionReply {
        let data = json!({ "service": service }).as_object().cloned().unwrap();
        super::super::handle_on_bare_node(&Service, action, &data).await
    }

    #[tokio::test]
    async fn services_start_stop_and_report_through_systemctl() {
        let _systemctl = stand_in();
        let status = call("status", "nginx").await;
        assert_eq!((status.status, &status.data["status"]), (StatusCode::Ok, &json!("stopped")));
        let started = call("start", "nginx").await;
        assert_eq!((started.status, &started.data["status"]), (StatusCode::Ok, &json!("running")));
        let again = call("start", "nginx").await;
        assert_eq!(again.status, StatusCode::Aborted);
        assert!(again.message.contains("already running"), "{}", again.message);
        let restarted = call("restart", "nginx").await;
        assert_eq!(restarted.data["status"], "running");
        let stopped = call("stop", "nginx").await;
        assert_eq!((stopped.status, &stopped.data["status"]), (StatusCode::Ok, &json!("stopped")));
        let broken = call("start", "broken").await;
        assert_eq!((broken.status, &broken.data["status"]), (StatusCode::Aborted, &json!("stopped")));
        assert!(broken.message.contains("Job for broken.service failed"), "{}", broken.message);
    }
}
