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
//!   sequence** in one atomic sled batch (then flushes). After a crash the store holds some
//!   prefix of committed batches, state and checkpoint alike, so replaying from
//!   `checkpoint + 1` applies every event exactly once. Rebuilding ([`Store::reset`] or
//!   [`Projector::rebuild`]) starts an empty generation from the first sequence and, because
//!   views are deterministic folds, reaches the same state.
//! * Messages that do not decode (or that a view rejects) do not stop the projector: they go to
//!   the dead-letter stream (`chorus.deadletter.<view>`, see [`crate::deadletter`]) with the
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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Backbone, BackboneError, ReplayOptions, StartPosition, StoredMessage};
use chorus_schemas::subject::{validate_token, SubjectError};
use chorus_schemas::EventRecord;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::IVec;

use crate::deadletter::{self, DeadLetter};

/// Keys starting with this byte belong to the framework (checkpoint, counters); view keys
/// must not start with it, so a view can never overwrite its own checkpoint.
const RESERVED: u8 = 0;
/// Last applied stream sequence, u64 big-endian, written in every commit.
const CHECKPOINT_KEY: &[u8] = b"\0checkpoint";
/// Messages dead-lettered so far, u64 big-endian, committed with the checkpoint so a rebuild
/// reproduces it.
const DEAD_LETTERS_KEY: &[u8] = b"\0dead_letters";

/// Why a projection stopped. Malformed events are not errors (they are dead-lettered); these
/// are failures of the store, of the backbone, or of a view's own logic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The local view store (sled) failed: disk full, I/O error, corruption.
    #[error("view store: {0}")]
    Storage(#[from] sled::Error),
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

fn be_u64(value: Option<IVec>, what: &str) -> Result<u64, ProjectionError> {
    match value {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(&v[..])
            .map(u64::from_be_bytes)
            .map_err(|_| ProjectionError::Corrupt(format!("{what} is {} bytes, not 8", v.len()))),
    }
}

/// The local sled database holding any number of views. Cheap to clone.
///
/// Each view lives in its own tree, named by the view and a *generation*. Resetting a view
/// switches to a new, empty generation with one atomic write and drops the old tree after, so
/// a crash in the middle of a rebuild leaves either the old view or an empty one, never a mix
/// of old state and a cleared checkpoint.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Opens (creating if needed) the store in directory `path`. Views rewrite the same keys
    /// over and over, so sled runs in its high-throughput mode (faster writes, more space
    /// before its log is compacted).
    ///
    /// A store just closed in this process (a restarted projector) can keep its file lock
    /// for a moment while sled's background flush of the old handle ends, so a held lock is
    /// retried for up to two seconds before it is reported.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let config = sled::Config::new().path(path.as_ref()).mode(sled::Mode::HighThroughput);
        let mut attempts = 0;
        loop {
            match config.open() {
                Ok(db) => return Ok(Store { db }),
                Err(e) if attempts < 40 && e.to_string().contains("could not acquire lock") => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A store in memory, removed when dropped (tests, benchmarks).
    pub fn temporary() -> Result<Self, ProjectionError> {
        Ok(Store { db: sled::Config::new().temporary(true).open()? })
    }

    /// Wraps an open sled database.
    pub fn from_db(db: sled::Db) -> Self {
        Store { db }
    }

    fn generation_key(view: &str) -> String {
        format!("chorus/view/{view}/generation")
    }

    fn tree_name(view: &str, generation: u64) -> String {
        format!("chorus/view/{view}/{generation}")
    }

    /// The current state of view `name` (empty, checkpoint 0, when never built).
    pub fn state(&self, name: &str) -> Result<ViewState, ProjectionError> {
        let generation = be_u64(self.db.get(Self::generation_key(name))?, "view generation")?;
        self.state_at(name, generation)
    }

    fn state_at(&self, name: &str, generation: u64) -> Result<ViewState, ProjectionError> {
        let tree = self.db.open_tree(Self::tree_name(name, generation))?;
        Ok(ViewState { name: name.into(), generation, tree })
    }

    /// Discards view `name`: its state becomes empty with checkpoint 0, so the next projector
    /// rebuilds it from the first sequence. [`ViewState`]s obtained before keep reading the
    /// old generation until dropped; take new ones.
    pub fn reset(&self, name: &str) -> Result<ViewState, ProjectionError> {
        let old = self.state(name)?;
        let next = old.generation + 1;
        self.db.insert(Self::generation_key(name), &next.to_be_bytes())?;
        self.db.flush()?;
        self.db.drop_tree(Self::tree_name(name, old.generation))?;
        self.state_at(name, next)
    }

    /// Flushes everything to disk.
    pub async fn flush(&self) -> Result<(), ProjectionError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

/// Read access to one view's committed state. Cheap to clone and safe to share with query
/// handlers while a projector writes: each batch becomes visible as it is committed.
#[derive(Clone)]
pub struct ViewState {
    name: Arc<str>,
    generation: u64,
    tree: sled::Tree,
}

impl std::fmt::Debug for ViewState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewState").field("name", &self.name).field("generation", &self.generation).finish()
    }
}

impl ViewState {
    /// The view's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last stream sequence whose effects are in this state (0 = none).
    pub fn checkpoint(&self) -> Result<u64, ProjectionError> {
        be_u64(self.tree.get(CHECKPOINT_KEY)?, "checkpoint")
    }

    /// Messages dead-lettered while building this state.
    pub fn dead_letters(&self) -> Result<u64, ProjectionError> {
        be_u64(self.tree.get(DEAD_LETTERS_KEY)?, "dead-letter count")
    }

    /// The committed value at `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<IVec>, ViewError> {
        Ok(self.tree.get(key)?)
    }

    /// The committed value at `key`, as JSON.
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, ViewError> {
        self.get(key)?.map(|v| from_json(key, &v)).transpose()
    }

    /// Committed entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> impl Iterator<Item = Result<(IVec, IVec), ViewError>> + '_ {
        self.tree
            .scan_prefix(prefix)
            .filter(|kv| !matches!(kv, Ok((k, _)) if k.first() == Some(&RESERVED)))
            .map(|kv| kv.map_err(ViewError::from))
    }

    /// Every entry, framework keys included: two states with equal dumps are the same view at
    /// the same checkpoint. For tests and rebuild checks.
    pub fn dump(&self) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, ProjectionError> {
        self.tree.iter().map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into)).collect()
    }
}

