//! Process plumbing shared by single servers and clusters: free ports, spawning children
//! that die with the test process, and reading log tails.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::OnceLock;

/// How many fresh sets of ports a start tries before giving up on port conflicts.
pub(crate) const PORT_ATTEMPTS: usize = 5;

/// Returns `count` distinct free loopback ports.
///
/// All listeners are held at once before any is released, so the ports are distinct from
/// each other; they are only *probably* still free when the server binds them, which is why
/// starts retry on [`crate::HarnessError::PortInUse`].
pub(crate) fn free_ports(count: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..count).map(|_| TcpListener::bind(("127.0.0.1", 0))).collect::<io::Result<Vec<_>>>()?;
    listeners.iter().map(|listener| listener.local_addr().map(|addr| addr.port())).collect()
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` so that it is killed when the test process dies.
///
/// On Linux the child gets `PR_SET_PDEATHSIG = SIGKILL`. That signal fires when the *thread*
/// that forked the child exits, not the process, so children are forked from one dedicated
/// thread that lives as long as the process. Forking from the caller's thread would kill a
/// server as soon as, say, a tokio blocking-pool thread that started it is retired.
pub(crate) fn spawn_tied_to_process(mut command: Command) -> io::Result<Child> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
        // functions (prctl, getppid) without allocating.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
    }

    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("chorus-nats-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    reply.send(command.spawn()).ok();
                }
            })
            .expect("failed to start the nats-server spawner thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner.send((command, reply_tx)).map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Current length of a file, 0 if it does not exist yet.
pub(crate) fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Everything in the file from byte `offset` on (lossy UTF-8), empty if unreadable.
pub(crate) fn read_from(path: &Path, offset: u64) -> String {
    let mut out = Vec::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            file.read_to_end(&mut out).ok();
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    if out.is_empty() {
        out.push_str("(log is empty)");
    }
    out
}

/// The log line reporting a bind conflict, if any.
pub(crate) fn port_conflict_line(log: &str) -> Option<String> {
    log.lines().find(|line| line.contains("address already in use")).map(|line| line.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(6).unwrap();
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 6);
        assert!(ports.iter().all(|&p| p != 0));
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 5), "(log is empty)");
    }

    #[test]
    fn finds_bind_conflicts() {
        let log = "[1] [INF] Starting\n[1] [FTL] Can't start monitoring: listen tcp 127.0.0.1:1: bind: address already in use\n";
        assert!(port_conflict_line(log).unwrap().contains("[FTL]"));
        assert!(port_conflict_line("[1] [INF] Server is ready").is_none());
    }

    #[test]
    fn read_from_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "old run\nnew run\n").unwrap();
        assert_eq!(read_from(&path, 8), "new run\n");
        assert_eq!(file_len(&path), 16);
        assert_eq!(read_from(&dir.path().join("missing"), 0), "");
    }
}
