//! Test harness for Chorus: real `nats-server` processes for integration tests and for
//! `chorus bench`.
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
//!
//! The API is synchronous on purpose: starting a server is a few hundred milliseconds of
//! process spawning and polling, which is fine to do inline in `#[test]` and
//! `#[tokio::test]` functions alike, and keeps the harness usable from any runtime.
//!
//! ```no_run
//! use chorus_tests::nats::NatsServer;
//!
//! let server = NatsServer::start()?;
//! println!("clients connect to {}", server.url());
//! # Ok::<(), chorus_tests::HarnessError>(())
//! ```

pub mod child;
pub mod chromium;
pub mod conformance;
mod error;
pub mod nats;
pub mod pki;
pub mod rsyslog;

pub use error::{HarnessError, Result};
