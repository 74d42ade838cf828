//! The Chorus service runtime: the plumbing every long-running part of Chorus is built
//! from, written once.
//!
//! * [`service`]: [`Shutdown`], [`Tasks`], [`Service`], [`Services`] and [`Health`]: how a
//!   part starts, reports its health and stops, and how a process stops many parts.
//! * [`ops`]: `/metrics` and `/healthz` for any set of parts ([`Ops`]).
//! * [`config`]: reading configuration files, with errors that name the file and the
//!   field ([`ConfigError`]).
//! * [`backoff`]: the one exponential [`Backoff`] between retries.
//! * [`store`]: local state in sled: opening with lock retry, group-commit flushes.
//! * [`tls`]: TLS client settings and the one rustls client builder.
//! * [`logging`]: how every Chorus program logs.
//!
//! The runtime sits below the backbone and knows nothing of events or streams; the
//! platform's own streams and the ways onto them are `chorus-platform`.

pub mod backoff;
pub mod config;
pub mod exposition;
pub mod files;
pub mod logging;
pub mod ops;
pub mod service;
pub mod store;
pub mod tls;

pub use backoff::{Backoff, Retry};
pub use config::{Config, ConfigError};
pub use ops::{register_counters, register_gauges, Observable, Ops};
pub use service::{BoxError, Health, Service, ServiceError, Services, Shutdown, StopErrors, TaskMonitor, Tasks};
pub use store::{Store, StoreError, StoreOptions};
pub use tls::TlsClientConfig;