fn from_json<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, ViewError> {
    serde_json::from_slice(value)
        .map_err(|e| ViewError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
}

/// Values this projector committed, kept in memory so that reading back a key the view wrote
/// (every alive event reads its node) is a hash lookup instead of a sled tree walk. Only the
/// projector writes its view, so the cache cannot go stale; it is cleared when it outgrows its
/// limit.
#[derive(Debug, Default)]
struct WriteCache {
    map: HashMap<IVec, Option<IVec>>,
    limit: usize,
}

impl WriteCache {
    fn new(limit: usize) -> Self {
        WriteCache { map: HashMap::new(), limit }
    }

    fn absorb(&mut self, writes: Vec<(IVec, Option<IVec>)>) {
        if self.map.len() + writes.len() > self.limit {
            self.map.clear();
        }
        if writes.len() <= self.limit {
            self.map.extend(writes);
        }
    }
}

/// The writes of one batch of events, not yet committed. Reads see the batch's own writes
/// first (two events of one node in one batch build on each other), then the committed state.
/// Writes to one key within a batch collapse into one, so hot keys cost one store write per
/// batch.
pub struct Txn<'a> {
    state: &'a ViewState,
    cache: Option<&'a WriteCache>,
    pending: HashMap<IVec, Option<IVec>>,
}

impl<'a> Txn<'a> {
    fn new(state: &'a ViewState, cache: Option<&'a WriteCache>, capacity: usize) -> Self {
        Txn { state, cache, pending: HashMap::with_capacity(capacity) }
    }

    fn check(key: &[u8]) -> Result<(), ViewError> {
        match key.first() {
            None | Some(&RESERVED) => Err(ViewError::ReservedKey(String::from_utf8_lossy(key).into_owned())),
            Some(_) => Ok(()),
        }
    }

    /// The value at `key` as of the events applied so far.
    pub fn get(&self, key: &[u8]) -> Result<Option<IVec>, ViewError> {
        if let Some(v) = self.pending.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.cache.and_then(|c| c.map.get(key)) {
            return Ok(v.clone());
        }
        self.state.get(key)
    }

    /// [`Txn::get`] as JSON.
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, ViewError> {
        self.get(key)?.map(|v| from_json(key, &v)).transpose()
    }

    /// Stages `value` at `key`. Keys must not be empty or start with the byte 0.
    pub fn insert(&mut self, key: &[u8], value: impl Into<IVec>) -> Result<(), ViewError> {
        Self::check(key)?;
        let value = Some(value.into());
        match self.pending.get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                self.pending.insert(IVec::from(key), value);
            }
        }
        Ok(())
    }

    /// Stages `value` as JSON at `key`.
    pub fn insert_json<T: Serialize + ?Sized>(&mut self, key: &[u8], value: &T) -> Result<(), ViewError> {
        let bytes = serde_json::to_vec(value).expect("view values serialize to JSON");
        self.insert(key, bytes)
    }

    /// Stages the removal of `key`.
    pub fn remove(&mut self, key: &[u8]) -> Result<(), ViewError> {
        Self::check(key)?;
        self.pending.insert(IVec::from(key), None);
        Ok(())
    }

    /// The view's name.
    pub fn view(&self) -> &str {
        self.state.name()
    }

    /// An empty transaction on `state`, for unit tests of views.
    #[cfg(test)]
    pub(crate) fn for_tests(state: &'a ViewState) -> Self {
        Txn::new(state, None, 16)
    }

    /// Commits with checkpoint `checkpoint`, for unit tests of views.
    #[cfg(test)]
    pub(crate) fn commit_for_tests(self, checkpoint: u64) {
        self.commit(checkpoint, 0).expect("commit");
    }

    /// Applies the staged writes with the new checkpoint as one atomic sled batch, and returns
    /// them (for the write cache).
    fn commit(self, checkpoint: u64, dead_letters: u64) -> Result<Vec<(IVec, Option<IVec>)>, ProjectionError> {
        let mut batch = sled::Batch::default();
        let mut writes = Vec::with_capacity(self.pending.len());
        for (key, value) in self.pending {
            match &value {
                Some(v) => batch.insert(key.clone(), v.clone()),
                None => batch.remove(key.clone()),
            }
            writes.push((key, value));
        }
        batch.insert(CHECKPOINT_KEY, &checkpoint.to_be_bytes());
        batch.insert(DEAD_LETTERS_KEY, &dead_letters.to_be_bytes());
        self.state.tree.apply_batch(batch)?;
        Ok(writes)
    }
}

