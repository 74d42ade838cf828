//! The embedded engine: streams in a local sled database, no server needed.
//!
//! It is the zero-setup backbone of `chorus up` and the node's offline outbox, so it must not
//! lose what it acknowledged: publishes go through a single writer thread that applies a whole
//! group of them, flushes sled to disk once, and only then acknowledges every publish of the
//! group (group commit). That gives both durability against `kill -9` and a high publish rate.
//!
//! Layout: one sled tree per stream (`msgs/<stream>`) holding chunks of messages. Each group
//! commit appends, per stream, one or more chunks of consecutive messages (sealed at 1024
//! messages or about 6 KiB, see `writer.rs`), each keyed by the big-endian sequence of its first
//! message (format in `codec.rs`). Chunks never overlap and follow each other without gaps, so
//! the message of sequence `s` is in the last chunk whose key is at or below `s`. A chunk costs
//! sled one insert instead of one per message, which is what makes publishing fast. Retention
//! removes whole chunks from the front; when only the start of the first chunk must go, the
//! rest of it is rewritten under its new first sequence, in one atomic sled batch with the
//! removal of the old key.
//!
//! Stream configs, counters and consumer positions live in the `meta` tree. The dedupe index
//! (event id → sequence within the dedupe window) is derived state, rebuilt from the newest
//! messages at open, so it can never disagree with what is stored.

mod codec;
mod consumer;
mod kv;
mod replay;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use chorus_runtime::{Store, StoreOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch, Semaphore};

use crate::{
    Backbone, BackboneError, Consumer, ConsumerConfig, Message, MessageStream, PublishAck, ReplayOptions, Result,
    StartPosition, StoredMessage, StreamConfig, StreamInfo,
};

pub use codec::seq_key;

/// Settings of an embedded store.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Directory of the sled database; created when missing.
    pub path: PathBuf,
    /// Page cache size in bytes; more keeps hot stream tails in memory.
    #[serde(default = "default_cache")]
    pub cache_capacity: u64,
    /// Most messages applied in one group commit.
    #[serde(default = "default_max_group")]
    pub max_group: usize,
}

fn default_cache() -> u64 {
    256 * 1024 * 1024
}

fn default_max_group() -> usize {
    16_384
}

impl EmbeddedConfig {
    /// A store in `path` with the default cache (256 MiB) and group size (16,384 messages).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        EmbeddedConfig { path: path.into(), cache_capacity: default_cache(), max_group: default_max_group() }
    }
}

/// Counters persisted with each group commit so opening a large store needs no full scan.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct StreamState {
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Stream time of the newest message, in Unix nanoseconds; stream times never go back, which
    /// lets a replay find a start time by binary search.
    pub last_time_ns: i64,
}

pub(crate) struct StreamHandle {
    pub name: String,
    pub tree: sled::Tree,
    pub config: RwLock<StreamConfig>,
    pub state: Mutex<StreamState>,
    /// Highest sequence that is on disk; readers never look past it.
    pub durable: watch::Sender<u64>,
}

impl StreamHandle {
    /// The chunk holding `seq`, as (first sequence, message count, chunk bytes).
    fn chunk_at(&self, seq: u64) -> Result<Option<(u64, u64, sled::IVec)>> {
        let Some((k, v)) = self.tree.range(..=seq_key(seq)).next_back().transpose()? else {
            return Ok(None);
        };
        let first = codec::key_seq(&k)?;
        let count = u64::from(codec::chunk_count(&v)?);
        Ok(if seq - first < count { Some((first, count, v)) } else { None })
    }

    pub(crate) fn read(&self, seq: u64) -> Result<Option<StoredMessage>> {
        if seq > *self.durable.borrow() {
            return Ok(None);
        }
        let Some((first, _, chunk)) = self.chunk_at(seq)? else { return Ok(None) };
        match codec::records(&chunk)?.nth((seq - first) as usize).transpose()? {
            Some(record) => Ok(Some(codec::decode(&self.name, seq, record)?)),
            None => Ok(None),
        }
    }

