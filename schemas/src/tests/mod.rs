//! Crate tests: round trips, Choria wire compatibility, hostile input, schema files.

mod decode_errors;
mod fuzz_loop;
pub(crate) mod rng;
mod roundtrip;
pub(crate) mod samples;
mod schema_files;
