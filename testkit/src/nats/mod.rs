//! Real `nats-server` processes for tests: a single server ([`NatsServer`]) and an n-node
//! JetStream cluster ([`NatsCluster`]).
//!
//! Design notes, in short:
//!
//! * **Loopback only, free ports.** Each server listens on `127.0.0.1` on ports picked by
//!   binding port 0 and releasing it. That leaves a small window in which another process can
//!   take the port, so a start that fails with "address already in use" is retried with fresh
//!   ports (see [`HarnessError::PortInUse`]).
//! * **Own store, own log.** Each server gets a [`tempfile::TempDir`] holding its generated
//!   config file, its JetStream store and its log. The directory lives as long as the handle,
//!   so [`NatsServer::restart`] comes back with the same data.
//! * **Ready means ready.** A start returns only once `/healthz?js-enabled-only=true`
//!   answers `ok` *and* `/varz` proves the monitoring port belongs to this very server (so a
//!   port collision with another test's server cannot pass for readiness). A cluster start
//!   also waits for every node to see the same JetStream meta leader.
//! * **No orphans.** Dropping a handle kills its process. On Linux the process is also
//!   spawned with `PR_SET_PDEATHSIG`, so servers die even when the test process is killed
//!   (for example by nextest's `terminate-after`) and `Drop` never runs.

mod cluster;
mod leaf;
mod monitor;
pub(crate) mod process;
mod server;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use crate::error::{HarnessError, Result};
pub use cluster::{NatsCluster, NatsClusterBuilder};
pub use leaf::LeafnodeSites;
pub use server::{NatsServer, NatsServerBuilder};

/// A free loopback port (probably still free when the caller binds it), for listeners a
/// test configures itself: leafnode ports, syslog receivers, HTTP sinks.
pub fn free_port() -> std::io::Result<u16> {
    Ok(process::free_ports(1)?[0])
}

/// Environment variable naming the `nats-server` binary to use instead of searching.
pub const NATS_SERVER_ENV: &str = "CHORUS_NATS_SERVER";

/// Directories searched after `PATH`. Debian's `nats-server` package installs to
/// `/usr/sbin`, which is not on a non-root user's `PATH`.
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"];

/// Finds the `nats-server` executable.
///
/// Order: the path in `CHORUS_NATS_SERVER` (an error if it is set but not an executable
/// file, so a typo is not silently replaced by another binary), then every directory of
/// `PATH`, then `/usr/sbin`, `/usr/local/sbin`, `/usr/local/bin` and `/usr/bin`.
pub fn nats_server_binary() -> Result<PathBuf> {
    resolve_binary(std::env::var_os(NATS_SERVER_ENV), std::env::var_os("PATH"))
}

fn resolve_binary(explicit: Option<OsString>, path: Option<OsString>) -> Result<PathBuf> {
    if let Some(explicit) = explicit.filter(|value| !value.is_empty()) {
        let candidate = PathBuf::from(explicit);
        return if is_executable(&candidate) {
            Ok(candidate)
        } else {
            Err(HarnessError::BinaryNotFound(format!(
                "{NATS_SERVER_ENV}={} is not an executable file",
                candidate.display()
            )))
        };
    }
    let mut searched: Vec<PathBuf> = path.as_ref().map(|p| std::env::split_paths(p).collect()).unwrap_or_default();
    searched.extend(FALLBACK_DIRS.iter().map(PathBuf::from));
    for dir in &searched {
        let candidate = dir.join("nats-server");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(HarnessError::BinaryNotFound(format!("searched {NATS_SERVER_ENV}, PATH and {}", FALLBACK_DIRS.join(", "))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_binary(dir: &Path, executable: bool) -> PathBuf {
        let path = dir.join("nats-server");
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        let mode = if executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn explicit_env_wins_over_path() {
        let env_dir = tempfile::tempdir().unwrap();
        let path_dir = tempfile::tempdir().unwrap();
        let wanted = fake_binary(env_dir.path(), true);
        fake_binary(path_dir.path(), true);
        let found = resolve_binary(Some(wanted.clone().into()), Some(path_dir.path().as_os_str().to_owned())).unwrap();
        assert_eq!(found, wanted);
    }

    #[test]
    fn explicit_env_that_is_not_executable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = fake_binary(dir.path(), false);
        let err = resolve_binary(Some(bad.into()), None).unwrap_err();
        assert!(matches!(err, HarnessError::BinaryNotFound(_)), "{err}");
        assert!(err.to_string().contains(NATS_SERVER_ENV), "{err}");
    }

    #[test]
    fn path_is_searched_before_fallbacks() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = fake_binary(dir.path(), true);
        let found = resolve_binary(None, Some(dir.path().as_os_str().to_owned())).unwrap();
        assert_eq!(found, wanted);
    }

    #[test]
    fn empty_env_falls_back_to_search() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = fake_binary(dir.path(), true);
        let found = resolve_binary(Some(OsString::new()), Some(dir.path().as_os_str().to_owned())).unwrap();
        assert_eq!(found, wanted);
    }

    #[test]
    fn the_installed_server_is_found() {
        // The test environment is set up by scripts/setup, which installs nats-server.
        let found = nats_server_binary().expect("nats-server must be installed for the tests");
        assert!(is_executable(&found));
    }
}
