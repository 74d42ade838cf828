//! The single writer thread: routes publishes to streams, dedupes by event id, assigns
//! sequences, packs each stream's new messages into chunks, enforces retention and
//! group-commits to disk before acknowledging.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};

use super::codec::{self, seq_key, ChunkBuilder};
use super::{Inner, StreamHandle, StreamState};
use crate::{BackboneError, Message, PublishAck, Result, SharedError, StreamConfig};

/// A chunk is sealed once it holds this many messages: a bound on the records a read walks.
/// With [`CHUNK_TARGET_BYTES`] the size limit seals first (a record takes at least 23 bytes).
pub(crate) const CHUNK_MAX_MESSAGES: u32 = 1024;

/// A chunk is sealed before a message would take it past this size (a larger message gets a
/// chunk of its own). Small on purpose: sled writes any log item over about 128 KiB (a quarter
/// of its 512 KiB segment) to a separate blob file that its flush does not fsync, and when it
/// consolidates a leaf it writes the whole leaf (up to ~20 entries) as one item. 6 KiB chunks
/// keep leaves under that threshold, so acknowledged messages stay in the fsynced log; bigger
/// chunks are faster for large payloads, but would live in unsynced blob files.
pub(crate) const CHUNK_TARGET_BYTES: usize = 6 * 1024;

pub(crate) enum Op {
    Publish {
        messages: Vec<Message>,
        reply: oneshot::Sender<Result<Reply>>,
        _permit: OwnedSemaphorePermit,
    },
    /// Creates the stream; changes an existing one only with `update`.
    EnsureStream {
        config: StreamConfig,
        update: bool,
        reply: oneshot::Sender<Result<Reply>>,
    },
    DeleteStream {
        name: String,
        reply: oneshot::Sender<Result<Reply>>,
    },
    Purge {
        name: String,
        below: u64,
        reply: oneshot::Sender<Result<Reply>>,
    },
}

pub(crate) enum Reply {
    Acks(Vec<PublishAck>),
    Done,
    Purged(u64),
}

fn stats_key(stream: &str) -> Vec<u8> {
    format!("stats/{stream}").into_bytes()
}

fn config_key(stream: &str) -> Vec<u8> {
    format!("stream/{stream}").into_bytes()
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Opens a stream's tree and recovers its counters: trusted from the persisted stats when they
/// agree with the tree's ends (first sequence of the first chunk, last sequence of the last
/// one), recounted otherwise (a crash between a write and its stats).
pub(crate) fn open_stream(db: &sled::Db, meta: &sled::Tree, config: StreamConfig) -> Result<Arc<StreamHandle>> {
    let tree = db.open_tree(format!("msgs/{}", config.name))?;
    let saved: StreamState =
        meta.get(stats_key(&config.name))?.and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default();
    let first = tree.first()?.map(|(k, _)| codec::key_seq(&k)).transpose()?;
    let last = tree.last()?;
    let state = match (first, last) {
        (None, _) | (_, None) => StreamState {
            first_seq: saved.last_seq + 1,
            last_seq: saved.last_seq,
            messages: 0,
            bytes: 0,
            last_time_ns: saved.last_time_ns,
        },
        (Some(first), Some((lk, lv))) => {
            let last_seq = codec::key_seq(&lk)? + u64::from(codec::chunk_count(&lv)?) - 1;
            if saved.first_seq == first && saved.last_seq == last_seq {
                saved
            } else {
                let mut bytes = 0;
                let mut messages = 0;
                for item in tree.iter() {
                    let (_, v) = item?;
                    for record in codec::records(&v)? {
                        bytes += codec::size_of(record?)?;
                        messages += 1;
                    }
                }
                let newest =
                    codec::records(&lv)?.last().ok_or_else(|| BackboneError::Corrupt("empty chunk".into()))??;
                StreamState { first_seq: first, last_seq, messages, bytes, last_time_ns: codec::time_ns(newest)? }
            }
        }
    };
    let (durable, _) = watch::channel(state.last_seq);
    Ok(Arc::new(StreamHandle {
        name: config.name.clone(),
        tree,
        config: RwLock::new(config),
        state: Mutex::new(state),
        durable,
    }))
}

/// Event ids seen within a stream's dedupe window, oldest first for pruning. Both collections
/// share each id's one allocation.
#[derive(Default)]
struct DedupeIndex {
    ids: HashMap<Arc<str>, u64>,
    order: VecDeque<(i64, Arc<str>)>,
}

impl DedupeIndex {
    /// Rebuilds the index from the newest messages of a stream, reading chunks newest first.
    fn rebuild(handle: &StreamHandle, window: Duration) -> Result<Self> {
        let mut index = DedupeIndex::default();
        let horizon = now_ns() - window.as_nanos() as i64;
        let mut found = Vec::new();
        'chunks: for item in handle.tree.iter().rev() {
            let (k, v) = item?;
            let first = codec::key_seq(&k)?;
            let records = codec::records(&v)?.collect::<Result<Vec<_>>>()?;
            for (i, record) in records.iter().enumerate().rev() {
                let (t, id) = codec::id_of(record)?;
                if t < horizon {
                    break 'chunks;
                }
                found.push((t, Arc::<str>::from(id), first + i as u64));
            }
        }
        for (t, id, seq) in found.into_iter().rev() {
            index.ids.insert(id.clone(), seq);
            index.order.push_back((t, id));
        }
        Ok(index)
    }

    fn prune(&mut self, horizon_ns: i64) {
        while let Some((t, _)) = self.order.front() {
            if *t >= horizon_ns {
                break;
            }
            let (_, id) = self.order.pop_front().unwrap();
            self.ids.remove(&id);
        }
    }
}

