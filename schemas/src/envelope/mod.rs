//! The envelope every Chorus event travels in: a CloudEvents 1.0 structured-mode JSON
//! document, as Choria uses for lifecycle and machine events, plus two extension attributes
//! Choria lacks:
//!
//! * `seq` — a per-producer, monotonically increasing sequence, so consumers detect gaps and
//!   projections apply each event once. `0` means "unsequenced" (every Choria-produced event)
//!   and is left off the wire; Chorus producers therefore start at 1.
//! * `site` — where the event was produced, kept when events are replicated between sites.
//! * `sigkey`, `sig` and `sigcred` — an optional signature of the record (key id, base64
//!   signature, and the producer's credential binding that key to the node), see
//!   [`crate::signature`]. Decoding keeps them as received; checking them is the
//!   [`crate::signature::Verifier`]'s job.
//!
//! The CloudEvents `id` is the event id and the dedupe key (use it as `Nats-Msg-Id`).
//! Decoding treats its input as hostile: it never panics, bounds size and nesting, and says
//! precisely what is wrong through [`DecodeError`].

/// Largest encoded event [`EventRecord::decode`] accepts: 1 MiB, NATS's default max payload.
/// An event larger than this could not have been published, so it is rejected before parsing.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// `datacontenttype` of every Chorus event.
pub const CONTENT_TYPE: &str = "application/json";

/// Name of the sequence extension attribute.
pub(crate) const SEQ: &str = "seq";
/// Name of the site extension attribute.
pub(crate) const SITE: &str = "site";
/// Name of the signature key id extension attribute.
pub(crate) const SIGKEY: &str = "sigkey";
/// Name of the signature extension attribute.
pub(crate) const SIG: &str = "sig";
/// Name of the signer's credential extension attribute.
pub(crate) const SIGCRED: &str = "sigcred";
mod decode;
mod error;
mod event;
mod record;
mod rfc3339;
mod skipped;
mod wire;

pub(crate) use decode::source_for_type;
pub use error::DecodeError;
pub use event::{Event, EventKind};
pub use record::{EventRecord, EventSignature};
