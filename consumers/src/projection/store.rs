//! The view store: each view's state in memory, persisted with its checkpoint in one local
//! database, and the transaction a batch of events is applied in.
//!
//! A view's whole state is held in memory and written to the database as *snapshots*: its
//! keys are spread over [`BUCKETS`] buckets by a fixed hash, and a snapshot rewrites the
//! buckets changed since the last one, with the checkpoint and dead-letter count, as one
//! atomic sled batch. Writing each changed key to sled instead cost more than everything
//! else a projection does (sled copies a leaf node for every key it inserts); a snapshot
//! while catching up costs at most one sled write per bucket, once per
//! [`super::ProjectorOptions::snapshot_every`], and at the head of the stream about one
//! bucket per event. After a crash the database holds the last snapshot, a
//! consistent state with its checkpoint, and the projector replays from there.
//!
//! A database written with one sled key per view key (before snapshots) is read as it is and
//! converted by the next snapshot, which writes every bucket and removes the old keys in the
//! same batch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

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
    /// The views loaded so far (current generation of each), shared by every
    /// [`Store::state`] call, so queries read the state the projector writes.
    loaded: Arc<Mutex<HashMap<String, ViewState>>>,
}

impl Store {
    /// Opens (creating if needed) the store in directory `path`. Views rewrite the same keys
    /// over and over, so sled runs in its high-throughput mode (faster writes, more space
    /// before its log is compacted). A lock still held by a just-closed store (a restarted
    /// projector) is waited out by the runtime's store.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ProjectionError> {
        let options = StoreOptions { high_throughput: true, ..Default::default() };
        Ok(Store::wrap(chorus_runtime::Store::open_with(path, &options)?))
    }

    /// A store in memory, removed when dropped (tests, benchmarks).
    pub fn temporary() -> Result<Self, ProjectionError> {
        Ok(Store::wrap(chorus_runtime::Store::temporary()?))
    }

    /// Wraps an open sled database.
    pub fn from_db(db: sled::Db) -> Self {
        Store::wrap(chorus_runtime::Store::from_db(db))
    }

    fn wrap(store: chorus_runtime::Store) -> Self {
        Store { store, loaded: Arc::default() }
    }

    pub(super) fn db(&self) -> &sled::Db {
        self.store.db()
    }

    fn generation_key(view: &str) -> String {
        format!("chorus/view/{view}/generation")
    }

    fn tree_name(view: &str, generation: u64) -> String {
        format!("chorus/view/{view}/{generation}")
    }

    /// The current state of view `name` (empty, checkpoint 0, when never built). The first
    /// call reads the view's last snapshot into memory; later calls share it.
    pub fn state(&self, name: &str) -> Result<ViewState, ProjectionError> {
        let mut loaded = self.loaded.lock().expect("view store lock");
        if let Some(state) = loaded.get(name) {
            return Ok(state.clone());
        }
        let generation = be_u64(self.db().get(Self::generation_key(name))?, "view generation")?;
        let tree = self.db().open_tree(Self::tree_name(name, generation))?;
        let memory = Memory::load(&tree)?;
        let state = self.state_with(name, generation, tree, memory);
        loaded.insert(name.to_owned(), state.clone());
        Ok(state)
    }

    fn state_with(&self, name: &str, generation: u64, tree: sled::Tree, memory: Memory) -> ViewState {
        ViewState {
            name: name.into(),
            generation,
            tree,
            store: self.store.clone(),
            memory: Arc::new(RwLock::new(memory)),
        }
    }

    /// Discards view `name`: its state becomes empty with checkpoint 0, so the next projector
    /// rebuilds it from the first sequence. [`ViewState`]s obtained before keep reading the
    /// old generation until dropped; take new ones.
    /// The old state is not read, so a view whose snapshot cannot be read can be reset.
    pub fn reset(&self, name: &str) -> Result<ViewState, ProjectionError> {
        // Held throughout, so no `state` call in between sees the generation being dropped.
        let mut loaded = self.loaded.lock().expect("view store lock");
        let old = be_u64(self.db().get(Self::generation_key(name))?, "view generation")?;
        let next = old + 1;
        self.db().insert(Self::generation_key(name), &next.to_be_bytes())?;
        self.store.flush_blocking()?;
        self.db().drop_tree(Self::tree_name(name, old))?;
        let tree = self.db().open_tree(Self::tree_name(name, next))?;
        let state = self.state_with(name, next, tree, Memory::default());
        loaded.insert(name.to_owned(), state.clone());
        Ok(state)
    }

    /// Flushes everything to disk (a group commit with other flushes of this store).
    pub async fn flush(&self) -> Result<(), ProjectionError> {
        Ok(self.store.flush().await?)
    }
}

