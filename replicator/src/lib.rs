//! Chorus replicator: federates streams across sites without loss or duplicates.
//!
//! A [`Replicator`] runs one copier per configured (link, stream): it replays the source
//! stream from the sequence after its durable [`checkpoint`], prepares each event (loop
//! prevention, [`sampling`] of alive events, subject [`rewrite`], site provenance), publishes
//! the batch to the target keeping the event id (the target's dedupe key), and only then
//! moves the checkpoint. A crash between publish and checkpoint re-sends at most the batches
//! in flight, which the target's dedupe window drops: at-least-once transport plus dedupe by
//! id gives exactly the source's events in the target.
//!
//! Reading the next batch overlaps with publishing the current one, and the target's acks are
//! pipelined, so throughput is bounded by the target's store rate rather than round trips;
//! the reader waits when the publisher is behind (backpressure), so memory stays bounded.
//!
//! * [`config`] — typed YAML configuration of links, endpoints, streams, sampling.
//! * [`metrics`] — Prometheus counters and gauges per link and stream, and health, served
//!   on `/metrics` and `/healthz` by the runtime's ops router.

pub mod checkpoint;
pub mod config;
mod copier;
pub mod error;
pub mod metrics;
mod native;
mod path;
mod progress;
mod replicator;
pub mod rewrite;
pub mod sampling;

pub use config::{CopyPath, EndpointConfig, LinkConfig, ReplicatorConfig, SamplingConfig, StreamLink};
pub use error::ReplicatorError;
pub use replicator::{Monitor, Replicator, ReplicatorHandle};
