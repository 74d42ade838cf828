//! The view store: views' state and checkpoints in one local database, and the
//! transaction a batch of events is applied in.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use chorus_runtime::StoreOptions;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::IVec;

use super::{be_u64, ProjectionError, ViewError, CHECKPOINT_KEY, DEAD_LETTERS_KEY, RESERVED, STREAM_KEY};

/// The local sled database holding any number of views. Cheap to clone.
///
/// Each view lives in its own tree, named by the view and a *generation*. Resetting a view
/// switches to a new, empty generation with one atomic write and drops the old tree after, so
/// a crash in the middle of a rebuild leaves either the old view or an empty one, never a mix
/// of old state and a cleared checkpoint.
#[derive(Clone)]
pub struct Store {
    store: chorus_runtime::Store,
}

impl Store {
    /// Opens (creating if needed) the store in directory `path`. Views rewrite the same keys
    /// over and over, so sled runs in its high-throughput mode (faster writes, more space
    /// before its log is compacted). A lock still held by a just-closed store (a restarted
    /// projector) is waited out by the runtime's store.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let options = StoreOptions { high_throughput: true, ..Default::default() };
        Ok(Store { store: chorus_runtime::Store::open_with(path, &options)? })
    }

    /// A store in memory, removed when dropped (tests, benchmarks).
    pub fn temporary() -> Result<Self, ProjectionError> {
        Ok(Store { store: chorus_runtime::Store::temporary()? })
    }

    /// Wraps an open sled database.
    pub fn from_db(db: sled::Db) -> Self {
        Store { store: chorus_runtime::Store::from_db(db) }
    }

    fn db(&self) -> &sled::Db {
        self.store.db()
    }

    fn generation_key(view: &str) -> String {
        format!("chorus/view/{view}/generation")
    }

    fn tree_name(view: &str, generation: u64) -> String {
        format!("chorus/view/{view}/{generation}")
    }

    /// The current state of view `name` (empty, checkpoint 0, when never built).
    pub fn state(&self, name: &str) -> Result<ViewState, ProjectionError> {
        let generation = be_u64(self.db().get(Self::generation_key(name))?, "view generation")?;
        self.state_at(name, generation)
    }

    fn state_at(&self, name: &str, generation: u64) -> Result<ViewState, ProjectionError> {
        let tree = self.db().open_tree(Self::tree_name(name, generation))?;
        Ok(ViewState { name: name.into(), generation, tree, store: self.store.clone() })
    }

    /// Discards view `name`: its state becomes empty with checkpoint 0, so the next projector
    /// rebuilds it from the first sequence. [`ViewState`]s obtained before keep reading the
    /// old generation until dropped; take new ones.
    pub fn reset(&self, name: &str) -> Result<ViewState, ProjectionError> {
        let old = self.state(name)?;
        let next = old.generation + 1;
        self.db().insert(Self::generation_key(name), &next.to_be_bytes())?;
        self.store.flush_blocking()?;
        self.db().drop_tree(Self::tree_name(name, old.generation))?;
        self.state_at(name, next)
    }

    /// Flushes everything to disk (a group commit with other flushes of this store).
    pub async fn flush(&self) -> Result<(), ProjectionError> {
        Ok(self.store.flush().await?)
    }
}

/// Read access to one view's committed state. Cheap to clone and safe to share with query
/// handlers while a projector writes: each batch becomes visible as it is committed.
#[derive(Clone)]
pub struct ViewState {
    /// The store the view lives in, for its flushes.
    pub(super) store: chorus_runtime::Store,
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

    /// The stream this state was built from (`None` before its first projector, or for a
    /// store written before streams were recorded).
    pub fn stream(&self) -> Result<Option<String>, ProjectionError> {
        match self.tree.get(STREAM_KEY)? {
            None => Ok(None),
            Some(v) => String::from_utf8(v.to_vec())
                .map(Some)
                .map_err(|_| ProjectionError::Corrupt("the view's stream name is not UTF-8".into())),
        }
    }

    /// Records the stream this state is built from.
    pub(super) fn set_stream(&self, stream: &str) -> Result<(), ProjectionError> {
        self.tree.insert(STREAM_KEY, stream.as_bytes())?;
        Ok(())
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

    /// The JSON values of the committed entries whose key starts with `prefix`, in key order.
    pub fn scan_json<T: DeserializeOwned>(&self, prefix: &[u8]) -> impl Iterator<Item = Result<T, ViewError>> + '_ {
        self.scan_prefix(prefix).map(|kv| kv.and_then(|(key, value)| from_json(&key, &value)))
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
pub(super) struct WriteCache {
    map: HashMap<IVec, Option<IVec>>,
    limit: usize,
}

impl WriteCache {
    pub(super) fn new(limit: usize) -> Self {
        WriteCache { map: HashMap::new(), limit }
    }

    pub(super) fn absorb(&mut self, writes: Vec<(IVec, Option<IVec>)>) {
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
    pub(super) fn new(state: &'a ViewState, cache: Option<&'a WriteCache>, capacity: usize) -> Self {
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
    pub(super) fn commit(
        self,
        checkpoint: u64,
        dead_letters: u64,
    ) -> Result<Vec<(IVec, Option<IVec>)>, ProjectionError> {
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
