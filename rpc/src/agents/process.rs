//! Running a program for an agent: its own process group, stdin closed, stdout and stderr
//! captured up to a limit, and at the deadline the whole group killed, so a program's
//! background children cannot outlive it. `shell`, external agents and the node's fact
//! command run through here.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Most bytes of stdout (and, separately, of stderr) kept, so a chatty program cannot
/// produce a reply too large to send. The rest is read and discarded, so the program never
/// blocks on a full pipe.
pub const MAX_OUTPUT: usize = 128 * 1024;

/// How long output is still awaited after the program's process group was killed.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How a program ended.
pub struct Finished {
    /// Its exit status, if it could be collected.
    pub status: Option<ExitStatus>,
    /// Its standard output.
    pub stdout: Captured,
    /// Its standard error.
    pub stderr: Captured,
    /// Whether it was killed at the deadline.
    pub timed_out: bool,
}

impl Finished {
    /// Exit code as a shell reports it: the code, or 128 + signal number; -1 when unknown.
    pub fn exit_code(&self) -> i32 {
        self.status.map(|s| s.code().or_else(|| s.signal().map(|s| 128 + s)).unwrap_or(-1)).unwrap_or(-1)
    }
}

/// Output of one pipe.
#[derive(Default)]
pub struct Captured {
    /// The bytes kept.
    pub bytes: Vec<u8>,
    /// Whether more came.
    pub truncated: bool,
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

/// Runs `command` (stdin closed, in a process group of its own) until it ends or `timeout`
/// passes, when its whole group is killed.
pub async fn run(mut command: tokio::process::Command, timeout: Duration) -> std::io::Result<Finished> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
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
    // finished program may keep them open, and then it too meets the deadline.
    let (stdout, stderr) = match tokio::time::timeout_at(deadline, &mut output).await {
        Ok(captured) => captured,
        Err(_) => {
            timed_out = true;
            kill_group(pgid);
            tokio::time::timeout(KILL_GRACE, &mut output).await.unwrap_or_default()
        }
    };
    Ok(Finished { status, stdout, stderr, timed_out })
}
