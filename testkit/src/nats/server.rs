//! One `nats-server` process: [`NatsServer`] and its [`NatsServerBuilder`].

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::monitor::{self, REQUEST_TIMEOUT};
use super::process::{self, PORT_ATTEMPTS};
use crate::error::{HarnessError, Result};

/// How long a start or restart waits for a single server to become ready by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`NatsServer::stop`] waits after SIGTERM before it falls back to SIGKILL.
/// JetStream flushes its stores on a graceful shutdown; that takes well under a second for
/// test-sized data, so hitting this limit means the server is stuck.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Pause between readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Pause before a restart tries its (fixed) ports again after a conflict.
const RESTART_PORT_BACKOFF: Duration = Duration::from_millis(250);

/// Log lines quoted in errors.
const ERROR_LOG_LINES: usize = 40;

/// The loopback ports a server listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ports {
    pub client: u16,
    pub monitor: u16,
    pub cluster: Option<u16>,
}

/// Cluster membership of one node.
#[derive(Debug, Clone)]
pub(crate) struct Membership {
    pub cluster_name: String,
    /// Cluster ports of the *other* nodes.
    pub route_ports: Vec<u16>,
}

/// Everything that goes into a server's config besides ports and paths.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub server_name: String,
    pub jetstream: bool,
    pub jetstream_extra: String,
    pub extra_config: String,
    /// A whole config made elsewhere, written before the harness's own lines.
    pub base_config: String,
    pub ready_timeout: Duration,
    pub membership: Option<Membership>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server_name: "chorus-nats".into(),
            jetstream: true,
            jetstream_extra: String::new(),
            extra_config: String::new(),
            base_config: String::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            membership: None,
        }
    }
}

/// Configures a [`NatsServer`] before starting it. Obtain one with [`NatsServer::builder`].
///
/// The harness owns `server_name`, `listen`, `http`, `jetstream.store_dir` and (for cluster
/// nodes) the `cluster` block; everything else is yours through [`extra_config`]
/// and [`jetstream_extra`].
///
/// [`extra_config`]: NatsServerBuilder::extra_config
/// [`jetstream_extra`]: NatsServerBuilder::jetstream_extra
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until .start() is called"]
pub struct NatsServerBuilder {
    settings: Settings,
    binary: Option<PathBuf>,
}

impl NatsServerBuilder {
    /// The `server_name` (default `chorus-nats`). It shows up in the log, in `/varz` and
    /// as the JetStream peer name.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.settings.server_name = name.into();
        self
    }

    /// Whether JetStream is enabled (default `true`). Without it, readiness is plain
    /// `/healthz`.
    pub fn jetstream(mut self, enabled: bool) -> Self {
        self.settings.jetstream = enabled;
        self
    }

    /// Appends config text after the generated config, for TLS, authorization, accounts,
    /// leaf nodes and the like. May be called several times; the pieces are joined with
    /// newlines. In the NATS config format a later key replaces an earlier one, so this can
    /// override generated settings, but do not override `listen`, `http`, `jetstream` or
    /// `cluster`: the harness relies on them (use [`jetstream_extra`] for JetStream
    /// options).
    ///
    /// [`jetstream_extra`]: NatsServerBuilder::jetstream_extra
    pub fn extra_config(mut self, text: &str) -> Self {
        append_line_block(&mut self.settings.extra_config, text);
        self
    }

    /// Config text placed *inside* the generated `jetstream { }` block, next to the
    /// harness's `store_dir`: e.g. `max_file_store: 1GB` or `domain: hub`.
    pub fn jetstream_extra(mut self, text: &str) -> Self {
        append_line_block(&mut self.settings.jetstream_extra, text);
        self
    }

    /// A complete config file made elsewhere (e.g. by `chorus broker config`), written
    /// *before* the harness's own lines. Its accounts, users, permissions and TLS are used as
    /// they are; the harness's `server_name`, `listen`, `http` and `jetstream { store_dir }`
    /// come after it and so replace that file's values of those keys (in the NATS config
    /// format a later key wins, whole blocks included).
    pub fn base_config(mut self, text: &str) -> Self {
        append_line_block(&mut self.settings.base_config, text);
        self
    }

    /// How long start and restart wait for readiness (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.settings.ready_timeout = timeout;
        self
    }

    /// The `nats-server` binary to run instead of [`super::nats_server_binary`]'s choice.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Starts the server on fresh free ports and waits until it is ready. Port conflicts
    /// (another process took a port between allocation and bind) are retried with new ports.
    pub fn start(self) -> Result<NatsServer> {
        let binary = match self.binary {
            Some(binary) => binary,
            None => super::nats_server_binary()?,
        };
        NatsServer::launch(self.settings, binary, || {
            let ports = process::free_ports(2)?;
            Ok(Ports { client: ports[0], monitor: ports[1], cluster: None })
        })
    }
}

