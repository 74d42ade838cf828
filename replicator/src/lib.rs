//! Chorus replicator: federates streams across sites without loss or duplicates.
//!
//! Work on this crate is tracked by issue [3]; it is intentionally empty until then.
