//! Chorus event model: typed events after Choria's formats, their CloudEvents 1.0 envelope,
//! the NATS subject scheme, and JSON Schemas generated from the types.
//!
//! Producers build a document with its constructor (which fills `protocol`, ids and the
//! timestamp), wrap it with [`EventRecord::new`] and publish [`EventRecord::encode`] on
//! [`EventRecord::nats_subject`]. Consumers call [`EventRecord::decode`] on whatever arrives —
//! Chorus or Choria, CloudEvents or Choria's legacy lifecycle format — and match on
//! [`Event`].
//!
//! ```
//! use chorus_schemas::{lifecycle::Alive, Event, EventRecord};
//!
//! let record = EventRecord::new(Alive::new("node1.example.net", "server", "0.1.0", Some(1800)), 42);
//! let bytes = record.encode();
//! assert_eq!(record.nats_subject().unwrap(), "choria.lifecycle.event.alive.server");
//!
//! let decoded = EventRecord::decode(&bytes).unwrap();
//! assert_eq!(decoded, record);
//! assert_eq!(decoded.data.identity(), "node1.example.net");
//! ```

#![warn(missing_docs)]

pub mod audit;
pub mod envelope;
pub mod lifecycle;
pub mod machine;
pub mod reaction;
pub mod registration;
pub mod rpc;
pub mod schema;
pub mod signature;
pub mod subject;
mod util;

#[cfg(test)]
mod tests;

pub use audit::{AuditAction, AuditRecord};
pub use envelope::{DecodeError, Event, EventKind, EventRecord, EventSignature, CONTENT_TYPE, MAX_EVENT_BYTES};
pub use lifecycle::{Lifecycle, LifecycleType};
pub use machine::{MachineInstance, Transition, WatcherDetails, WatcherState};
pub use reaction::{Reaction, ReactionOutcome};
pub use registration::Registration;
pub use rpc::{RpcReply, RpcRequest, StatusCode};
pub use subject::SubjectError;