/// A stream as routing sees it during one group: configuration read once per group.
struct Route {
    handle: Arc<StreamHandle>,
    subjects: Vec<String>,
    dedupe_window: Duration,
}

/// A stream's share of the group being committed: its counters as they will be once the group
/// is written, the chunks to insert and the chunk being filled.
struct Staged {
    handle: Arc<StreamHandle>,
    state: StreamState,
    batch: sled::Batch,
    chunk: ChunkBuilder,
    /// Sequence of the first message of `chunk`.
    chunk_first: u64,
    /// Taken out of the writer's map for the group, put back once the group is durable.
    dedupe: DedupeIndex,
}

impl Staged {
    /// Moves the chunk being filled into the batch.
    fn seal(&mut self) {
        if let Some(chunk) = self.chunk.finish() {
            self.batch.insert(&seq_key(self.chunk_first), chunk);
        }
    }
}

struct Writer {
    inner: Weak<Inner>,
    dedupe: HashMap<String, DedupeIndex>,
}

pub(crate) fn spawn(inner: Weak<Inner>, rx: Receiver<Op>, max_group: usize) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("chorus-embedded-writer".into())
        .spawn(move || {
            let mut w = Writer { inner, dedupe: HashMap::new() };
            w.run(rx, max_group.max(1))
        })
        .map_err(|e| BackboneError::storage("spawning the writer thread", e))
}

