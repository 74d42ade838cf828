//! Chorus producers: the node agent (lifecycle events, offline outbox, autonomous agents,
//! RPC server with Action Policy), the AAA service and the load simulator.
//!
//! Work on this crate is tracked by issue [2] and [5]; it is intentionally empty until then.
