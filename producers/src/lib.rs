//! Chorus producers: the node and what runs on it, and the simulator of many nodes.
//!
//! * [`lifecycle`]: startup, alive (interval with splay), shutdown, provisioned, upgraded.
//! * [`machine`]: autonomous agents, finite state machines from YAML manifests with watchers.
//! * [`agents_dir`]: the built-in agents and the external ones, reloaded on change.
//! * [`agent`]: the node agent that runs all of the above with the outbox and the RPC
//!   server (`chorus agent`), as a runtime service.
//! * [`registration`]: the node's metadata (facts, classes, agents) published for discovery.
//! * [`simulator`]: thousands of simulated nodes in one process over a few connections.
//!
//! What they emit goes through `chorus-platform` (emitter, outbox); the RPC server they
//! host is `chorus-rpc`.

pub mod agent;
pub mod agents_dir;
pub mod enrolment;
pub mod error;
pub mod lifecycle;
pub mod machine;
pub mod registration;
pub mod scout;
pub mod simulator;

pub use error::ProducerError;
