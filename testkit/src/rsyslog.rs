//! A real `rsyslogd` for tests of the syslog export: [`Rsyslog`].
//!
//! Each instance runs `rsyslogd -n -f <generated config> -i <pidfile>` in its own temp
//! directory (work directory, config, pidfile, output, logs), listens with `imtcp` on a free
//! loopback port (octet-counted framing is on by default) or, with [`RsyslogTls`], with the
//! GnuTLS stream driver (RFC 5425), and writes every message it receives over TCP to
//! `received.jsonl`, one JSON object per message with what rsyslog parsed out of it
//! ([`Received`]). No `imuxsock`/`imklog`: it touches nothing of the host's logging.
//!
//! [`Rsyslog::stop`] (SIGTERM: rsyslog drains its queues and closes its connections) and
//! [`Rsyslog::restart`] (same port, same output file) let a test take the collector away in
//! the middle of an export. Like the NATS servers of this crate, the process is tied to the
//! test process (`PR_SET_PDEATHSIG`) and killed when the handle drops.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::error::{HarnessError, Result};
use crate::nats::process;

/// Environment variable naming the `rsyslogd` binary to use instead of searching.
pub const RSYSLOGD_ENV: &str = "CHORUS_RSYSLOGD";

const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"];
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Finds `rsyslogd`: `CHORUS_RSYSLOGD`, then `PATH`, then `/usr/sbin` and friends.
pub fn rsyslogd_binary() -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os(RSYSLOGD_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(explicit);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(HarnessError::Rsyslog(format!("{RSYSLOGD_ENV}={} is not a file", p.display())))
        };
    }
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(FALLBACK_DIRS.iter().map(PathBuf::from));
    dirs.into_iter().map(|d| d.join("rsyslogd")).find(|p| p.is_file()).ok_or_else(|| {
        HarnessError::Rsyslog(format!(
            "rsyslogd not found in {RSYSLOGD_ENV}, PATH or {}; run scripts/setup (Debian packages rsyslog and rsyslog-gnutls)",
            FALLBACK_DIRS.join(", ")
        ))
    })
}

/// TLS for the listener (GnuTLS driver, `rsyslog-gnutls`).
#[derive(Clone, Debug)]
pub struct RsyslogTls {
    /// CA that signed `cert_file` (and, with `x509/*` modes, the clients' certificates).
    pub ca_file: PathBuf,
    /// The server's certificate.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// `StreamDriver.AuthMode`: `anon` (no client authentication), `x509/certvalid`
    /// (clients need a certificate signed by the CA) or `x509/name`.
    pub auth_mode: String,
}

/// Configures an [`Rsyslog`] before starting it.
#[derive(Clone, Debug, Default)]
#[must_use = "a builder does nothing until .start() is called"]
pub struct RsyslogBuilder {
    tls: Option<RsyslogTls>,
    binary: Option<PathBuf>,
}

impl RsyslogBuilder {
    /// Listen with TLS instead of plain TCP.
    pub fn tls(mut self, tls: RsyslogTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The `rsyslogd` to run instead of [`rsyslogd_binary`]'s choice.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Starts on a free loopback port and waits until it listens; a port taken between
    /// picking and binding is retried with a new one.
    pub fn start(self) -> Result<Rsyslog> {
        let binary = match self.binary {
            Some(b) => b,
            None => rsyslogd_binary()?,
        };
        let mut last = None;
        for _ in 0..process::PORT_ATTEMPTS {
            let port = process::free_ports(1).map_err(|e| HarnessError::io("allocating a free loopback port", e))?[0];
            let mut r = Rsyslog::prepare(binary.clone(), port, self.tls.clone())?;
            match r.launch() {
                Ok(()) => return Ok(r),
                Err(e) if e.is_port_conflict() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("PORT_ATTEMPTS is at least 1"))
    }
}

/// One message as rsyslog received and parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// PRI as rsyslog decoded it (`%pri%`).
    pub pri: u8,
    /// HOSTNAME as rsyslog parsed it (`%hostname%`).
    pub hostname: String,
    /// APP-NAME as rsyslog parsed it (`%app-name%`).
    pub app_name: String,
    /// MSGID as rsyslog parsed it (`%msgid%`).
    pub msgid: String,
    /// The STRUCTURED-DATA as received (escapes kept), `-` when none.
    pub structured_data: String,
    /// The MSG part.
    pub msg: String,
    /// The whole message as received, without the octet count.
    pub raw: String,
}

/// A running `rsyslogd`; killed when dropped.
#[derive(Debug)]
pub struct Rsyslog {
    binary: PathBuf,
    port: u16,
    config_path: PathBuf,
    pid_path: PathBuf,
    output_path: PathBuf,
    internal_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    run_log_offset: u64,
    run_internal_offset: u64,
    /// Last so it is removed after the process is gone.
    dir: TempDir,
}

impl Rsyslog {
    /// Plain TCP on a free loopback port.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// A builder, to listen with TLS or run a specific `rsyslogd`.
    pub fn builder() -> RsyslogBuilder {
        RsyslogBuilder::default()
    }