impl Writer {
    fn run(&mut self, rx: Receiver<Op>, max_group: usize) {
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    // Age-based retention must run even when nobody publishes.
                    if let Some(inner) = self.inner.upgrade() {
                        if let Err(e) = self.expire_all(&inner) {
                            tracing::warn!(error = %e, "embedded retention sweep failed");
                        }
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let Some(inner) = self.inner.upgrade() else { return };
            let mut group = vec![first];
            let mut count = group_len(&group[0]);
            while count < max_group {
                match rx.try_recv() {
                    Ok(op) => {
                        count += group_len(&op);
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.apply(&inner, group);
        }
    }

    fn apply(&mut self, inner: &Inner, group: Vec<Op>) {
        let mut publishes = Vec::new();
        for op in group {
            match op {
                Op::Publish { messages, reply, _permit } => publishes.push((messages, reply, _permit)),
                Op::EnsureStream { config, update, reply } => {
                    // Admin ops are rare: commit what is queued before them, keeping order.
                    self.commit_publishes(inner, std::mem::take(&mut publishes));
                    reply.send(self.ensure_stream(inner, config, update).map(|_| Reply::Done)).ok();
                }
                Op::DeleteStream { name, reply } => {
                    self.commit_publishes(inner, std::mem::take(&mut publishes));
                    reply.send(self.delete_stream(inner, &name).map(|_| Reply::Done)).ok();
                }
                Op::Purge { name, below, reply } => {
                    self.commit_publishes(inner, std::mem::take(&mut publishes));
                    reply.send(self.purge(inner, &name, below).map(Reply::Purged)).ok();
                }
            }
        }
        self.commit_publishes(inner, publishes);
    }

    fn ensure_stream(&mut self, inner: &Inner, config: StreamConfig, update: bool) -> Result<()> {
        let mut streams = inner.streams.write().unwrap();
        if !update && streams.contains_key(&config.name) {
            return Ok(());
        }
        for (name, other) in streams.iter() {
            if *name == config.name {
                continue;
            }
            let other_cfg = other.config.read().unwrap();
            for a in &config.subjects {
                for b in &other_cfg.subjects {
                    if crate::subject::filters_overlap(a, b) {
                        return Err(BackboneError::invalid_config(format!(
                            "stream {}: subject {a:?} overlaps {b:?} of stream {name}",
                            config.name
                        )));
                    }
                }
            }
        }
        inner.meta.insert(config_key(&config.name), serde_json::to_vec(&config).expect("config serialises"))?;
        if let Some(h) = streams.get(&config.name) {
            *h.config.write().unwrap() = config;
            let h = h.clone();
            drop(streams);
            enforce_limits(&h)?;
        } else {
            let h = open_stream(&inner.db, &inner.meta, config)?;
            streams.insert(h.name.clone(), h);
        }
        inner.db.flush()?;
        Ok(())
    }

    fn delete_stream(&mut self, inner: &Inner, name: &str) -> Result<()> {
        let handle = inner.streams.write().unwrap().remove(name);
        let Some(handle) = handle else {
            return Err(BackboneError::NotFound { kind: "stream", name: name.to_string() });
        };
        self.dedupe.remove(name);
        inner.meta.remove(config_key(name))?;
        inner.meta.remove(stats_key(name))?;
        let prefix = format!("consumer/{name}/");
        for item in inner.meta.scan_prefix(prefix.as_bytes()) {
            let (k, _) = item?;
            inner.meta.remove(k)?;
        }
        inner.db.drop_tree(handle.tree.name())?;
        inner.db.flush()?;
        Ok(())
    }

    /// Applies every publish of the group, flushes once, then acknowledges them all.
    fn commit_publishes(
        &mut self,
        inner: &Inner,
        publishes: Vec<(Vec<Message>, oneshot::Sender<Result<Reply>>, OwnedSemaphorePermit)>,
    ) {
        if publishes.is_empty() {
            return;
        }
        let routes: Vec<Route> = inner
            .streams
            .read()
            .unwrap()
            .values()
            .map(|h| {
                let config = h.config.read().unwrap();
                Route { handle: h.clone(), subjects: config.subjects.clone(), dedupe_window: config.dedupe_window }
            })
            .collect();
        let mut staged: Vec<Option<Staged>> = routes.iter().map(|_| None).collect();
        // One stream time for the group: its messages are stored together.
        let now = now_ns();
        let mut last_route = None;
        let mut results = Vec::with_capacity(publishes.len());
        for (messages, _, _) in &publishes {
            let mut acks = Vec::with_capacity(messages.len());
            let mut failed = None;
            for m in messages {
                match self.stage(&routes, &mut staged, &mut last_route, now, m) {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            results.push(match failed {
                None => Ok(acks),
                Some(e) => Err(e),
            });
        }
        let durable = self.write_batches(inner, &mut staged).map_err(|e| SharedError(std::sync::Arc::new(e)));
        for ((_, reply, _permit), result) in publishes.into_iter().zip(results) {
            let result = match (&durable, result) {
                (Err(e), _) => Err(BackboneError::storage("writing a group of publishes", e.clone())),
                (Ok(()), r) => r.map(Reply::Acks),
            };
            reply.send(result).ok();
        }
    }

    /// Routes one message to its stream, dedupes it and appends it to the stream's chunk.
    /// `last_route` remembers the previous subject's stream: batches mostly share subjects.
    fn stage<'m>(
        &mut self,
        routes: &[Route],
        staged: &mut [Option<Staged>],
        last_route: &mut Option<(&'m str, usize)>,
        now: i64,
        m: &'m Message,
    ) -> Result<PublishAck> {
        let at = match *last_route {
            Some((subject, at)) if subject == m.subject => at,
            _ => {
                let at = routes
                    .iter()
                    .position(|r| r.subjects.iter().any(|f| crate::subject::matches(f, &m.subject)))
                    .ok_or_else(|| BackboneError::NoStreamForSubject(m.subject.clone()))?;
                *last_route = Some((&m.subject, at));
                at
            }
        };
        let route = &routes[at];
        let s = match &mut staged[at] {
            Some(s) => s,
            slot @ None => {
                let mut dedupe = match self.dedupe.remove(&route.handle.name) {
                    Some(d) => d,
                    None => DedupeIndex::rebuild(&route.handle, route.dedupe_window)?,
                };
                dedupe.prune(now - route.dedupe_window.as_nanos() as i64);
                slot.insert(Staged {
                    handle: route.handle.clone(),
                    state: *route.handle.state.lock().unwrap(),
                    batch: sled::Batch::default(),
                    chunk: ChunkBuilder::default(),
                    chunk_first: 0,
                    dedupe,
                })
            }
        };
        if let Some(seq) = s.dedupe.ids.get(m.id.as_str()) {
            return Ok(PublishAck { stream: route.handle.name.clone(), sequence: *seq, duplicate: true });
        }
        let record = 4 + codec::record_len(m);
        if s.chunk.count() >= CHUNK_MAX_MESSAGES || (s.chunk.count() > 0 && s.chunk.len() + record > CHUNK_TARGET_BYTES)
        {
            s.seal();
        }
        let time = now.max(s.state.last_time_ns);
        let seq = s.state.last_seq + 1;
        if s.chunk.count() == 0 {
            s.chunk_first = seq;
        }
        s.chunk.push_message(m, time)?;
        let state = &mut s.state;
        state.last_seq = seq;
        if state.messages == 0 {
            state.first_seq = seq;
        }
        state.messages += 1;
        state.bytes += codec::stored_size(m);
        state.last_time_ns = time;
        let id: Arc<str> = Arc::from(m.id.as_str());
        s.dedupe.ids.insert(id.clone(), seq);
        s.dedupe.order.push_back((time, id));
        Ok(PublishAck { stream: route.handle.name.clone(), sequence: seq, duplicate: false })
    }

    /// Writes the staged chunks, enforces retention, flushes once and publishes the new durable
    /// ends; on failure, forgets the group's dedupe entries and reloads counters from disk.
    fn write_batches(&mut self, inner: &Inner, staged: &mut [Option<Staged>]) -> Result<()> {
        let result = (|| {
            for s in staged.iter_mut().flatten() {
                s.seal();
                s.handle.tree.apply_batch(std::mem::take(&mut s.batch))?;
                *s.handle.state.lock().unwrap() = s.state;
                enforce_limits(&s.handle)?;
                let st = *s.handle.state.lock().unwrap();
                inner.meta.insert(stats_key(&s.handle.name), serde_json::to_vec(&st).unwrap())?;
            }
            inner.db.flush()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                for s in staged.iter_mut().filter_map(Option::take) {
                    let last = s.handle.state.lock().unwrap().last_seq;
                    s.handle.durable.send_replace(last);
                    self.dedupe.insert(s.handle.name.clone(), s.dedupe);
                }
                Ok(())
            }
            Err(e) => {
                // The group is not acknowledged; its staged ids are dropped with the taken-out
                // dedupe indexes (rebuilt from disk at next use) so a retry is stored, and
                // counters are reloaded from disk, which is the truth after a failed write.
                for s in staged.iter().flatten() {
                    if let Ok(reopened) = open_stream(&inner.db, &inner.meta, s.handle.config.read().unwrap().clone()) {
                        *s.handle.state.lock().unwrap() = *reopened.state.lock().unwrap();
                    }
                }
                Err(e)
            }
        }
    }

    /// Removes the messages below `below`, durably, and returns how many went.
    fn purge(&mut self, inner: &Inner, name: &str, below: u64) -> Result<u64> {
        let handle = inner
            .streams
            .read()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| BackboneError::NotFound { kind: "stream", name: name.to_string() })?;
        let before = *handle.state.lock().unwrap();
        trim_front(&handle, below)?;
        let after = *handle.state.lock().unwrap();
        if before != after {
            inner.meta.insert(stats_key(name), serde_json::to_vec(&after).unwrap())?;
            inner.db.flush()?;
        }
        Ok(before.messages - after.messages)
    }

    fn expire_all(&mut self, inner: &Inner) -> Result<()> {
        let streams: Vec<Arc<StreamHandle>> = inner.streams.read().unwrap().values().cloned().collect();
        let mut changed = false;
        for h in streams {
            if h.config.read().unwrap().max_age.is_none() {
                continue;
            }
            let before = *h.state.lock().unwrap();
            enforce_limits(&h)?;
            let after = *h.state.lock().unwrap();
            if before != after {
                inner.meta.insert(stats_key(&h.name), serde_json::to_vec(&after).unwrap())?;
                changed = true;
            }
        }
        if changed {
            inner.db.flush()?;
        }
        Ok(())
    }
}

/// Removes the oldest messages beyond the stream's count, size and age limits: whole chunks
/// from the front, then, when only the start of the first chunk must go, its remaining messages
/// are rewritten under their new first sequence, removing the old key in the same atomic batch.
fn enforce_limits(handle: &StreamHandle) -> Result<()> {
    trim_front(handle, 0)
}

/// [`enforce_limits`], also removing every message with a sequence below `purge_below`.
fn trim_front(handle: &StreamHandle, purge_below: u64) -> Result<()> {
    let (max_messages, max_bytes, max_age) = {
        let config = handle.config.read().unwrap();
        (config.max_messages, config.max_bytes, config.max_age)
    };
    let horizon = max_age.map(|a| now_ns() - a.as_nanos() as i64);
    let mut state = handle.state.lock().unwrap();
    while state.messages > 0 {
        let Some((k, v)) = handle.tree.first()? else { break };
        let first = codec::key_seq(&k)?;
        let mut records = codec::records(&v)?;
        let (mut dropped, mut dropped_bytes) = (0u64, 0u64);
        let mut kept = None;
        for record in records.by_ref() {
            let record = record?;
            let messages = state.messages.saturating_sub(dropped);
            let bytes = state.bytes.saturating_sub(dropped_bytes);
            let over_count = max_messages > 0 && messages > max_messages;
            let over_bytes = max_bytes > 0 && bytes > max_bytes;
            let too_old = match horizon {
                Some(h) => codec::time_ns(record)? < h,
                None => false,
            };
            let purged = first + dropped < purge_below;
            if messages == 0 || !(over_count || over_bytes || too_old || purged) {
                kept = Some(record);
                break;
            }
            dropped += 1;
            dropped_bytes += codec::size_of(record)?;
        }
        if dropped == 0 {
            break;
        }
        match kept {
            None => {
                handle.tree.remove(&k)?;
            }
            Some(kept) => {
                let mut rest = ChunkBuilder::default();
                rest.push_record(kept)?;
                for record in records {
                    rest.push_record(record?)?;
                }
                let mut batch = sled::Batch::default();
                batch.remove(&k);
                batch.insert(&seq_key(first + dropped), rest.finish().expect("a kept record"));
                handle.tree.apply_batch(batch)?;
            }
        }
        state.messages = state.messages.saturating_sub(dropped);
        state.bytes = state.bytes.saturating_sub(dropped_bytes);
        state.first_seq = first + dropped;
        if kept.is_some() {
            break;
        }
    }
    if state.messages == 0 {
        state.first_seq = state.last_seq + 1;
    }
    Ok(())
}

fn group_len(op: &Op) -> usize {
    match op {
        Op::Publish { messages, .. } => messages.len(),
        _ => 1,
    }
}