/// How many buckets a view's keys are spread over in its snapshots: enough that the bucket an
/// event at the head of the stream rewrites stays small (a 100,000-node inventory holds about
/// 25 nodes per bucket), few enough that a snapshot while catching up is a few thousand sled
/// writes.
const BUCKETS: usize = 4096;
/// Snapshot buckets are stored under this prefix and the bucket number (u16, big-endian).
const BUCKET_PREFIX: &[u8] = b"\0bucket/";

/// The bucket of `key`: FNV-1a, fixed, since snapshots written by one version are read by
/// the next (a key found in another bucket is moved at the next snapshot anyway).
fn bucket_of(key: &[u8]) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % BUCKETS as u64) as usize
}

/// The keys of one snapshot bucket and their values.
type Bucket = HashMap<IVec, IVec, ahash::RandomState>;

/// A view's state in memory.
#[derive(Debug)]
struct Memory {
    /// Hash maps, not ordered ones: a lookup compares one key instead of walking a node of
    /// keys (each behind a pointer, a cache miss apiece on a large view); the rare ordered
    /// read (a prefix scan) sorts what it collects.
    buckets: Vec<Bucket>,
    checkpoint: u64,
    dead_letters: u64,
    /// Buckets changed since the last snapshot (flag per bucket, and their numbers).
    dirty: Vec<bool>,
    dirty_list: Vec<usize>,
    /// Keys in the tree that no snapshot writes (the per-key layout before snapshots, buckets
    /// of a larger bucket count), removed by the next snapshot.
    stale: Vec<IVec>,
    /// The checkpoint of the last snapshot.
    saved: u64,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
            checkpoint: 0,
            dead_letters: 0,
            dirty: vec![false; BUCKETS],
            dirty_list: Vec::new(),
            stale: Vec::new(),
            saved: 0,
        }
    }
}

impl Memory {
    fn load(tree: &sled::Tree) -> Result<Self, ProjectionError> {
        let mut memory = Memory::default();
        for kv in tree.iter() {
            let (key, value) = kv?;
            if let Some(number) = key.strip_prefix(BUCKET_PREFIX) {
                let number = <[u8; 2]>::try_from(number)
                    .map(|n| usize::from(u16::from_be_bytes(n)))
                    .map_err(|_| ProjectionError::Corrupt(format!("snapshot bucket key {key:?}")))?;
                if number >= BUCKETS {
                    memory.stale.push(key.clone());
                }
                for (k, v) in decode_bucket(&value)? {
                    let bucket = bucket_of(&k);
                    if bucket != number {
                        // Rewritten where it belongs; its old bucket without it.
                        memory.touch(bucket);
                        if number < BUCKETS {
                            memory.touch(number);
                        }
                    }
                    memory.buckets[bucket].insert(k, v);
                }
            } else if key.first() != Some(&RESERVED) {
                let bucket = bucket_of(&key);
                memory.touch(bucket);
                memory.buckets[bucket].insert(key.clone(), value);
                memory.stale.push(key);
            }
        }
        memory.checkpoint = be_u64(tree.get(CHECKPOINT_KEY)?, "checkpoint")?;
        memory.dead_letters = be_u64(tree.get(DEAD_LETTERS_KEY)?, "dead-letter count")?;
        memory.saved = memory.checkpoint;
        Ok(memory)
    }