/// A read model folded from one stream.
///
/// Rules that make rebuilds and crash recovery exact:
/// * all state goes through the [`Txn`] (no files, no network, no state kept in `self` that a
///   restart would lose);
/// * `apply` is deterministic: the same events in the same order give the same writes (use
///   the event's own time, never the wall clock);
/// * return [`ViewError::Reject`] before staging writes for the rejected event.
pub trait View: Send + 'static {
    /// Stable name: the store tree, the dead-letter subject token (`chorus.deadletter.<name>`)
    /// and labels. Letters, digits, `_` and `-`; changing it starts a new, empty view.
    fn name(&self) -> &str;

    /// Subject filters within the stream (empty = every message). Messages filtered out are
    /// never delivered, so the checkpoint can trail the stream's last sequence by them.
    fn filter_subjects(&self) -> Vec<String> {
        Vec::new()
    }

    /// Applies the event stored at stream sequence `sequence`.
    fn apply(&mut self, sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError>;
}

/// Tuning of a [`Projector`].
#[derive(Clone, Debug)]
pub struct ProjectorOptions {
    /// Most events per commit. A batch is whatever has arrived, up to this: large batches
    /// amortise the commit and flush while catching up; at the head of the stream each event
    /// is committed as it arrives.
    pub max_batch: usize,
    /// How often a following projector refreshes the stream's last sequence for the lag.
    pub stream_info_every: Duration,
    /// Flush the store to disk after commits: at most one flush is in flight, overlapping the
    /// next batches, and [`Progress`] reports only flushed sequences. Exactly-once holds
    /// without it (sled recovers a prefix of atomic batches); flushing bounds how much is
    /// re-applied after a power loss and keeps the dead-letter dedupe window meaningful.
    pub flush: bool,
    /// Most entries the projector keeps in memory of what it wrote, so the view reads its own
    /// recent writes without a store lookup (about 100-200 bytes each for the inventory); 0
    /// disables it.
    pub cache_entries: usize,
    /// When set, only events signed by a key it trusts are applied; unsigned, forged or
    /// tampered events go to the dead-letter stream with the reason
    /// ([`chorus_schemas::signature::VerifyError::code`]: `unsigned`, `unknown_key`,
    /// `bad_signature`, `malformed_signature`) and the projector goes on.
    pub verifier: Option<std::sync::Arc<chorus_schemas::signature::Verifier>>,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        ProjectorOptions {
            max_batch: 2_000,
            stream_info_every: Duration::from_secs(1),
            flush: true,
            cache_entries: 250_000,
            verifier: None,
        }
    }
}

/// Live counters of a projector, shared with whoever reports them (HTTP, CLI, tests).
#[derive(Debug)]
pub struct Progress {
    view: String,
    stream: String,
    applied_sequence: AtomicU64,
    stream_last_sequence: AtomicU64,
    applied: AtomicU64,
    dead_lettered: AtomicU64,
    batches: AtomicU64,
    committed: tokio::sync::watch::Sender<u64>,
}

/// A copy of [`Progress`] at one moment, as served to dashboards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// The view.
    pub view: String,
    /// The stream it is built from.
    pub stream: String,
    /// Last stream sequence committed into the view and flushed.
    pub applied_sequence: u64,
    /// Last sequence of the stream when last asked.
    pub stream_last_sequence: u64,
    /// `stream_last_sequence - applied_sequence`: events still to apply (an upper bound when
    /// the view filters subjects).
    pub lag: u64,
    /// Events applied by this process.
    pub applied: u64,
    /// Messages dead-lettered by this process.
    pub dead_lettered: u64,
    /// Batches committed by this process.
    pub batches: u64,
}

impl Progress {
    fn new(view: &str, stream: &str, checkpoint: u64) -> Self {
        Progress {
            view: view.into(),
            stream: stream.into(),
            applied_sequence: AtomicU64::new(checkpoint),
            stream_last_sequence: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            committed: tokio::sync::watch::channel(checkpoint).0,
        }
    }

    /// Last stream sequence committed into the view (and flushed, unless
    /// [`ProjectorOptions::flush`] is off).
    pub fn applied_sequence(&self) -> u64 {
        self.applied_sequence.load(Ordering::Acquire)
    }

