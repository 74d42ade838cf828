//! The single writer thread: routes publishes to streams, dedupes by event id, assigns
//! sequences, enforces retention and group-commits to disk before acknowledging.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::sync::{oneshot, watch, OwnedSemaphorePermit};

use super::codec::{self, seq_key};
use super::{Inner, StreamHandle, StreamState};
use crate::{BackboneError, Message, PublishAck, Result, StreamConfig};

pub(crate) enum Op {
    Publish { messages: Vec<Message>, reply: oneshot::Sender<Result<Reply>>, _permit: OwnedSemaphorePermit },
    EnsureStream { config: StreamConfig, reply: oneshot::Sender<Result<Reply>> },
    DeleteStream { name: String, reply: oneshot::Sender<Result<Reply>> },
}

pub(crate) enum Reply {
    Acks(Vec<PublishAck>),
    Done,
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
/// agree with the tree's ends, recounted otherwise (a crash between a write and its stats).
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
            let last_seq = codec::key_seq(&lk)?;
            if saved.first_seq == first && saved.last_seq == last_seq {
                saved
            } else {
                let mut bytes = 0;
                let mut messages = 0;
                for item in tree.iter() {
                    let (_, v) = item?;
                    bytes += codec::size_of(&v)?;
                    messages += 1;
                }
                StreamState { first_seq: first, last_seq, messages, bytes, last_time_ns: codec::time_ns(&lv)? }
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

/// Event ids seen within a stream's dedupe window, oldest first for pruning.
#[derive(Default)]
struct DedupeIndex {
    ids: HashMap<String, u64>,
    order: VecDeque<(i64, String)>,
}

impl DedupeIndex {
    /// Rebuilds the index from the newest messages of a stream.
    fn rebuild(handle: &StreamHandle, window: Duration) -> Result<Self> {
        let mut index = DedupeIndex::default();
        let horizon = now_ns() - window.as_nanos() as i64;
        let mut found = Vec::new();
        for item in handle.tree.iter().rev() {
            let (k, v) = item?;
            let (t, id) = codec::id_of(&v)?;
            if t < horizon {
                break;
            }
            found.push((t, id, codec::key_seq(&k)?));
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
        .map_err(|e| BackboneError::Storage(format!("spawning writer thread: {e}")))
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
                Op::EnsureStream { config, reply } => {
                    // Admin ops are rare: commit what is queued before them, keeping order.
                    self.commit_publishes(inner, std::mem::take(&mut publishes));
                    let _ = reply.send(self.ensure_stream(inner, config).map(|_| Reply::Done));
                }
                Op::DeleteStream { name, reply } => {
                    self.commit_publishes(inner, std::mem::take(&mut publishes));
                    let _ = reply.send(self.delete_stream(inner, &name).map(|_| Reply::Done));
                }
            }
        }
        self.commit_publishes(inner, publishes);
    }

    fn ensure_stream(&mut self, inner: &Inner, config: StreamConfig) -> Result<()> {
        let mut streams = inner.streams.write().unwrap();
        for (name, other) in streams.iter() {
            if *name == config.name {
                continue;
            }
            let other_cfg = other.config.read().unwrap();
            for a in &config.subjects {
                for b in &other_cfg.subjects {
                    if filters_overlap(a, b) {
                        return Err(BackboneError::InvalidConfig(format!(
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
            self.enforce_limits(inner, &h)?;
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

    fn dedupe_for(&mut self, handle: &StreamHandle) -> Result<&mut DedupeIndex> {
        if !self.dedupe.contains_key(&handle.name) {
            let window = handle.config.read().unwrap().dedupe_window;
            self.dedupe.insert(handle.name.clone(), DedupeIndex::rebuild(handle, window)?);
        }
        Ok(self.dedupe.get_mut(&handle.name).unwrap())
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
        let streams: Vec<Arc<StreamHandle>> = inner.streams.read().unwrap().values().cloned().collect();
        let mut batches: HashMap<String, (Arc<StreamHandle>, sled::Batch, StreamState)> = HashMap::new();
        let mut results = Vec::with_capacity(publishes.len());
        for (messages, _, _) in &publishes {
            let mut acks = Vec::with_capacity(messages.len());
            let mut failed = None;
            for m in messages {
                match self.stage(&streams, &mut batches, m) {
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
        let durable = self.write_batches(inner, &mut batches);
        for ((_, reply, _permit), result) in publishes.into_iter().zip(results) {
            let result = match (&durable, result) {
                (Err(e), _) => Err(BackboneError::Storage(e.to_string())),
                (Ok(()), r) => r.map(Reply::Acks),
            };
            let _ = reply.send(result);
        }
    }

    /// Routes one message to its stream, dedupes it and stages it in the stream's batch.
    fn stage(
        &mut self,
        streams: &[Arc<StreamHandle>],
        batches: &mut HashMap<String, (Arc<StreamHandle>, sled::Batch, StreamState)>,
        m: &Message,
    ) -> Result<PublishAck> {
        let handle = streams
            .iter()
            .find(|h| h.config.read().unwrap().subjects.iter().any(|f| crate::subject::matches(f, &m.subject)))
            .ok_or_else(|| BackboneError::NoStreamForSubject(m.subject.clone()))?;
        let entry = batches
            .entry(handle.name.clone())
            .or_insert_with(|| (handle.clone(), sled::Batch::default(), *handle.state.lock().unwrap()));
        let window = handle.config.read().unwrap().dedupe_window;
        let dedupe = self.dedupe_for(handle)?;
        let now = now_ns();
        dedupe.prune(now - window.as_nanos() as i64);
        if let Some(seq) = dedupe.ids.get(&m.id) {
            return Ok(PublishAck { stream: handle.name.clone(), sequence: *seq, duplicate: true });
        }
        let (_, batch, state) = entry;
        let time = now.max(state.last_time_ns);
        state.last_seq += 1;
        if state.messages == 0 {
            state.first_seq = state.last_seq;
        }
        state.messages += 1;
        state.bytes += codec::stored_size(m);
        state.last_time_ns = time;
        batch.insert(&seq_key(state.last_seq), codec::encode(m, time));
        dedupe.ids.insert(m.id.clone(), state.last_seq);
        dedupe.order.push_back((time, m.id.clone()));
        Ok(PublishAck { stream: handle.name.clone(), sequence: state.last_seq, duplicate: false })
    }

    fn write_batches(
        &mut self,
        inner: &Inner,
        batches: &mut HashMap<String, (Arc<StreamHandle>, sled::Batch, StreamState)>,
    ) -> Result<()> {
        let result = (|| {
            for (handle, batch, state) in batches.values_mut() {
                handle.tree.apply_batch(std::mem::take(batch))?;
                *handle.state.lock().unwrap() = *state;
                self.enforce_limits(inner, handle)?;
                let st = *handle.state.lock().unwrap();
                inner.meta.insert(stats_key(&handle.name), serde_json::to_vec(&st).unwrap())?;
            }
            inner.db.flush()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                for (handle, _, _) in batches.values() {
                    let last = handle.state.lock().unwrap().last_seq;
                    handle.durable.send_replace(last);
                }
                Ok(())
            }
            Err(e) => {
                // The group is not acknowledged; forget its staged ids so a retry is stored, and
                // reload counters from disk, which is the truth after a failed write.
                for (handle, _, _) in batches.values() {
                    self.dedupe.remove(&handle.name);
                    if let Ok(reopened) =
                        open_stream(&inner.db, &inner.meta, handle.config.read().unwrap().clone())
                    {
                        *handle.state.lock().unwrap() = *reopened.state.lock().unwrap();
                    }
                }
                Err(e)
            }
        }
    }

    /// Removes the oldest messages beyond the stream's count, size and age limits.
    fn enforce_limits(&mut self, _inner: &Inner, handle: &StreamHandle) -> Result<()> {
        let config = handle.config.read().unwrap().clone();
        let horizon = config.max_age.map(|a| now_ns() - a.as_nanos() as i64);
        let mut state = handle.state.lock().unwrap();
        while state.messages > 0 {
            let over_count = config.max_messages > 0 && state.messages > config.max_messages;
            let over_bytes = config.max_bytes > 0 && state.bytes > config.max_bytes;
            let Some((k, v)) = handle.tree.first()? else { break };
            let too_old = match horizon {
                Some(h) => codec::time_ns(&v)? < h,
                None => false,
            };
            if !(over_count || over_bytes || too_old) {
                break;
            }
            handle.tree.remove(&k)?;
            state.messages -= 1;
            state.bytes = state.bytes.saturating_sub(codec::size_of(&v)?);
            state.first_seq = codec::key_seq(&k)? + 1;
        }
        if state.messages == 0 {
            state.first_seq = state.last_seq + 1;
        }
        Ok(())
    }

    fn expire_all(&mut self, inner: &Inner) -> Result<()> {
        let streams: Vec<Arc<StreamHandle>> = inner.streams.read().unwrap().values().cloned().collect();
        let mut changed = false;
        for h in streams {
            if h.config.read().unwrap().max_age.is_none() {
                continue;
            }
            let before = *h.state.lock().unwrap();
            self.enforce_limits(inner, &h)?;
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

fn group_len(op: &Op) -> usize {
    match op {
        Op::Publish { messages, .. } => messages.len(),
        _ => 1,
    }
}

/// Whether two subject filters can match a common subject (streams must not share one).
pub(crate) fn filters_overlap(a: &str, b: &str) -> bool {
    let (ta, tb): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    let mut i = 0;
    loop {
        match (ta.get(i), tb.get(i)) {
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (Some(x), Some(y)) if *x == "*" || *y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::filters_overlap;

    #[test]
    fn overlapping_filters_are_found() {
        assert!(filters_overlap("a.>", "a.b.c"));
        assert!(filters_overlap("a.*.c", "a.b.*"));
        assert!(!filters_overlap("a.b", "a.c"));
        assert!(!filters_overlap("a.b", "a.b.c"));
        assert!(filters_overlap(">", "x"));
    }
}
