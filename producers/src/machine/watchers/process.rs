//! Running a watcher's command: `sh -c` in the machine directory, with a clean environment
//! as in Choria (so a check behaves the same whatever started the agent): `PATH` (the
//! agent's plus the machine directory), `MACHINE_NAME`, `MACHINE_WATCHER_NAME` and the
//! manifest's `environment`. The command gets its own process group, killed on timeout or
//! stop, so a script's children do not outlive it. Used by `exec` and `nagios` watchers.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use super::WatcherCtx;

/// How a command ended.
pub(super) enum Ran {
    /// It exited (`code` is `None` when a signal ended it).
    Exited { code: Option<i32>, stdout: String, stderr: String },
    /// It could not be started or waited for.
    Failed(String),
    /// It ran longer than its timeout and was killed.
    TimedOut,
}

pub(super) async fn run(ctx: &WatcherCtx, command: &str, timeout: Duration, environment: &[String]) -> Ran {
    let dir = &ctx.shared.machine_dir;
    let mut paths: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    paths.push(dir.clone());
    let path = std::env::join_paths(paths).unwrap_or_else(|_| dir.as_os_str().to_owned());

    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .env("PATH", path)
        .env("MACHINE_NAME", &ctx.shared.instance.machine)
        .env("MACHINE_WATCHER_NAME", &ctx.def.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for entry in environment {
        if let Some((key, value)) = entry.split_once('=') {
            cmd.env(key, value);
        }
    }
    #[cfg(unix)]
    cmd.process_group(0);

    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return Ran::Failed(format!("could not start: {e}")),
    };
    // Killed on every path out of here except a normal exit: timeout, error, stop.
    let group = ProcessGroup(child.id());
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => {
            group.disarm();
            Ran::Exited {
                code: output.status.code(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        }
        Ok(Err(e)) => Ran::Failed(e.to_string()),
        Err(_) => Ran::TimedOut,
    }
}

/// Kills the command's process group when dropped, unless disarmed after a normal exit.
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.0.and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) with a negative pid signals the process group the command leads
            // (it was started with process_group(0)); no memory is involved.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}