    /// Events between the checkpoint and the stream's last sequence.
    pub fn lag(&self) -> u64 {
        self.stream_last_sequence.load(Ordering::Acquire).saturating_sub(self.applied_sequence())
    }

    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let applied_sequence = self.applied_sequence();
        let last = self.stream_last_sequence.load(Ordering::Acquire).max(applied_sequence);
        ProgressSnapshot {
            view: self.view.clone(),
            stream: self.stream.clone(),
            applied_sequence,
            stream_last_sequence: last,
            lag: last - applied_sequence,
            applied: self.applied.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }

    /// Waits until the view has committed (and flushed) stream sequence `sequence` or anything
    /// after it. Returns at once if the projector is gone.
    pub async fn wait_for(&self, sequence: u64) {
        let mut rx = self.committed.subscribe();
        let _ = rx.wait_for(|s| *s >= sequence).await;
    }

    /// A receiver that sees each newly committed sequence (intermediate ones may be skipped
    /// when the reader is slower than the commits).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    fn committed(&self, c: Committed) {
        self.applied.fetch_add(c.applied, Ordering::Relaxed);
        self.dead_lettered.fetch_add(c.dead_lettered, Ordering::Relaxed);
        self.batches.fetch_add(c.batches, Ordering::Relaxed);
        self.applied_sequence.store(c.sequence, Ordering::Release);
        self.stream_last_sequence.fetch_max(c.sequence, Ordering::AcqRel);
        self.committed.send_replace(c.sequence);
    }
}

/// What one [`Projector::catch_up`] or [`Projector::run`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Events applied.
    pub applied: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Batches committed.
    pub batches: u64,
    /// The view's checkpoint at the end.
    pub checkpoint: u64,
}

/// Runs one [`View`] over one stream: replays from the checkpoint, applies in order, commits
/// each batch atomically with its checkpoint, dead-letters what does not decode.
pub struct Projector<V: View> {
    backbone: Arc<dyn Backbone>,
    stream: String,
    store: Store,
    state: ViewState,
    view: V,
    options: ProjectorOptions,
    progress: Arc<Progress>,
    checkpoint: u64,
    dead_letters: u64,
    cache: WriteCache,
}

impl<V: View> Projector<V> {
    /// A projector of `view` over `stream`, resuming from the view's checkpoint in `store`.
    pub fn new(
        backbone: Arc<dyn Backbone>,
        stream: impl Into<String>,
        store: &Store,
        view: V,
    ) -> Result<Self, ProjectionError> {
        let name = view.name().to_owned();
        validate_token("view name", &name)
            .map_err(|source| ProjectionError::InvalidName { name: name.clone(), source })?;
        let stream = stream.into();
        let state = store.state(&name)?;
        let checkpoint = state.checkpoint()?;
        let dead_letters = state.dead_letters()?;
        Ok(Projector {
            progress: Arc::new(Progress::new(&name, &stream, checkpoint)),
            backbone,
            stream,
            store: store.clone(),
            state,
            view,
            options: ProjectorOptions::default(),
            checkpoint,
            dead_letters,
            cache: WriteCache::new(ProjectorOptions::default().cache_entries),
        })
    }

    /// Replaces the tuning.
    pub fn with_options(mut self, options: ProjectorOptions) -> Self {
        self.cache = WriteCache::new(options.cache_entries);
        self.options = options;
        self
    }

    /// Discards the view's state so the next run rebuilds it from the stream's first message.
    /// Take [`ViewState`]s for queries after this call.
    pub fn rebuild(&mut self) -> Result<(), ProjectionError> {
        self.state = self.store.reset(self.view.name())?;
        self.checkpoint = 0;
        self.dead_letters = 0;
        self.cache = WriteCache::new(self.options.cache_entries);
        self.progress = Arc::new(Progress::new(self.view.name(), &self.stream, 0));
        Ok(())
    }

    /// The view's committed state, for queries.
    pub fn state(&self) -> &ViewState {
        &self.state
    }

    /// The view itself.
    pub fn view(&self) -> &V {
        &self.view
    }

    /// The stream replayed.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Live counters (shared; keeps updating while the projector runs).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Applies everything stored in the stream now, then returns.
    pub async fn catch_up(&mut self) -> Result<RunStats, ProjectionError> {
        self.consume(false, std::future::pending()).await
    }

