//! Test harness for Chorus: real `nats-server` processes (and rsyslog, Chromium, a test PKI)
//! for the tests of every crate, the system tests and `chorus bench`.
//!
//! Chorus keeps its truth in JetStream streams, so the behaviour that matters (durability
//! across restarts, replication across a cluster, losing a node) can only be checked against
//! a real server. Mocks would test our assumptions about JetStream rather than JetStream.
//! This crate therefore starts genuine `nats-server` processes, each on its own free loopback
//! ports with its own throw-away store directory, and tears them down when the handle drops.
//!
//! * [`nats::NatsServer`] — one server, JetStream on by default.
//! * [`nats::NatsCluster`] — an n-node JetStream cluster with a meta leader elected.
//! * [`nats::nats_server_binary`] — where the `nats-server` binary is found.
//! * [`rsyslog::Rsyslog`] — a real `rsyslogd` (TCP or TLS listener) for the SIEM export tests.
//! * [`conformance`] — the suite every backbone engine is held to.
//! * [`eventually()`] — the one way tests wait for something to become true.
//! * [`workspace_bin`] — the workspace's programs (`chorus`, test helpers) for system tests.
//! * [`disk::SmallDisk`] — a size-limited tmpfs to fill (a full disk) and free under a test.
//!
//! The harness is a leaf: it depends on nothing above the backbone, so every crate can use
//! it in its own tests without a dependency cycle.
//!
//! The API is synchronous on purpose: starting a server is a few hundred milliseconds of
//! process spawning and polling, which is fine to do inline in `#[test]` and
//! `#[tokio::test]` functions alike, and keeps the harness usable from any runtime.
//!
//! ```no_run
//! use chorus_testkit::nats::NatsServer;
//!
//! let server = NatsServer::start()?;
//! println!("clients connect to {}", server.url());
//! # Ok::<(), chorus_testkit::HarnessError>(())
//! ```

pub mod bins;
pub mod child;
pub mod chromium;
pub mod conformance;
pub mod disk;
mod error;
mod eventually;
pub mod nats;
pub mod pki;
pub mod rsyslog;

pub use bins::workspace_bin;
pub use error::{HarnessError, Result};
pub use eventually::{eventually, eventually_blocking, eventually_true};