    /// Calls `f` with each stored message from sequence `from` to `to` (inclusive), in order, as
    /// (sequence, record), until `f` returns false.
    pub(crate) fn scan(&self, from: u64, to: u64, mut f: impl FnMut(u64, &[u8]) -> Result<bool>) -> Result<()> {
        if from > to {
            return Ok(());
        }
        // Start at the chunk holding `from`, whose key may be lower.
        let start = match self.tree.range(..=seq_key(from)).next_back().transpose()? {
            Some((k, _)) => codec::key_seq(&k)?,
            None => from,
        };
        let mut next = from;
        for item in self.tree.range(seq_key(start)..=seq_key(to)) {
            let (k, v) = item?;
            let first = codec::key_seq(&k)?;
            for (i, record) in codec::records(&v)?.enumerate() {
                let record = record?;
                let seq = first + i as u64;
                if seq > to {
                    return Ok(());
                }
                // Before `from`, or already seen in a chunk that retention has since rewritten
                // under a later key.
                if seq < next {
                    continue;
                }
                next = seq + 1;
                if !f(seq, record)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// First sequence whose stream time is at or after `t` (binary search: times are monotonic).
    pub(crate) fn seq_at_time(&self, t: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        let st = *self.state.lock().unwrap();
        let (mut lo, mut hi) = (st.first_seq.max(1), st.last_seq + 1);
        let target = t.timestamp_nanos_opt().unwrap_or(i64::MAX);
        // The last probed chunk: the final probes of a search mostly fall in the same one.
        let mut chunk: Option<(u64, u64, sled::IVec)> = None;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if !matches!(&chunk, Some((first, count, _)) if mid >= *first && mid - first < *count) {
                chunk = self.chunk_at(mid)?;
            }
            let time = match &chunk {
                Some((first, _, v)) => match codec::records(v)?.nth((mid - first) as usize).transpose()? {
                    Some(record) => Some(codec::time_ns(record)?),
                    None => None,
                },
                None => None,
            };
            match time {
                Some(time) if time >= target => hi = mid,
                Some(_) => lo = mid + 1,
                // removed by retention while searching: everything below is older
                None => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    pub(crate) fn start_seq(&self, start: &StartPosition) -> Result<u64> {
        let st = *self.state.lock().unwrap();
        Ok(match start {
            StartPosition::First => st.first_seq.max(1),
            StartPosition::New => st.last_seq + 1,
            StartPosition::Sequence(s) => (*s).max(st.first_seq).max(1),
            StartPosition::Time(t) => self.seq_at_time(*t)?,
        })
    }

    pub(crate) fn info(&self, consumers: usize) -> StreamInfo {
        let st = *self.state.lock().unwrap();
        let config = self.config.read().unwrap();
        StreamInfo {
            name: self.name.clone(),
            subjects: config.subjects.clone(),
            messages: st.messages,
            bytes: st.bytes,
            first_sequence: st.first_seq,
            last_sequence: st.last_seq,
            consumers,
        }
    }
}

pub(crate) struct Inner {
    pub db: sled::Db,
    pub meta: sled::Tree,
    pub streams: RwLock<BTreeMap<String, Arc<StreamHandle>>>,
    pub consumers: Mutex<BTreeMap<(String, String), Arc<consumer::Shared>>>,
    writer: Mutex<Option<std::sync::mpsc::Sender<writer::Op>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Bounds messages queued for the writer, so a flood of publishers waits instead of
    /// growing memory without limit.
    inflight: Arc<Semaphore>,
    path: PathBuf,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for c in self.consumers.get_mut().unwrap().values() {
            if let Err(e) = c.persist() {
                tracing::warn!(store = %self.path.display(), error = %e, "consumer position not saved at close");
            }
        }
        self.writer.get_mut().unwrap().take();
        if let Some(t) = self.writer_thread.get_mut().unwrap().take() {
            // Normally stopped by `Closer` already; never join from the writer thread itself.
            if t.thread().id() != std::thread::current().id() && t.join().is_err() {
                tracing::error!(store = %self.path.display(), "the writer thread panicked");
            }
        }
        if let Err(e) = self.db.flush() {
            tracing::warn!(store = %self.path.display(), error = %e, "store not flushed at close");
        }
    }
}

/// Shared by the clones of a backbone: dropping the last one stops the writer (after the ops
/// already queued) and joins it before letting go of `Inner`. The writer holds `Inner` while it
/// works, so without this the store could be closed later on the writer thread, keeping its
/// lock after the backbone is gone.
struct Closer(Arc<Inner>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.writer.lock().unwrap().take();
        let thread = self.0.writer_thread.lock().unwrap().take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!(store = %self.0.path.display(), "the writer thread panicked");
            }
        }
    }
}

/// A sled-backed [`Backbone`]. Cheap to clone; clones share the store, which is closed when
/// the last clone is dropped.
#[derive(Clone)]
pub struct EmbeddedBackbone {
    inner: Arc<Inner>,
    _closer: Arc<Closer>,
}

const INFLIGHT_LIMIT: usize = 1 << 20;

impl EmbeddedBackbone {
    /// Opens (creating when missing) the store at `config.path` and recovers its streams.
    pub fn open(config: EmbeddedConfig) -> Result<Self> {
        // The runtime's store opening waits out a lock a just-closed handle still holds.
        let options = StoreOptions { high_throughput: true, cache_capacity: Some(config.cache_capacity) };
        let db = Store::open_with(&config.path, &options)
            .map_err(|e| BackboneError::storage(format!("opening {}", config.path.display()), e))?
            .db()
            .clone();
        let meta = db.open_tree("meta")?;
        let mut streams = BTreeMap::new();
        for item in meta.scan_prefix(b"stream/") {
            let (_, v) = item?;
            let cfg: StreamConfig =
                serde_json::from_slice(&v).map_err(|e| BackboneError::Corrupt(format!("stream config: {e}")))?;
            let handle = writer::open_stream(&db, &meta, cfg)?;
            streams.insert(handle.name.clone(), handle);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = Arc::new(Inner {
            db,
            meta,
            streams: RwLock::new(streams),
            consumers: Mutex::new(BTreeMap::new()),
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(None),
            inflight: Arc::new(Semaphore::new(INFLIGHT_LIMIT)),
            path: config.path.clone(),
        });
        let thread = writer::spawn(Arc::downgrade(&inner), rx, config.max_group)?;
        *inner.writer_thread.lock().unwrap() = Some(thread);
        let closer = Arc::new(Closer(inner.clone()));
        Ok(EmbeddedBackbone { inner, _closer: closer })
    }

    /// Opens a store at `path` with default settings.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(EmbeddedConfig::new(path.as_ref()))
    }