    fn touch(&mut self, bucket: usize) {
        if !std::mem::replace(&mut self.dirty[bucket], true) {
            self.dirty_list.push(bucket);
        }
    }

    fn unsaved(&self) -> bool {
        self.saved < self.checkpoint || !self.dirty_list.is_empty() || !self.stale.is_empty()
    }

    fn get(&self, key: &[u8]) -> Option<&IVec> {
        self.buckets[bucket_of(key)].get(key)
    }
}

/// A bucket's entries: key length (u32 LE), key, value length (u32 LE), value; repeated.
fn encode_bucket(bucket: &Bucket) -> Vec<u8> {
    let mut out = Vec::with_capacity(bucket.iter().map(|(k, v)| 8 + k.len() + v.len()).sum());
    for (k, v) in bucket {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn decode_bucket(mut bytes: &[u8]) -> Result<Vec<(IVec, IVec)>, ProjectionError> {
    let corrupt = || ProjectionError::Corrupt("a snapshot bucket is truncated".into());
    let take = |bytes: &mut &[u8]| -> Result<IVec, ProjectionError> {
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(*len) as usize;
        let (value, rest) = rest.split_at_checked(len).ok_or_else(corrupt)?;
        *bytes = rest;
        Ok(IVec::from(value))
    };
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let key = take(&mut bytes)?;
        let value = take(&mut bytes)?;
        entries.push((key, value));
    }
    Ok(entries)
}

/// One view's state, for queries and for its projector. Cheap to clone and safe to share
/// with query handlers while a projector writes: each batch becomes visible as it is
/// committed, and every clone from the same [`Store`] sees the same state.
#[derive(Clone)]
pub struct ViewState {
    /// The store the view lives in, for its flushes.
    pub(super) store: chorus_runtime::Store,
    name: Arc<str>,
    generation: u64,
    tree: sled::Tree,
    memory: Arc<RwLock<Memory>>,
}

impl std::fmt::Debug for ViewState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewState").field("name", &self.name).field("generation", &self.generation).finish()
    }
}

impl ViewState {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Memory> {
        self.memory.read().expect("view state lock")
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last stream sequence whose effects are in this state (0 = none).
    pub fn checkpoint(&self) -> Result<u64, ProjectionError> {
        Ok(self.read().checkpoint)
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

    /// The checkpoint of the last snapshot written (not necessarily flushed yet), and whether
    /// the state holds anything since.
    pub(super) fn saved(&self) -> (u64, bool) {
        let memory = self.read();
        (memory.saved, memory.unsaved())
    }

    /// Messages dead-lettered while building this state.
    pub fn dead_letters(&self) -> Result<u64, ProjectionError> {
        Ok(self.read().dead_letters)
    }

    /// The committed value at `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<IVec>, ViewError> {
        Ok(self.read().get(key).cloned())
    }

    /// The committed value at `key`, as JSON.
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, ViewError> {
        self.get(key)?.map(|v| from_json(key, &v)).transpose()
    }

    /// Committed entries whose key starts with `prefix`, in key order (as of the call).
    pub fn scan_prefix(&self, prefix: &[u8]) -> impl Iterator<Item = Result<(IVec, IVec), ViewError>> + '_ {
        let mut entries: Vec<(IVec, IVec)> = {
            let memory = self.read();
            memory
                .buckets
                .iter()
                .flatten()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        entries.into_iter().map(Ok)
    }

    /// The JSON values of the committed entries whose key starts with `prefix`, in key order.
    pub fn scan_json<T: DeserializeOwned>(&self, prefix: &[u8]) -> impl Iterator<Item = Result<T, ViewError>> + '_ {
        self.scan_prefix(prefix).map(|kv| kv.and_then(|(key, value)| from_json(&key, &value)))
    }

