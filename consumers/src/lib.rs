//! Chorus consumers: projections built by replaying streams (inventory, provisioner,
//! audit export to SIEM, version dashboard).
//!
//! Work on this crate is tracked by issue [4]; it is intentionally empty until then.
