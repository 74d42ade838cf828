//! Chorus consumers: views built by replaying streams, and sinks that carry events out.
//!
//! * [`projection`] — the framework: a view applies events in stream order, keeps its state
//!   in memory and snapshots it with the last applied stream sequence in one atomic sled
//!   batch, so a restart resumes exactly where it stopped and a rebuild from sequence 0 gives
//!   the same state.
//! * [`inventory`] — nodes with identity, component, version, facts, last seen and status.
//! * [`audit_export`] — audit and RPC records out to a SIEM (syslog RFC 5424/5425, Splunk
//!   HEC, JSON lines), at-least-once.
//! * [`provisioner`] — configures nodes that start in provisioning mode over RPC, once each.
//! * [`dashboard`] — the version dashboard and its JSON API over the inventory.
//! * [`events`] — filtered reads of the streams (`chorus events tail`).
//!
//! Messages a consumer cannot use go to the dead-letter stream
//! (`chorus_platform::deadletter`); every long-running consumer is a runtime service.

pub mod audit_export;
pub mod dashboard;
pub mod events;
pub mod inventory;
pub mod projection;
pub mod provisioner;
pub mod reactor;