    /// Every entry, framework keys (checkpoint, dead letters, stream) included: two states
    /// with equal dumps are the same view at the same checkpoint. For tests and rebuild
    /// checks.
    pub fn dump(&self) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, ProjectionError> {
        let mut dump: BTreeMap<Vec<u8>, Vec<u8>> =
            self.scan_prefix(b"").map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec()))).collect::<Result<_, _>>()?;
        let (checkpoint, dead_letters) = (self.checkpoint()?, self.dead_letters()?);
        if checkpoint > 0 {
            dump.insert(CHECKPOINT_KEY.to_vec(), checkpoint.to_be_bytes().to_vec());
            dump.insert(DEAD_LETTERS_KEY.to_vec(), dead_letters.to_be_bytes().to_vec());
        }
        if let Some(stream) = self.tree.get(STREAM_KEY)? {
            dump.insert(STREAM_KEY.to_vec(), stream.to_vec());
        }
        Ok(dump)
    }

    /// Applies staged writes and moves the checkpoint, in memory: queries see them at once;
    /// [`ViewState::snapshot`] makes them durable.
    pub(super) fn commit(&self, staged: Staged, checkpoint: u64, dead_letters: u64) {
        let mut memory = self.memory.write().expect("view state lock");
        for (key, value) in staged {
            let bucket = bucket_of(&key);
            memory.touch(bucket);
            match value {
                Some(value) => memory.buckets[bucket].insert(key, value),
                None => memory.buckets[bucket].remove(&key),
            };
        }
        memory.checkpoint = checkpoint;
        memory.dead_letters = dead_letters;
    }

    /// Writes the buckets changed since the last snapshot, with the checkpoint, as one atomic
    /// sled batch (not yet flushed). Returns the checkpoint written, or `None` when the last
    /// snapshot already holds everything.
    pub(super) fn snapshot(&self) -> Result<Option<u64>, ProjectionError> {
        // Written under the read lock, so queries go on meanwhile: only the view's projector
        // writes its state, and it is the caller.
        let saved = {
            let memory = self.read();
            if !memory.unsaved() {
                return Ok(None);
            }
            let mut batch = sled::Batch::default();
            for key in &memory.stale {
                batch.remove(key.clone());
            }
            for &bucket in &memory.dirty_list {
                let mut key = BUCKET_PREFIX.to_vec();
                key.extend_from_slice(&(bucket as u16).to_be_bytes());
                match &memory.buckets[bucket] {
                    entries if entries.is_empty() => batch.remove(key),
                    entries => batch.insert(key, encode_bucket(entries)),
                }
            }
            batch.insert(CHECKPOINT_KEY, &memory.checkpoint.to_be_bytes());
            batch.insert(DEAD_LETTERS_KEY, &memory.dead_letters.to_be_bytes());
            self.tree.apply_batch(batch)?;
            memory.checkpoint
        };
        let mut memory = self.memory.write().expect("view state lock");
        let memory = &mut *memory;
        for bucket in memory.dirty_list.drain(..) {
            memory.dirty[bucket] = false;
        }
        memory.stale.clear();
        memory.saved = saved;
        Ok(Some(saved))
    }
}

fn from_json<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, ViewError> {
    serde_json::from_slice(value)
        .map_err(|e| ViewError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
}

/// Writes staged by the projector and not yet committed: the events of one batch, one entry
/// per key (the latest write wins).
pub(super) type Staged = HashMap<IVec, Option<IVec>, ahash::RandomState>;

/// The writes of one batch of events, not yet committed. Reads see the batch's own writes
/// first (two events of one node in one batch build on each other), then the committed
/// state. Writes to one key within a batch collapse into one.
pub struct Txn<'a> {
    state: &'a ViewState,
    pending: Staged,
}

impl<'a> Txn<'a> {
    /// A transaction over `state`.
    pub(super) fn new(state: &'a ViewState, capacity: usize) -> Self {
        Txn { state, pending: Staged::with_capacity_and_hasher(capacity, ahash::RandomState::new()) }
    }

    /// The staged writes, to commit.
    pub(super) fn into_staged(self) -> Staged {
        self.pending
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
        Txn::new(state, 16)
    }

    /// Commits with checkpoint `checkpoint`, for unit tests of views.
    #[cfg(test)]
    pub(crate) fn commit_for_tests(self, checkpoint: u64) {
        let state = self.state;
        state.commit(self.pending, checkpoint, 0);
    }
}