    /// Where the store lives on disk.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn stream(&self, name: &str) -> Result<Arc<StreamHandle>> {
        self.inner
            .streams
            .read()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| BackboneError::NotFound { kind: "stream", name: name.to_string() })
    }

    async fn submit(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<writer::Reply>>) -> writer::Op,
    ) -> Result<writer::Reply> {
        let (tx, rx) = oneshot::channel();
        {
            let guard = self.inner.writer.lock().unwrap();
            let sender = guard.as_ref().ok_or(BackboneError::Closed)?;
            sender.send(op(tx)).map_err(|_| BackboneError::Closed)?;
        }
        rx.await.map_err(|_| BackboneError::Closed)?
    }

    fn consumer_count(&self, stream: &str) -> usize {
        let prefix = format!("consumer/{stream}/");
        self.inner.meta.scan_prefix(prefix.as_bytes()).count()
    }
}

#[async_trait]
impl Backbone for EmbeddedBackbone {
    fn engine(&self) -> &'static str {
        "embedded"
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    async fn ensure_stream(&self, config: &StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        let name = config.name.clone();
        let config = config.clone();
        self.submit(|reply| writer::Op::EnsureStream { config, update: false, reply }).await?;
        self.stream_info(&name).await
    }

    async fn update_stream(&self, config: &StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        self.stream(&config.name)?;
        let name = config.name.clone();
        let config = config.clone();
        self.submit(|reply| writer::Op::EnsureStream { config, update: true, reply }).await?;
        self.stream_info(&name).await
    }