    /// Applies everything stored and then every new event as it arrives, until `shutdown`
    /// completes (every committed batch stays committed) or the stream ends.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()>) -> Result<RunStats, ProjectionError> {
        self.consume(true, shutdown).await
    }

    async fn refresh_stream_last(&self) -> Result<u64, BackboneError> {
        let info = self.backbone.stream_info(&self.stream).await?;
        self.progress.stream_last_sequence.fetch_max(info.last_sequence, Ordering::AcqRel);
        Ok(info.first_sequence)
    }

    async fn consume(&mut self, follow: bool, shutdown: impl Future<Output = ()>) -> Result<RunStats, ProjectionError> {
        let first = self.refresh_stream_last().await?;
        // Without it the first malformed event would stop the projector after all.
        deadletter::ensure_stream(&*self.backbone).await?;
        if first > self.checkpoint + 1 && self.checkpoint > 0 {
            tracing::warn!(
                view = self.view.name(),
                stream = %self.stream,
                checkpoint = self.checkpoint,
                first,
                "events after the view's checkpoint were removed by retention; the view misses them (rebuild to re-base it)"
            );
        }
        let options = ReplayOptions {
            start: StartPosition::Sequence(self.checkpoint + 1),
            filter_subjects: self.view.filter_subjects(),
            follow,
        };
        let replay = self.backbone.replay(&self.stream, options).await?;
        let max_batch = self.options.max_batch.max(1);
        // Reading and decoding run on their own task, ahead of applying and committing: the
        // two overlap (on two cores, in parallel), and whatever arrives during a commit makes
        // the next batch, so batches grow exactly when commits are the bottleneck.
        let group = max_batch.min(READ_GROUP);
        let groups_per_batch = (max_batch / group).max(1);
        let (tx, mut rx) = tokio::sync::mpsc::channel(groups_per_batch * 2);
        let verifier = self.options.verifier.clone();
        let reader = AbortOnDrop(tokio::spawn(read_and_decode(replay, self.checkpoint, group, verifier, tx)));
        let mut stats = RunStats { checkpoint: self.checkpoint, ..Default::default() };
        let mut tick = tokio::time::interval(self.options.stream_info_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flusher = Flusher::default();
        let mut groups = Vec::new();
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ok(()),
                done = flusher.wait(), if flusher.busy() => {
                    if let Err(e) = done {
                        break Err(e);
                    }
                    flusher.completed(&self.progress);
                    flusher.start(&self.state);
                }
                n = rx.recv_many(&mut groups, groups_per_batch) => {
                    if n == 0 {
                        break Ok(());
                    }
                    let items = groups.drain(..).flatten();
                    let outcome = self.apply_batch(items, &mut stats).await;
                    if let Some(committed) = outcome.committed {
                        if self.options.flush {
                            flusher.add(committed);
                            if !flusher.busy() {
                                flusher.start(&self.state);
                            }
                        } else {
                            self.progress.committed(committed);
                        }
                    }
                    if let Err(e) = outcome.result {
                        break Err(e);
                    }
                }
                _ = tick.tick(), if follow => {
                    if let Err(e) = self.refresh_stream_last().await {
                        tracing::warn!(view = self.view.name(), error = %e, "stream info for the lag");
                    }
                }
            }
        };
        drop(reader);
        // Whatever was committed is flushed before returning, error or not.
        let flushed = flusher.finish(&self.state, &self.progress).await;
        result?;
        flushed?;
        stats.checkpoint = self.checkpoint;
        Ok(stats)
    }

    /// Applies one batch and commits it with its checkpoint (not yet flushed). On a view or
    /// backbone failure, what came before the failure in the batch is still committed when
    /// the failure is a read error, and nothing of the batch when the view failed.
    async fn apply_batch(&mut self, items: impl Iterator<Item = Item>, stats: &mut RunStats) -> BatchOutcome {
        let name = self.view.name().to_owned();
        let mut txn = Txn::new(&self.state, Some(&self.cache), READ_GROUP);
        let mut letters = Vec::new();
        let mut last = self.checkpoint;
        let mut applied = 0u64;
        let mut failure = None;
        for item in items {
            let (message, record) = match item {
                Item::Event(message, record) => (message, record),
                Item::Malformed(message, e) => {
                    if message.sequence > last {
                        tracing::debug!(view = %name, sequence = message.sequence, error = %e, "dead-lettering");
                        letters.push(DeadLetter::new(&name, &message, e.code(), e.to_string()));
                        last = message.sequence;
                    }
                    continue;
                }
                Item::Unverified(message, e) => {
                    if message.sequence > last {
                        tracing::warn!(view = %name, sequence = message.sequence, error = %e, "dead-lettering");
                        letters.push(DeadLetter::new(&name, &message, e.code(), e.to_string()));
                        last = message.sequence;
                    }
                    continue;
                }
                Item::Failed(e) => {
                    // Commit what came before it; the caller sees the error.
                    failure = Some(ProjectionError::Backbone(e));
                    break;
                }
            };
            // Never apply at or below the checkpoint, whatever the backbone delivers.
            if message.sequence <= last {
                continue;
            }
            match self.view.apply(message.sequence, &record, &mut txn) {
                Ok(()) => applied += 1,
                Err(ViewError::Reject(reason)) => letters.push(DeadLetter::new(&name, &message, "rejected", reason)),
                Err(source) => {
                    let sequence = message.sequence;
                    let stream = self.stream.clone();
                    return BatchOutcome {
                        committed: None,
                        result: Err(ProjectionError::View { view: name, stream, sequence, source }),
                    };
                }
            }
            last = message.sequence;
        }
        let mut committed = None;
        if last > self.checkpoint {
            // Dead letters are stored before the checkpoint passes them (see crate::deadletter).
            let dead = letters.len() as u64;
            let stored = match deadletter::publish(&*self.backbone, &letters).await {
                Ok(()) => txn.commit(last, self.dead_letters + dead),
                Err(e) => Err(e.into()),
            };
            match stored {
                Ok(writes) => self.cache.absorb(writes),
                Err(e) => return BatchOutcome { committed: None, result: Err(e) },
            }
            self.checkpoint = last;
            self.dead_letters += dead;
            stats.applied += applied;
            stats.dead_lettered += dead;
            stats.batches += 1;
            committed = Some(Committed { sequence: last, applied, dead_lettered: dead, batches: 1 });
        }
        BatchOutcome { committed, result: failure.map_or(Ok(()), Err) }
    }
}