    /// The listening port (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where received messages are written, one JSON object per line.
    pub fn output_path(&self) -> &Path {
        &self.output_path
    }

    /// The generated configuration.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Every message received so far, across restarts, in order of arrival.
    pub fn received(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(&self.output_path).unwrap_or_default();
        text.lines().filter_map(parse_received).collect()
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The last `lines` lines of rsyslogd's output and internal messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let out = process::read_from(&self.log_path, 0);
        let internal = process::read_from(&self.internal_path, 0);
        format!("stderr:\n{}\ninternal:\n{}", process::tail(&out, lines), process::tail(&internal, lines))
    }

    /// SIGTERM and wait: rsyslog finishes what it has queued, closes its connections and
    /// exits. SIGKILL after 10 s. Nothing happens when it is not running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let wait_err = |e| HarnessError::io("waiting for rsyslogd to stop", e);
        if child.try_wait().map_err(wait_err)?.is_none() {
            // SAFETY: kill(2) on our own unreaped child, so the pid is still ours.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_GRACE;
            while child.try_wait().map_err(wait_err)?.is_none() {
                if Instant::now() >= deadline {
                    child.kill().ok();
                    child.wait().map_err(wait_err)?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::fs::remove_file(&self.pid_path).ok();
        Ok(())
    }

    /// SIGKILL and wait: a crash, losing whatever rsyslog held in memory.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().map_err(|e| HarnessError::io("waiting for killed rsyslogd", e))?;
        }
        std::fs::remove_file(&self.pid_path).ok();
        Ok(())
    }

    /// Stops (gracefully) if running and starts again on the same port with the same output
    /// file; waits until it listens. A port conflict is retried for a while (the port cannot
    /// change: the exporter knows it).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if e.is_port_conflict() && Instant::now() < deadline => {
                    self.kill().ok();
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn prepare(binary: PathBuf, port: u16, tls: Option<RsyslogTls>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("chorus-rsyslog-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating a temp dir for rsyslogd", e))?;
        let work = dir.path().join("work");
        std::fs::create_dir(&work).map_err(|e| HarnessError::io("creating the rsyslog work directory", e))?;
        let r = Rsyslog {
            binary,
            port,
            config_path: dir.path().join("rsyslog.conf"),
            pid_path: dir.path().join("rsyslogd.pid"),
            output_path: dir.path().join("received.jsonl"),
            internal_path: dir.path().join("internal.log"),
            log_path: dir.path().join("rsyslogd.log"),
            child: None,
            run_log_offset: 0,
            run_internal_offset: 0,
            dir,
        };
        let config = render_config(&work, port, tls.as_ref(), &r.output_path, &r.internal_path);
        std::fs::write(&r.config_path, config).map_err(|e| HarnessError::io("writing rsyslog.conf", e))?;
        Ok(r)
    }