    async fn stream_config(&self, stream: &str) -> Result<StreamConfig> {
        Ok(self.stream(stream)?.config.read().unwrap().clone())
    }

    async fn streams(&self) -> Result<Vec<StreamConfig>> {
        let streams = self.inner.streams.read().unwrap();
        let mut out: Vec<StreamConfig> = streams.values().map(|h| h.config.read().unwrap().clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn stream_info(&self, stream: &str) -> Result<StreamInfo> {
        let h = self.stream(stream)?;
        Ok(h.info(self.consumer_count(stream)))
    }

    async fn delete_stream(&self, stream: &str) -> Result<()> {
        self.stream(stream)?;
        self.inner.consumers.lock().unwrap().retain(|(s, _), _| s != stream);
        let name = stream.to_string();
        self.submit(|reply| writer::Op::DeleteStream { name, reply }).await?;
        Ok(())
    }

    async fn publish_batch(&self, messages: Vec<Message>) -> Result<Vec<PublishAck>> {
        for m in &messages {
            m.validate()?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let n = messages.len().min(INFLIGHT_LIMIT) as u32;
        let permit = self.inner.inflight.clone().acquire_many_owned(n).await.map_err(|_| BackboneError::Closed)?;
        match self.submit(|reply| writer::Op::Publish { messages, reply, _permit: permit }).await? {
            writer::Reply::Acks(acks) => Ok(acks),
            _ => Err(BackboneError::storage("writer", "answered a publish without acks")),
        }
    }

    async fn consumer(&self, stream: &str, config: &ConsumerConfig) -> Result<Box<dyn Consumer>> {
        config.validate()?;
        let handle = self.stream(stream)?;
        let shared = consumer::Shared::open(&self.inner, handle, config)?;
        Ok(Box::new(consumer::EmbeddedConsumer::new(shared)))
    }

    async fn delete_consumer(&self, stream: &str, name: &str) -> Result<()> {
        self.inner.consumers.lock().unwrap().remove(&(stream.to_string(), name.to_string()));
        let key = consumer::state_key(stream, name);
        if self.inner.meta.remove(key)?.is_none() {
            return Err(BackboneError::NotFound { kind: "consumer", name: name.to_string() });
        }
        Ok(())
    }

    async fn replay(&self, stream: &str, options: ReplayOptions) -> Result<MessageStream> {
        for f in &options.filter_subjects {
            crate::subject::validate_filter(f)?;
        }
        let handle = self.stream(stream)?;
        replay::start(handle, options)
    }

    async fn purge(&self, stream: &str, below: u64) -> Result<u64> {
        self.stream(stream)?;
        let name = stream.to_string();
        match self.submit(|reply| writer::Op::Purge { name, below, reply }).await? {
            writer::Reply::Purged(n) => Ok(n),
            _ => Err(BackboneError::storage("writer", "answered a purge without a count")),
        }
    }

    async fn get(&self, stream: &str, sequence: u64) -> Result<Option<StoredMessage>> {
        self.stream(stream)?.read(sequence)
    }

    async fn bucket(&self, config: &crate::BucketConfig) -> Result<Arc<dyn crate::Bucket>> {
        self.open_bucket(config)
    }
}