/// What the reader hands to the applier, in stream order. Nearly every item is an event, so
/// the variants are not boxed to even out their sizes.
#[allow(clippy::large_enum_variant)]
enum Item {
    /// A decoded event (the message is kept for a dead letter, should the view reject it).
    Event(StoredMessage, EventRecord),
    /// A message that does not decode.
    Malformed(StoredMessage, chorus_schemas::DecodeError),
    /// An event whose signature the verifier refused.
    Unverified(StoredMessage, chorus_schemas::signature::VerifyError),
    /// Reading the stream failed; nothing follows.
    Failed(BackboneError),
}

/// Messages the reader decodes and hands over at once: one wake-up of the applier per group
/// instead of per message.
const READ_GROUP: usize = 256;

/// Reads the replay, decodes each message, and sends the results in order, in groups of what
/// was ready (at most `group`).
async fn read_and_decode(
    replay: chorus_backbone::MessageStream,
    checkpoint: u64,
    group: usize,
    verifier: Option<std::sync::Arc<chorus_schemas::signature::Verifier>>,
    tx: tokio::sync::mpsc::Sender<Vec<Item>>,
) {
    let mut groups = replay.ready_chunks(group);
    while let Some(group) = groups.next().await {
        let mut items = Vec::with_capacity(group.len());
        let mut failed = false;
        for next in group {
            items.push(match next {
                Ok(m) if m.sequence <= checkpoint => continue,
                Ok(m) => match EventRecord::decode(&m.payload) {
                    Ok(record) => match verifier.as_deref().map(|v| v.verify(&record).map(|_| ())) {
                        Some(Err(e)) => Item::Unverified(m, e),
                        _ => Item::Event(m, record),
                    },
                    Err(e) => Item::Malformed(m, e),
                },
                Err(e) => {
                    failed = true;
                    Item::Failed(e)
                }
            });
            if failed {
                break;
            }
        }
        if tx.send(items).await.is_err() || failed {
            return;
        }
    }
}

/// Aborts the reader when the projector stops, so a following replay does not outlive it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Commits not yet reported, merged.
#[derive(Clone, Copy, Debug, Default)]
struct Committed {
    sequence: u64,
    applied: u64,
    dead_lettered: u64,
    batches: u64,
}

struct BatchOutcome {
    committed: Option<Committed>,
    result: Result<(), ProjectionError>,
}

type FlushFuture = std::pin::Pin<Box<dyn Future<Output = Result<(), ProjectionError>> + Send>>;

/// Flushes committed batches with at most one fsync in flight. While one runs, the next
/// batches are applied and committed; the next flush then covers all of them. Progress (what
/// [`Progress::applied_sequence`] reports and [`Progress::wait_for`] waits for) moves only
/// when a flush completes, so it never reports a sequence a power loss could take back.
#[derive(Default)]
struct Flusher {
    in_flight: Option<(FlushFuture, Committed)>,
    waiting: Option<Committed>,
}

impl Flusher {
    fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    fn add(&mut self, c: Committed) {
        let w = self.waiting.get_or_insert_with(Committed::default);
        w.sequence = c.sequence;
        w.applied += c.applied;
        w.dead_lettered += c.dead_lettered;
        w.batches += c.batches;
    }

    /// Starts flushing what is waiting, if anything.
    fn start(&mut self, state: &ViewState) {
        if let Some(c) = self.waiting.take() {
            let tree = state.tree.clone();
            let flush: FlushFuture = Box::pin(async move {
                tree.flush_async().await?;
                Ok(())
            });
            self.in_flight = Some((flush, c));
        }
    }

    /// Waits for the flush in flight (cancel-safe: the future stays here until it is done).
    async fn wait(&mut self) -> Result<(), ProjectionError> {
        let Some((flush, _)) = self.in_flight.as_mut() else {
            return Ok(());
        };
        flush.await
    }

    /// Reports a finished flush; called once [`Flusher::wait`] returned.
    fn completed(&mut self, progress: &Progress) {
        if let Some((_, c)) = self.in_flight.take() {
            progress.committed(c);
        }
    }

    /// Flushes everything committed and reports it.
    async fn finish(&mut self, state: &ViewState, progress: &Progress) -> Result<(), ProjectionError> {
        loop {
            if self.busy() {
                self.wait().await?;
                self.completed(progress);
            }
            if self.waiting.is_none() {
                return Ok(());
            }
            self.start(state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_backbone::embedded::EmbeddedBackbone;
    use chorus_backbone::Message;
    use chorus_schemas::lifecycle::{Alive, Startup};

    /// Counts applications per event id and events per node.
    struct Counting;

    impl View for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn apply(&mut self, _seq: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
            if record.subject == "reject.me" {
                return Err(ViewError::Reject("node is on the reject list".into()));
            }
            let key = format!("id/{}", record.id);
            let n: u64 = txn.get_json(key.as_bytes())?.unwrap_or(0);
            txn.insert_json(key.as_bytes(), &(n + 1))?;
            let key = format!("node/{}", record.subject);
            let n: u64 = txn.get_json(key.as_bytes())?.unwrap_or(0);
            txn.insert_json(key.as_bytes(), &(n + 1))
        }
    }

    async fn backbone() -> (tempfile::TempDir, Arc<dyn Backbone>) {
        let dir = tempfile::tempdir().unwrap();
        let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("bb")).unwrap());
        chorus_producers::streams::ensure_platform_streams(&*b, &Default::default()).await.unwrap();
        (dir, b)
    }