    /// Spawns and waits for readiness: our process announced its start (`x-pid`), nothing
    /// reported a bind failure, and the port accepts connections.
    fn launch(&mut self) -> Result<()> {
        self.kill()?;
        self.run_log_offset = process::file_len(&self.log_path);
        self.run_internal_offset = process::file_len(&self.internal_path);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io("opening the rsyslogd log", e))?;
        let mut marker = log.try_clone().map_err(|e| HarnessError::io("duplicating the log handle", e))?;
        writeln!(marker, "---- chorus-tests: starting {} on port {} ----", self.binary.display(), self.port)
            .map_err(|e| HarnessError::io("writing the rsyslogd log", e))?;
        let stderr = log.try_clone().map_err(|e| HarnessError::io("duplicating the log handle", e))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("-n")
            .arg("-f")
            .arg(&self.config_path)
            .arg("-i")
            .arg(&self.pid_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child = process::spawn_tied_to_process(command)
            .map_err(|e| HarnessError::io(format!("spawning {}", self.binary.display()), e))?;
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        let started = format!("x-pid=\"{pid}\"");
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            let out = process::read_from(&self.log_path, self.run_log_offset);
            let internal = process::read_from(&self.internal_path, self.run_internal_offset);
            if let Some(line) = [&out, &internal]
                .iter()
                .flat_map(|t| t.lines())
                .find(|l| l.contains("Could not create tcp listener") || l.contains("Address already in use"))
            {
                let line = line.trim().to_owned();
                self.kill().ok();
                return Err(HarnessError::PortInUse {
                    server: format!("rsyslogd on port {}", self.port),
                    detail: line,
                    log_tail: self.log_tail(20),
                });
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(HarnessError::Rsyslog(format!(
                    "exited with {status} before it listened\n{}",
                    self.log_tail(40)
                )));
            }
            let announced = internal.lines().any(|l| l.contains(&started) && l.contains("] start"));
            if announced && TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill().ok();
                return Err(HarnessError::Rsyslog(format!(
                    "not listening on {address} after {READY_TIMEOUT:?}\n{}",
                    self.log_tail(40)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.kill().ok();
    }
}

/// The generated `rsyslog.conf`.
fn render_config(work: &Path, port: u16, tls: Option<&RsyslogTls>, output: &Path, internal: &Path) -> String {
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).expect("strings serialize");
    let mut out = String::from("# Generated by chorus-tests (tests/src/rsyslog.rs).\n");
    // Internal messages go to a file of our own (the start line tells readiness), never to
    // the journal; messages up to 1 MiB (a Chorus event's limit) are taken whole.
    let mut global = format!("workDirectory={} processInternalMessages=\"on\" maxMessageSize=\"1100k\"", q(work));
    if let Some(t) = tls {
        global += &format!(
            " defaultNetstreamDriver=\"gtls\" defaultNetstreamDriverCAFile={} defaultNetstreamDriverCertFile={} defaultNetstreamDriverKeyFile={}",
            q(&t.ca_file),
            q(&t.cert_file),
            q(&t.key_file)
        );
    }
    out += &format!("global({global})\n");
    match tls {
        None => out += "module(load=\"imtcp\")\n",
        Some(t) => {
            out += &format!(
                "module(load=\"imtcp\" StreamDriver.Name=\"gtls\" StreamDriver.Mode=\"1\" StreamDriver.AuthMode={})\n",
                serde_json::to_string(&t.auth_mode).expect("strings serialize")
            )
        }
    }
    out += r#"template(name="chorus_received" type="list" option.jsonf="on") {
  property(outname="pri" name="pri" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app_name" name="app-name" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="structured_data" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="raw" name="rawmsg" format="jsonf")
}
"#;
    out += &format!("input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\")\n");
    out += &format!(
        "if $inputname == \"imtcp\" then {{\n  action(type=\"omfile\" file={} template=\"chorus_received\")\n}} else {{\n  action(type=\"omfile\" file={})\n}}\n",
        q(output),
        q(internal)
    );
    out
}

fn parse_received(line: &str) -> Option<Received> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
    Some(Received {
        pri: s("pri").parse().ok()?,
        hostname: s("hostname"),
        app_name: s("app_name"),
        msgid: s("msgid"),
        structured_data: s("structured_data"),
        msg: s("msg"),
        raw: s("raw"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_octet_counted_messages_across_a_restart() {
        let mut r = Rsyslog::start().unwrap();
        let send = |r: &Rsyslog, msg: &str| {
            let mut s = TcpStream::connect(r.address()).unwrap();
            s.write_all(format!("{} {msg}", msg.len()).as_bytes()).unwrap();
        };
        let wait_for = |r: &Rsyslog, n: usize| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while r.received().len() < n {
                assert!(Instant::now() < deadline, "messages not written: {}", r.log_tail(20));
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        send(&r, r#"<36>1 2024-04-22T08:00:00Z node1 chorus - audit [x@1 id="a\"1"] {"id":"é1"}"#);
        // A message still unread when rsyslog stops is lost: wait for it to be written.
        wait_for(&r, 1);
        let port = r.port();
        r.restart().unwrap();
        assert_eq!(r.port(), port);
        send(&r, r#"<38>1 2024-04-22T08:00:01Z node2 chorus - rpc_request - {"id":"2"}"#);
        wait_for(&r, 2);
        let got = r.received();
        assert_eq!((got[0].pri, got[0].hostname.as_str(), got[0].msgid.as_str()), (36, "node1", "audit"));
        assert_eq!(got[0].structured_data, r#"[x@1 id="a\"1"]"#);
        assert_eq!(got[0].msg, r#"{"id":"é1"}"#);
        assert_eq!((got[1].pri, got[1].structured_data.as_str()), (38, "-"));
        r.stop().unwrap();
        assert!(!r.is_running());
    }
}
