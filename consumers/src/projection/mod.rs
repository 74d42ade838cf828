//! The projection framework: views built by replaying a stream, exactly once.
//!
//! Chorus keeps no state outside its streams, so every read model (inventory, version
//! dashboard, provisioner queue) is a *view*: a fold of a stream's events, stored locally so
//! queries are cheap. What makes such a view trustworthy is that it can be thrown away and
//! rebuilt at any time and come out the same, and that a crash never applies an event twice
//! or skips one. This module provides that once, for every view:
//!
//! * A [`View`] applies one decoded event at a time, staging its writes in a [`Txn`]. It does
//!   no I/O of its own and keeps no state outside the store.
//! * A [`Projector`] replays the view's stream from the checkpoint, applies events in stream
//!   order in batches, and commits each batch **together with the last applied stream
//!   sequence** to the view's state, held in memory. The state is persisted as snapshots
//!   (see [`Store`]): the changed part of the state with its checkpoint in one atomic sled
//!   batch, then flushed. After a crash the store holds the last snapshot, state and
//!   checkpoint alike, so replaying from `checkpoint + 1` applies every event exactly once.
//!   Rebuilding ([`Store::reset`] or [`Projector::rebuild`]) starts an empty generation from
//!   the first sequence and, because views are deterministic folds, reaches the same state.
//! * Messages that do not decode (or that a view rejects) do not stop the projector: they go to
//!   the dead-letter stream (`chorus.deadletter.<view>`, see [`chorus_platform::deadletter`]) with the
//!   reason and their origin, are counted, and the checkpoint moves past them.
//!
//! ```no_run
//! # async fn demo(backbone: std::sync::Arc<dyn chorus_backbone::Backbone>) -> Result<(), Box<dyn std::error::Error>> {
//! use chorus_consumers::projection::{Projector, Store, Txn, View, ViewError};
//! use chorus_schemas::EventRecord;
//!
//! /// Events per node identity.
//! struct PerNode;
//!
//! impl View for PerNode {
//!     fn name(&self) -> &str {
//!         "per_node"
//!     }
//!     fn apply(&mut self, _seq: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
//!         let key = format!("n/{}", record.subject);
//!         let n: u64 = txn.get_json(key.as_bytes())?.unwrap_or(0);
//!         txn.insert_json(key.as_bytes(), &(n + 1))
//!     }
//! }
//!
//! let store = Store::open("views")?;
//! let mut projector = Projector::new(backbone, "CHORUS_LIFECYCLE", &store, PerNode)?;
//! projector.catch_up().await?; // or .run(shutdown) to follow the stream
//! println!("{:?}", projector.progress().snapshot());
//! # Ok(()) }
//! ```

use chorus_backbone::BackboneError;
use chorus_schemas::subject::SubjectError;
use sled::IVec;

mod identity;
mod progress;
mod projector;
mod store;

#[cfg(test)]
mod tests;

pub use progress::{Progress, ProgressSnapshot, RunStats};
pub use projector::{Projector, ProjectorOptions, View};
pub use store::{Store, Txn, ViewState};

/// Keys starting with this byte belong to the framework (checkpoint, counters); view keys
/// must not start with it, so a view can never overwrite its own checkpoint.
const RESERVED: u8 = 0;
/// Last applied stream sequence, u64 big-endian, written in every commit.
const CHECKPOINT_KEY: &[u8] = b"\0checkpoint";
/// Messages dead-lettered so far, u64 big-endian, committed with the checkpoint so a rebuild
/// reproduces it.
const DEAD_LETTERS_KEY: &[u8] = b"\0dead_letters";
/// The stream the view is built from: its checkpoint is a sequence of that stream, so a view
/// pointed at another stream (Choria's `CHORIA_EVENTS` instead of `CHORUS_LIFECYCLE`) is
/// rebuilt rather than resumed at a meaningless sequence.
const STREAM_KEY: &[u8] = b"\0stream";

/// Why a projection stopped. Malformed events are not errors (they are dead-lettered); these
/// are failures of the store, of the backbone, or of a view's own logic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The local view store (sled) failed: disk full, I/O error, corruption.
    #[error("view store: {0}")]
    Storage(#[from] sled::Error),
    /// Opening or flushing the view store failed.
    #[error("view store: {0}")]
    Store(#[from] chorus_runtime::StoreError),
    /// Reading the stream or publishing a dead letter failed.
    #[error("backbone: {0}")]
    Backbone(#[from] BackboneError),
    /// The view failed on an event for a reason other than rejecting it.
    #[error("view {view} failed on {stream} sequence {sequence}: {source}")]
    View {
        /// The view's name.
        view: String,
        /// The stream being replayed.
        stream: String,
        /// Sequence of the event the view failed on; nothing of its batch was committed.
        sequence: u64,
        /// What the view reported.
        #[source]
        source: ViewError,
    },
    /// The view's name cannot name its dead-letter subject (`chorus.deadletter.<name>`).
    #[error("view name {name:?} is unusable: {source}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why.
        #[source]
        source: SubjectError,
    },
    /// A framework key holds something the framework did not write.
    #[error("view store is corrupt: {0}")]
    Corrupt(String),
    /// Reading a view's committed state failed (queries).
    #[error("view state: {0}")]
    State(#[from] ViewError),
}

/// What a [`View`] reports from [`View::apply`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The event decoded but the view cannot apply it: it is dead-lettered with this reason
    /// (code `rejected`) and the projector goes on. The view must reject **before** staging
    /// any write for the event, since the batch's other events are still committed.
    #[error("{0}")]
    Reject(String),
    /// Reading the view's state failed.
    #[error("view store: {0}")]
    Storage(#[from] sled::Error),
    /// Stored state does not deserialize; the projector stops (a rebuild repairs it).
    #[error("corrupt view state at {key:?}: {reason}")]
    Corrupt {
        /// The key whose value is unreadable (lossy UTF-8).
        key: String,
        /// Why.
        reason: String,
    },
    /// A key is empty or starts with the byte 0, which the framework reserves.
    #[error("view key {0:?} is empty or starts with the reserved byte 0")]
    ReservedKey(String),
}

/// A framework counter (checkpoint, dead letters): big-endian u64, 0 when absent.
fn be_u64(value: Option<IVec>, what: &str) -> Result<u64, ProjectionError> {
    Ok(chorus_runtime::store::read_u64(value, what)?.unwrap_or(0))
}