pub(crate) fn append_line_block(target: &mut String, text: &str) {
    if !target.is_empty() && !target.ends_with('\n') {
        target.push('\n');
    }
    target.push_str(text);
}

/// A running `nats-server` process on loopback, with JetStream on by default.
///
/// The process, its generated config, its JetStream store and its log all live in one
/// temporary directory owned by this handle. Dropping the handle kills the process (SIGKILL)
/// and removes the directory; [`stop`](NatsServer::stop) shuts down gracefully instead, and
/// [`restart`](NatsServer::restart) brings the same server back on the same ports with the
/// same store, which is how tests check durability.
///
/// All methods block; starting takes a few hundred milliseconds.
#[derive(Debug)]
pub struct NatsServer {
    settings: Settings,
    binary: PathBuf,
    ports: Ports,
    config_path: PathBuf,
    store_dir: PathBuf,
    log_path: PathBuf,
    /// `None` once killed or stopped. A mutex so that [`NatsServer::is_running`] can reap
    /// the child through `&self`.
    child: Mutex<Option<Child>>,
    /// Where the current run's output starts in the log file; errors quote only this run.
    run_log_offset: u64,
    /// Declared last so it is removed only after `Drop` has killed the process.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server with the default settings; see [`NatsServer::builder`].
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// A builder for a server with non-default settings.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.ports.client
    }

    /// The HTTP monitoring port (`/varz`, `/jsz`, `/healthz`, ...).
    pub fn monitor_port(&self) -> u16 {
        self.ports.monitor
    }

    /// The cluster (route) port, for cluster nodes.
    pub fn cluster_port(&self) -> Option<u16> {
        self.ports.cluster
    }

    /// The configured `server_name`.
    pub fn server_name(&self) -> &str {
        &self.settings.server_name
    }

    /// The directory given to JetStream as `store_dir` (the server keeps its data in a
    /// `jetstream` directory below it). Survives restarts; removed on drop.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's log file. Every run of the process appends to it, after a marker line.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The process id while a process is held (running or exited but not yet reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child_slot().as_ref().map(Child::id)
    }

    /// Whether the process is alive.
    pub fn is_running(&self) -> bool {
        match self.child_slot().as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process with SIGKILL and waits for it: a crash, as far as JetStream can
    /// tell. Does nothing if it is not running.
    pub fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child_slot().take() else {
            return Ok(());
        };
        // On an already exited (unreaped) child, kill is a harmless no-op.
        child.kill().ok();
        child.wait().map_err(|e| HarnessError::io("waiting for killed nats-server", e))?;
        tracing::debug!(server = %self.settings.server_name, "nats-server killed");
        Ok(())
    }

    /// Stops the process gracefully with SIGTERM and waits for it to exit; falls back to
    /// SIGKILL after 10 s. Does nothing if it is not running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child_slot().take() else {
            return Ok(());
        };
        let wait_err = |e| HarnessError::io("waiting for nats-server to stop", e);
        if child.try_wait().map_err(wait_err)?.is_some() {
            return Ok(());
        }
        // SAFETY: plain kill(2). The child has not been reaped (try_wait said it is alive
        // and we hold the only handle), so its pid cannot have been reused.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(HarnessError::io("sending SIGTERM to nats-server", err));
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while child.try_wait().map_err(wait_err)?.is_none() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    server = %self.settings.server_name,
                    "nats-server ignored SIGTERM for {STOP_GRACE:?}; killing it"
                );
                child.kill().ok();
                child.wait().map_err(wait_err)?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::debug!(server = %self.settings.server_name, "nats-server stopped");
        Ok(())
    }

    /// Restarts the server on the same ports with the same store directory and waits until
    /// it is ready. A running server is stopped gracefully first; [`kill`] it beforehand to
    /// test crash recovery instead.
    ///
    /// The ports cannot change (clients and cluster peers know them), so a port conflict is
    /// retried on the same ports until the ready timeout runs out.
    ///
    /// [`kill`]: NatsServer::kill
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + self.settings.ready_timeout;
        loop {
            self.spawn()?;
            match self.wait_until_ready(deadline) {
                Ok(()) => return Ok(()),
                Err(err) if err.is_port_conflict() && Instant::now() + RESTART_PORT_BACKOFF < deadline => {
                    tracing::debug!(%err, "nats-server restart hit a port conflict; retrying");
                    self.kill()?;
                    std::thread::sleep(RESTART_PORT_BACKOFF);
                }
                Err(err) => {
                    self.kill().ok();
                    return Err(err);
                }
            }
        }
    }

    /// The last `lines` lines of the whole log (all runs).
    pub fn log_tail(&self, lines: usize) -> String {
        process::tail(&process::read_from(&self.log_path, 0), lines)
    }

    /// `GET path` on the monitoring port; the body when the status is 200.
    /// `path` includes any query, e.g. `/jsz?streams=true`.
    pub fn monitor_get(&self, path: &str) -> Result<String> {
        let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
        let monitor_err =
            |detail: String| HarnessError::Monitor { port: self.ports.monitor, path: path.clone(), detail };
        let response = monitor::get(self.ports.monitor, &path, REQUEST_TIMEOUT).map_err(monitor_err)?;
        if response.status != 200 {
            return Err(monitor_err(format!("status {}: {}", response.status, response.body.trim())));
        }
        Ok(response.body)
    }

    /// [`monitor_get`](NatsServer::monitor_get), parsed as JSON.
    pub fn monitor_json(&self, path: &str) -> Result<serde_json::Value> {
        let body = self.monitor_get(path)?;
        serde_json::from_str(&body).map_err(|e| HarnessError::Monitor {
            port: self.ports.monitor,
            path: path.to_string(),
            detail: format!("invalid JSON: {e}"),
        })
    }

    // ----- crate-internal machinery, shared with NatsCluster -----

    /// Allocates ports, spawns and waits for readiness, with fresh ports on each port
    /// conflict, up to [`PORT_ATTEMPTS`] times.
    pub(crate) fn launch(
        settings: Settings,
        binary: PathBuf,
        mut next_ports: impl FnMut() -> io::Result<Ports>,
    ) -> Result<Self> {
        let mut last_conflict = None;
        for attempt in 1..=PORT_ATTEMPTS {
            let ports = next_ports().map_err(|e| HarnessError::io("allocating free loopback ports", e))?;
            let mut server = Self::prepare(settings.clone(), binary.clone(), ports)?;
            server.spawn()?;
            match server.wait_until_ready(Instant::now() + settings.ready_timeout) {
                Ok(()) => return Ok(server),
                Err(err) if err.is_port_conflict() => {
                    tracing::debug!(attempt, %err, "nats-server port conflict; new ports");
                    last_conflict = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_conflict.expect("PORT_ATTEMPTS is at least 1"))
    }

    /// Creates the temp directory and writes the config; does not spawn.
    pub(crate) fn prepare(settings: Settings, binary: PathBuf, ports: Ports) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("chorus-nats-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating a temp dir for nats-server", e))?;
        let store_dir = dir.path().join("store");
        fs::create_dir(&store_dir).map_err(|e| HarnessError::io("creating the JetStream store dir", e))?;
        let server = NatsServer {
            config_path: dir.path().join("nats-server.conf"),
            log_path: dir.path().join("nats-server.log"),
            store_dir,
            settings,
            binary,
            ports,
            child: Mutex::new(None),
            run_log_offset: 0,
            dir,
        };
        fs::write(&server.config_path, server.render_config())
            .map_err(|e| HarnessError::io(format!("writing {}", server.config_path.display()), e))?;
        Ok(server)
    }

    /// The generated config file's text.
    pub(crate) fn render_config(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("strings always serialize");
        let path = |p: &Path| q(&p.to_string_lossy());
        let mut out = String::from(
            "# Generated by chorus-tests (tests/src/nats/server.rs). Ports are free loopback\n\
             # ports picked per run; the store lives in a temp dir removed with the handle.\n",
        );
        if !self.settings.base_config.is_empty() {
            out += "\n# base_config (the harness's keys below replace its own)\n";
            out += &self.settings.base_config;
            out += "\n\n# chorus-tests\n";
        }
        out += &format!("server_name: {}\n", q(&self.settings.server_name));
        out += &format!("listen: \"127.0.0.1:{}\"\n", self.ports.client);
        out += &format!("http: \"127.0.0.1:{}\"\n", self.ports.monitor);
        if self.settings.jetstream {
            out += "jetstream {\n";
            out += &format!("  store_dir: {}\n", path(&self.store_dir));
            for line in self.settings.jetstream_extra.lines() {
                out += &format!("  {line}\n");
            }
            out += "}\n";
        }
        if let (Some(membership), Some(cluster_port)) = (&self.settings.membership, self.ports.cluster) {
            out += "cluster {\n";
            out += &format!("  name: {}\n", q(&membership.cluster_name));
            out += &format!("  listen: \"127.0.0.1:{cluster_port}\"\n");
            out += "  routes: [\n";
            for port in &membership.route_ports {
                out += &format!("    \"nats-route://127.0.0.1:{port}\"\n");
            }
            out += "  ]\n}\n";
        }
        if !self.settings.extra_config.is_empty() {
            out += "\n# extra_config\n";
            out += &self.settings.extra_config;
            out += "\n";
        }
        out
    }

    /// Spawns the process (any previous one must be gone), output appended to the log.
    pub(crate) fn spawn(&mut self) -> Result<()> {
        self.kill()?;
        let io_err = |what: &str, e| HarnessError::io(format!("{what} {}", self.log_path.display()), e);
        let mut log =
            OpenOptions::new().create(true).append(true).open(&self.log_path).map_err(|e| io_err("opening", e))?;
        self.run_log_offset = process::file_len(&self.log_path);
        writeln!(log, "---- chorus-tests: starting {} -c {} ----", self.binary.display(), self.config_path.display())
            .map_err(|e| io_err("writing", e))?;
        let stderr = log.try_clone().map_err(|e| io_err("duplicating", e))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child = process::spawn_tied_to_process(command)
            .map_err(|e| HarnessError::io(format!("spawning {}", self.binary.display()), e))?;
        tracing::debug!(
            server = %self.settings.server_name,
            pid = child.id(),
            port = self.ports.client,
            "nats-server spawned"
        );
        *self.child_slot() = Some(child);
        Ok(())
    }

    /// Polls until [`probe`](Self::probe) passes, the process exits, or `deadline`.
    pub(crate) fn wait_until_ready(&self, deadline: Instant) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exit_status() {
                return Err(self.exited_error(status));
            }
            let problem = match self.probe() {
                Ok(()) => return Ok(()),
                Err(problem) => problem,
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    server: self.settings.server_name.clone(),
                    waited: started.elapsed(),
                    problem,
                    log_tail: self.run_log_tail(ERROR_LOG_LINES),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// One readiness check. Healthy per `/healthz` (JetStream enabled, when on), and the
    /// monitoring and client ports demonstrably served by the same process: `/varz` reports
    /// our client port and the `server_id` matches the client port's `INFO`. The second
    /// part matters because ports are picked racily: another test's server holding our
    /// monitoring port would otherwise answer `/healthz` for us.
    pub(crate) fn probe(&self) -> std::result::Result<(), String> {
        let health_path = if self.settings.jetstream { "/healthz?js-enabled-only=true" } else { "/healthz" };
        let health = monitor::get(self.ports.monitor, health_path, REQUEST_TIMEOUT)
            .map_err(|e| format!("GET {health_path}: {e}"))?;
        if health.status != 200 {
            return Err(format!("GET {health_path}: status {}: {}", health.status, health.body.trim()));
        }
        let varz = self.monitor_json("/varz").map_err(|e| e.to_string())?;
        if varz["port"].as_u64() != Some(u64::from(self.ports.client)) {
            return Err(format!(
                "monitoring port {} is served by another server (client port {})",
                self.ports.monitor, varz["port"]
            ));
        }
        let server_id = varz["server_id"].as_str().ok_or("/varz has no server_id")?;
        let info = monitor::read_nats_info(self.ports.client, REQUEST_TIMEOUT)
            .map_err(|e| format!("client port {}: {e}", self.ports.client))?;
        if info["server_id"].as_str() != Some(server_id) {
            return Err(format!(
                "client port {} is served by another server ({} instead of {server_id})",
                self.ports.client, info["server_id"]
            ));
        }
        Ok(())
    }

    /// The exit status if the process has exited but is still held (crashed, or failed to
    /// start); `None` while running or after kill/stop.
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        self.child_slot().as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Whether a process is held, i.e. the server was not deliberately killed or stopped.
    pub(crate) fn has_process(&self) -> bool {
        self.child_slot().is_some()
    }

    /// The error for a process that exited on its own: a port conflict if its log says so.
    pub(crate) fn exited_error(&self, status: ExitStatus) -> HarnessError {
        let log = process::read_from(&self.log_path, self.run_log_offset);
        let server = self.settings.server_name.clone();
        let log_tail = process::tail(&log, ERROR_LOG_LINES);
        match process::port_conflict_line(&log) {
            Some(detail) => HarnessError::PortInUse { server, detail, log_tail },
            None => HarnessError::Exited { server, status: status.to_string(), log_tail },
        }
    }

    /// The last lines of the current run's log.
    pub(crate) fn run_log_tail(&self, lines: usize) -> String {
        process::tail(&process::read_from(&self.log_path, self.run_log_offset), lines)
    }

    fn child_slot(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock cannot leave the Option inconsistent.
        self.child.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill().ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn start_and_stop_single_server() {
        let mut server = NatsServer::start().unwrap();
        assert!(server.is_running());
        assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
        assert_ne!(server.port(), server.monitor_port());

        let jsz = server.monitor_json("/jsz").unwrap();
        assert_ne!(jsz["disabled"], serde_json::json!(true), "{jsz}");
        let store = jsz["config"]["store_dir"].as_str().unwrap();
        assert!(Path::new(store).starts_with(server.store_dir()), "{store} not under {}", server.store_dir().display());
        let varz = server.monitor_json("/varz").unwrap();
        assert_eq!(varz["server_name"], "chorus-nats");
        assert!(server.log_tail(200).contains("Server is ready"));

        server.stop().unwrap();
        assert!(!server.is_running());
        assert!(server.pid().is_none());
        assert!(std::net::TcpStream::connect(("127.0.0.1", server.port())).is_err());
        // Graceful: the server logged its own shutdown.
        assert!(server.log_tail(50).contains("Server Exiting"), "{}", server.log_tail(50));
        server.stop().unwrap(); // idempotent
        server.kill().unwrap();
    }

    #[test]
    fn restart_keeps_ports_store_and_data() {
        let mut server = NatsServer::builder().server_name("restart-me").start().unwrap();
        let (port, monitor, store) = (server.port(), server.monitor_port(), server.store_dir().to_path_buf());
        let url = server.url();

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = async_nats::connect(&url).await.unwrap();
            let js = async_nats::jetstream::new(client);
            js.create_stream(async_nats::jetstream::stream::Config {
                name: "DURABLE".into(),
                subjects: vec!["durable.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
            for i in 0..3 {
                js.publish("durable.x", format!("m{i}").into()).await.unwrap().await.unwrap();
            }
        });

        // Crash, not a graceful stop: the data must already be on disk.
        server.kill().unwrap();
        assert!(!server.is_running());
        server.restart().unwrap();
        assert!(server.is_running());
        assert_eq!((server.port(), server.monitor_port(), server.store_dir()), (port, monitor, store.as_path()));

        let jsz = server.monitor_json("/jsz").unwrap();
        assert_eq!(jsz["streams"], 1, "{jsz}");
        assert_eq!(jsz["messages"], 3, "{jsz}");

        // Restart of a running server stops it gracefully first.
        let old_pid = server.pid().unwrap();
        server.restart().unwrap();
        assert_ne!(server.pid().unwrap(), old_pid);
        let jsz = server.monitor_json("/jsz").unwrap();
        assert_eq!(jsz["messages"], 3, "{jsz}");
        assert_eq!(server.log_tail(10_000).matches("---- chorus-tests: starting").count(), 3);
    }

    #[test]
    fn builder_options_reach_the_config() {
        let server = NatsServer::builder()
            .server_name("configured")
            .jetstream(false)
            .extra_config("max_payload: 65536")
            .extra_config("max_connections: 77")
            .start()
            .unwrap();
        let varz = server.monitor_json("/varz").unwrap();
        assert_eq!(varz["server_name"], "configured");
        assert_eq!(varz["max_payload"], 65536);
        assert_eq!(varz["max_connections"], 77);
        let jsz = server.monitor_json("/jsz").unwrap();
        assert_eq!(jsz["disabled"], true, "{jsz}");
        let config = std::fs::read_to_string(server.config_path()).unwrap();
        assert!(!config.contains("jetstream"), "{config}");
    }

    #[test]
    fn base_config_comes_first_and_the_harness_keys_win() {
        let elsewhere = tempfile::tempdir().unwrap();
        let server = NatsServer::builder()
            .base_config(&format!(
                "listen: \"127.0.0.1:1\"\nmax_payload: 65536\njetstream {{ store_dir: {:?} }}",
                elsewhere.path().display().to_string()
            ))
            .start()
            .unwrap();
        let varz = server.monitor_json("/varz").unwrap();
        assert_eq!(varz["max_payload"], 65536, "the base config's own keys are kept");
        assert_eq!(varz["port"], server.port());
        let jsz = server.monitor_json("/jsz").unwrap();
        let store = jsz["config"]["store_dir"].as_str().unwrap();
        assert!(Path::new(store).starts_with(server.store_dir()), "{store}");
    }

    #[test]
    fn jetstream_extra_goes_inside_the_block() {
        let server = NatsServer::builder().jetstream_extra("max_file_store: 64MB").start().unwrap();
        let jsz = server.monitor_json("/jsz").unwrap();
        assert_eq!(jsz["config"]["max_storage"], 64 * 1024 * 1024, "{jsz}");
    }

    #[test]
    fn bad_config_fails_fast_with_the_log() {
        let started = Instant::now();
        let err = NatsServer::builder().extra_config("this is { not valid").start().unwrap_err();
        assert!(matches!(err, HarnessError::Exited { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains("log tail"), "{err}");
    }

    #[test]
    fn port_conflicts_are_retried_with_fresh_ports() {
        let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = squatter.local_addr().unwrap().port();
        let mut attempts = 0;
        let server = NatsServer::launch(Settings::default(), super::super::nats_server_binary().unwrap(), || {
            attempts += 1;
            let fresh = process::free_ports(2)?;
            Ok(Ports { client: if attempts == 1 { taken } else { fresh[0] }, monitor: fresh[1], cluster: None })
        })
        .unwrap();
        assert_eq!(attempts, 2);
        assert_ne!(server.port(), taken);
        assert!(server.is_running());
    }

    #[test]
    fn another_servers_monitor_port_is_not_mistaken_for_ours() {
        let other = NatsServer::builder().jetstream(false).start().unwrap();
        let mut attempts = 0;
        let server = NatsServer::launch(
            Settings { jetstream: false, ..Settings::default() },
            super::super::nats_server_binary().unwrap(),
            || {
                attempts += 1;
                let fresh = process::free_ports(2)?;
                Ok(Ports {
                    client: fresh[0],
                    monitor: if attempts == 1 { other.monitor_port() } else { fresh[1] },
                    cluster: None,
                })
            },
        )
        .unwrap();
        assert_eq!(attempts, 2);
        assert_ne!(server.monitor_port(), other.monitor_port());
        let varz = server.monitor_json("/varz").unwrap();
        assert_eq!(varz["port"], server.port());
    }

    #[test]
    fn drop_kills_the_process() {
        let server = NatsServer::start().unwrap();
        let pid = server.pid().unwrap() as libc::pid_t;
        let dir = server.store_dir().to_path_buf();
        drop(server);
        // SAFETY: signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "nats-server {pid} survived drop");
        assert!(!dir.exists());
    }
}
