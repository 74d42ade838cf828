//! The harness's one error type.
//!
//! Every failure that comes from a server process carries the tail of that server's log,
//! because "server not ready" alone is useless when a test fails in CI: the reason (a bad
//! config line, a port taken, a JetStream store that would not open) is always in the log.

use std::io;
use std::time::Duration;

/// Result alias used throughout the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Everything that can go wrong while running NATS servers for tests.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No usable `nats-server` executable was found.
    #[error(
        "nats-server binary not found: {0}; run scripts/setup (Debian package nats-server) \
         or set CHORUS_NATS_SERVER to the binary"
    )]
    BinaryNotFound(String),

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The server could not bind one of its ports. Ports are picked by binding port 0 and
    /// releasing it, so another process can take one in between; fresh starts retry with new
    /// ports, restarts (which must keep their ports) retry the same ports for a while.
    #[error("nats-server `{server}` could not bind its ports ({detail}); log tail:\n{log_tail}")]
    PortInUse {
        /// The server's name.
        server: String,
        /// The log line that reported the conflict.
        detail: String,
        /// The last lines of this run's log.
        log_tail: String,
    },

    /// The server process exited before it became ready.
    #[error("nats-server `{server}` exited with {status} before it was ready; log tail:\n{log_tail}")]
    Exited {
        /// The server's name.
        server: String,
        /// The exit status, as printed by the OS.
        status: String,
        /// The last lines of this run's log.
        log_tail: String,
    },

    /// The server kept running but did not report healthy in time.
    #[error("nats-server `{server}` not ready after {waited:?}: {problem}; log tail:\n{log_tail}")]
    NotReady {
        /// The server's name.
        server: String,
        /// How long the harness waited.
        waited: Duration,
        /// The last thing the readiness check saw.
        problem: String,
        /// The last lines of this run's log.
        log_tail: String,
    },

    /// The cluster's nodes are up but did not agree on a JetStream meta leader in time.
    #[error("NATS cluster not ready after {waited:?}: {problem}\n{log_tails}")]
    ClusterNotReady {
        /// How long the harness waited.
        waited: Duration,
        /// The last thing the readiness check saw.
        problem: String,
        /// The last log lines of every node, one block per node.
        log_tails: String,
    },

    /// A request to a server's HTTP monitoring endpoint failed.
    #[error("monitoring request GET {path} on 127.0.0.1:{port} failed: {detail}")]
    Monitor {
        /// The monitoring port.
        port: u16,
        /// The request path, with query.
        path: String,
        /// What went wrong (connection, status, body).
        detail: String,
    },

    /// A cluster node index out of range.
    #[error("no node {index} in a cluster of {len}")]
    NoSuchNode {
        /// The requested index.
        index: usize,
        /// The cluster size.
        len: usize,
    },

    /// An `rsyslogd` process (see [`crate::rsyslog`]) could not be found, did not start
    /// listening, or exited; the message carries the tail of its output.
    #[error("rsyslogd: {0}")]
    Rsyslog(String),

    /// The harness was asked for something it cannot do.
    #[error("invalid harness request: {0}")]
    Invalid(String),

    /// A workspace program a test runs could not be found or built.
    #[error("test setup: {0}")]
    Setup(String),
}

impl HarnessError {
    /// True when the failure was a port conflict, which a retry may cure.
    pub fn is_port_conflict(&self) -> bool {
        matches!(self, HarnessError::PortInUse { .. })
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        HarnessError::Io { context: context.into(), source }
    }
}
