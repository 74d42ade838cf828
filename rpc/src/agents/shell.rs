//! `shell`: run a command with `sh -c`.
//!
//! Dangerous by design — it is remote code execution as the node agent's user — and
//! therefore only reachable through an Action Policy that allows it; with no policy it is
//! denied like everything else.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::{string_input, ActionContext, ActionReply, Agent};

/// Most bytes of stdout (and, separately, of stderr) kept in a reply, so a chatty command
/// cannot produce a reply too large to send. The rest is read and discarded, so the
/// command never blocks on a full pipe.
pub const MAX_OUTPUT: usize = 128 * 1024;

/// Timeout when the request gives none.
const DEFAULT_TIMEOUT: u64 = 60;
/// Longest timeout a request may ask for.
const MAX_TIMEOUT: u64 = 3600;
/// How long output is still awaited after the command's process group was killed.
const KILL_GRACE: Duration = Duration::from_secs(2);

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

/// Output of one pipe.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

/// Reads `pipe` to its end, keeping the first [`MAX_OUTPUT`] bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else {
        return captured;
    };
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return captured,
            Ok(n) => {
                let room = MAX_OUTPUT - captured.bytes.len();
                captured.bytes.extend_from_slice(&buf[..n.min(room)]);
                captured.truncated |= n > room;
            }
        }
    }
}

fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: killpg only sends a signal; the group was created for this command.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// Exit code as a shell reports it: the code, or 128 + signal number.
fn exit_code(status: ExitStatus) -> i32 {
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(-1)
}

async fn run(command: &str, timeout: Duration) -> ActionReply {
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return ActionReply::error(StatusCode::UnknownError, format!("cannot start sh: {e}")),
    };
    let pgid = child.id();
    let deadline = Instant::now() + timeout;
    let stdout = tokio::spawn(read_capped(child.stdout.take()));
    let stderr = tokio::spawn(read_capped(child.stderr.take()));
    let output = async { (stdout.await.unwrap_or_default(), stderr.await.unwrap_or_default()) };
    tokio::pin!(output);

    let mut timed_out = false;
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            timed_out = true;
            kill_group(pgid);
            child.wait().await.ok()
        }
    };
    // Output ends when every process holding the pipes is gone; a background process of a
    // finished command may keep them open, and then it too meets the deadline.
    let (out, err) = match tokio::time::timeout_at(deadline, &mut output).await {
        Ok(captured) => captured,
        Err(_) => {
            timed_out = true;
            kill_group(pgid);
            tokio::time::timeout(KILL_GRACE, &mut output).await.unwrap_or_default()
        }
    };
    let data = match json!({
        "stdout": String::from_utf8_lossy(&out.bytes),
        "stderr": String::from_utf8_lossy(&err.bytes),
        "exitcode": status.map(exit_code).unwrap_or(-1),
        "timed_out": timed_out,
        "truncated": out.truncated || err.truncated,
    }) {
        Value::Object(map) => map,
        _ => unreachable!("json! object literal"),
    };
    if timed_out {
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
        assert_eq!(r.data["stdout"].as_str().unwrap().len(), MAX_OUTPUT);
        assert_eq!(r.data["truncated"], true);
    }
}
