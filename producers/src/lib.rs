//! Chorus producers: everything that creates events.
//!
//! * [`emitter`]: stamps documents into sequenced CloudEvents and hands them to a sink.
//! * [`outbox`]: the node's durable local queue and the forwarder that ships it to the site.
//! * [`lifecycle`]: startup, alive (interval with splay), shutdown, provisioned, upgraded.
//! * [`machine`]: autonomous agents, finite state machines from YAML manifests with watchers.
//! * [`rpc`]: the RPC server with its agents and default-deny Action Policy, and the client.
//! * [`aaa`]: centralised AAA: login to short-lived tokens, a request signer, audited decisions.
//! * [`agent`]: the node agent that runs all of the above (`chorus agent`).
//! * [`simulator`]: thousands of simulated nodes in one process over a few connections.

pub mod aaa;
pub mod agent;
pub mod emitter;
pub mod error;
pub mod lifecycle;
pub mod machine;
pub mod outbox;
pub mod rpc;
pub mod simulator;
pub mod streams;

pub use emitter::{Emitter, EventSink};
pub use error::ProducerError;
