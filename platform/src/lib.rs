//! The Chorus platform on a backbone: its streams, how events get onto them, and where the
//! ones nobody can use go.
//!
//! * [`streams`]: the platform streams (lifecycle, machine, RPC, audit, dead letters),
//!   created the same way on every backbone.
//! * [`emitter`]: [`Emitter`] stamps documents into sequenced CloudEvents records and hands
//!   them to an [`EventSink`]: a backbone ([`BackboneSink`]), the node's outbox, or a
//!   signing wrapper ([`SigningSink`]).
//! * [`outbox`]: the node's durable local queue and the forwarder that ships it to the site.
//! * [`reading`]: opening durable consumers on streams that may not exist yet, with the
//!   reason shown in health.
//! * [`election`]: leader election for active-standby instances, on key-value buckets.
//! * [`governor`]: fleet-wide semaphores with expiring leases, on key-value buckets.
//! * [`deadletter`]: messages a consumer could not process, kept on `CHORUS_DEADLETTER`
//!   with the reason.
//!
//! Every producer (node agent, AAA, provisioner, simulator) and every consumer uses these,
//! which is why they sit on their own floor above the backbone and below RPC and the
//! services.

pub mod deadletter;
pub mod election;
pub mod emitter;
mod error;
pub mod governor;
pub mod outbox;
pub mod reading;
pub mod streams;

pub use emitter::{
    take_failure, to_message, until_failure, BackboneSink, Emitter, EventSink, MemorySink, RecordFlow, SigningSink,
};
pub use error::PlatformError;
pub use outbox::{Outbox, OutboxLimits, OutboxStats};
pub use reading::{open_consumer, ReadStatus};
pub use streams::{
    capturing, drift, ensure_platform_streams, missing_subjects, platform_streams, resolve_platform_streams,
    PlatformStreams, StreamDrift, StreamLimits, StreamMap,
};