    fn event(i: usize) -> Message {
        let r = if i.is_multiple_of(3) {
            EventRecord::new(Startup::new(format!("n{}", i % 7), "server", "1.0"), 1)
        } else {
            EventRecord::new(Alive::new(format!("n{}", i % 7), "server", "1.0", Some(60)), i as u64)
        };
        chorus_producers::emitter::to_message(&r).unwrap()
    }

    #[test]
    fn txn_reads_its_own_writes_and_guards_reserved_keys() {
        let store = Store::temporary().unwrap();
        let state = store.state("v").unwrap();
        let mut txn = Txn::new(&state, None, 4);
        assert!(txn.get(b"a").unwrap().is_none());
        txn.insert(b"a", &b"1"[..]).unwrap();
        assert_eq!(txn.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        txn.remove(b"a").unwrap();
        assert!(txn.get(b"a").unwrap().is_none());
        txn.insert(b"b", &b"2"[..]).unwrap();
        assert!(matches!(txn.insert(b"\0checkpoint", &b"x"[..]), Err(ViewError::ReservedKey(_))));
        assert!(matches!(txn.insert(b"", &b"x"[..]), Err(ViewError::ReservedKey(_))));
        txn.commit(9, 0).unwrap();
        assert_eq!(state.checkpoint().unwrap(), 9);
        assert_eq!(state.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
        assert!(state.get(b"a").unwrap().is_none());
        let keys: Vec<_> = state.scan_prefix(b"").map(|kv| kv.unwrap().0.to_vec()).collect();
        assert_eq!(keys, vec![b"b".to_vec()], "framework keys are not view entries");
    }

    #[test]
    fn reset_starts_an_empty_generation() {
        let store = Store::temporary().unwrap();
        let state = store.state("v").unwrap();
        let mut txn = Txn::new(&state, None, 1);
        txn.insert(b"k", &b"v"[..]).unwrap();
        txn.commit(5, 1).unwrap();
        assert_eq!(store.state("v").unwrap().checkpoint().unwrap(), 5);
        let fresh = store.reset("v").unwrap();
        assert_eq!((fresh.checkpoint().unwrap(), fresh.dead_letters().unwrap()), (0, 0));
        assert!(fresh.dump().unwrap().is_empty());
        assert!(store.state("v").unwrap().get(b"k").unwrap().is_none());
    }

    #[tokio::test]
    async fn resumes_after_checkpoint_and_rebuild_gives_the_same_state() {
        let (_dir, b) = backbone().await;
        let store = Store::temporary().unwrap();
        let mut total = 0;
        for round in 0..4 {
            let batch: Vec<Message> = (total..total + 50 + round * 13).map(event).collect();
            total += batch.len();
            b.publish_batch(batch).await.unwrap();
            // A new projector each round: a restart.
            let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap().with_options(
                ProjectorOptions { max_batch: 17, cache_entries: [0, 5, 1_000][round % 3], ..Default::default() },
            );
            let stats = p.catch_up().await.unwrap();
            assert_eq!(stats.checkpoint, total as u64);
            assert_eq!(p.progress().snapshot().lag, 0);
        }
        let incremental = store.state("counting").unwrap();
        for (k, v) in incremental.dump().unwrap() {
            if k.starts_with(b"id/") {
                assert_eq!(v, b"1", "event {} applied once", String::from_utf8_lossy(&k));
            }
        }
        let incremental = incremental.dump().unwrap();
        let other = Store::temporary().unwrap();
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &other, Counting).unwrap();
        p.catch_up().await.unwrap();
        assert_eq!(p.state().dump().unwrap(), incremental);
        // And a rebuild in place.
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
        p.rebuild().unwrap();
        assert_eq!(p.state().checkpoint().unwrap(), 0);
        p.catch_up().await.unwrap();
        assert_eq!(p.state().dump().unwrap(), incremental);
    }

    #[tokio::test]
    async fn malformed_and_rejected_events_are_dead_lettered_and_passed() {
        let (_dir, b) = backbone().await;
        let store = Store::temporary().unwrap();
        let subject = "choria.lifecycle.event.alive.server";
        let mut batch = vec![event(1), Message::new("bad-1", subject, &b"{not json"[..]), event(2)];
        let rejected = EventRecord::new(Alive::new("reject.me", "server", "1", None), 1);
        batch.push(chorus_producers::emitter::to_message(&rejected).unwrap());
        batch.push(Message::new(
            "bad-2",
            subject,
            &br#"{"specversion":"1.0","id":"x","source":"s","type":"nope"}"#[..],
        ));
        batch.push(event(4));
        b.publish_batch(batch).await.unwrap();
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
        let stats = p.catch_up().await.unwrap();
        assert_eq!((stats.applied, stats.dead_lettered, stats.checkpoint), (3, 3, 6));
        assert_eq!(p.state().dead_letters().unwrap(), 3);
        let letters: Vec<DeadLetter> = {
            let mut r = b.replay("CHORUS_DEADLETTER", ReplayOptions::default()).await.unwrap();
            let mut out = Vec::new();
            while let Some(m) = r.next().await {
                let m = m.unwrap();
                assert_eq!(m.subject, "chorus.deadletter.counting");
                out.push(DeadLetter::from_message(&m).unwrap());
            }
            out
        };
        let summary: Vec<_> = letters.iter().map(|l| (l.sequence, l.code.as_str(), l.stream.as_str())).collect();
        assert_eq!(
            summary,
            vec![
                (2, "not_json", "CHORUS_LIFECYCLE"),
                (4, "rejected", "CHORUS_LIFECYCLE"),
                (5, "unknown_type", "CHORUS_LIFECYCLE")
            ]
        );
        assert!(letters[2].reason.contains("nope"), "{}", letters[2].reason);
        assert_eq!(letters[0].payload.as_deref(), Some("{not json"));
        // A restart does not dead-letter them again: the checkpoint is past them.
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
        assert_eq!(p.catch_up().await.unwrap(), RunStats { checkpoint: 6, ..Default::default() });
        assert_eq!(b.stream_info("CHORUS_DEADLETTER").await.unwrap().messages, 3);
    }

    #[tokio::test]
    async fn with_a_verifier_unsigned_and_forged_events_are_dead_lettered_and_passed() {
        use chorus_schemas::signature::{Ed25519FileSigner, Verifier};
        let (_dir, b) = backbone().await;
        let store = Store::temporary().unwrap();
        let trusted = Ed25519FileSigner::random();
        let stranger = Ed25519FileSigner::random();
        let alive = |n: &str| EventRecord::new(Alive::new(n, "server", "1", None), 1);
        let mut forged = alive("n2").signed(&trusted).unwrap();
        if let chorus_schemas::Event::Lifecycle(chorus_schemas::Lifecycle::Alive(a)) = &mut forged.data {
            a.version = "6.6.6".into();
        }
        let batch = [
            alive("n1").signed(&trusted).unwrap(),
            alive("n2"),
            forged,
            alive("n3").signed(&stranger).unwrap(),
            alive("n4").signed(&trusted).unwrap(),
        ];
        b.publish_batch(batch.iter().map(|r| chorus_producers::emitter::to_message(r).unwrap()).collect())
            .await
            .unwrap();
        let verifier =
            Arc::new(Verifier::new().with_key(&chorus_schemas::signature::Signer::public_key(&trusted)).unwrap());
        let options = ProjectorOptions { verifier: Some(verifier), ..Default::default() };
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap().with_options(options);
        let stats = p.catch_up().await.unwrap();
        assert_eq!((stats.applied, stats.dead_lettered, stats.checkpoint), (2, 3, 5));
        let mut r = b.replay("CHORUS_DEADLETTER", ReplayOptions::default()).await.unwrap();
        let mut summary = Vec::new();
        while let Some(m) = r.next().await {
            let l = DeadLetter::from_message(&m.unwrap()).unwrap();
            summary.push((l.sequence, l.code));
        }
        let expected = [(2, "unsigned"), (3, "bad_signature"), (4, "unknown_key")];
        assert_eq!(summary, expected.map(|(s, c)| (s, c.to_owned())));
    }

    #[tokio::test]
    async fn run_follows_new_events_until_shutdown() {
        let (_dir, b) = backbone().await;
        let store = Store::temporary().unwrap();
        let mut p = Projector::new(b.clone(), "CHORUS_LIFECYCLE", &store, Counting).unwrap();
        let progress = p.progress();
        let state = p.state().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            p.run(async {
                let _ = stopped.await;
            })
            .await
        });
        b.publish_batch((0..10).map(event).collect()).await.unwrap();
        progress.wait_for(10).await;
        b.publish_batch((10..25).map(event).collect()).await.unwrap();
        progress.wait_for(25).await;
        assert_eq!(state.checkpoint().unwrap(), 25);
        stop.send(()).unwrap();
        let stats = task.await.unwrap().unwrap();
        assert_eq!((stats.applied, stats.checkpoint), (25, 25));
        assert_eq!(progress.snapshot().applied_sequence, 25);
    }

    #[tokio::test]
    async fn view_names_must_be_subject_tokens() {
        struct Bad;
        impl View for Bad {
            fn name(&self) -> &str {
                "bad.name"
            }
            fn apply(&mut self, _: u64, _: &EventRecord, _: &mut Txn<'_>) -> Result<(), ViewError> {
                Ok(())
            }
        }
        let (_dir, b) = backbone().await;
        let store = Store::temporary().unwrap();
        assert!(matches!(Projector::new(b, "CHORUS_LIFECYCLE", &store, Bad), Err(ProjectionError::InvalidName { .. })));
    }
}
