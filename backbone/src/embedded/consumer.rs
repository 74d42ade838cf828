//! Durable consumers of the embedded engine.
//!
//! A consumer's position is its delivery cursor plus the set of delivered but unacknowledged
//! sequences (bounded by `max_ack_pending`). Both are saved in the `meta` tree at every fetch and
//! when the handle is dropped; after a crash, anything delivered and not recorded as acked is
//! delivered again, which is the at-least-once contract projections build exactly-once on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::codec;
use super::{Inner, StreamHandle};
use crate::message::Acker;
use crate::{BackboneError, Consumer, ConsumerConfig, Delivery, Result};

pub(crate) fn state_key(stream: &str, name: &str) -> Vec<u8> {
    format!("consumer/{stream}/{name}").into_bytes()
}

#[derive(Serialize, Deserialize)]
struct Saved {
    config: ConsumerConfig,
    next_seq: u64,
    /// (sequence, deliveries so far)
    outstanding: Vec<(u64, u32)>,
}

struct Outstanding {
    deadline: Instant,
    deliveries: u32,
}

struct State {
    config: ConsumerConfig,
    next_seq: u64,
    outstanding: BTreeMap<u64, Outstanding>,
}

pub(crate) struct Shared {
    stream: Arc<StreamHandle>,
    meta: sled::Tree,
    key: Vec<u8>,
    state: Mutex<State>,
}

impl Shared {
    /// Opens a consumer: the live one when this process has it, the saved one when it exists on
    /// disk (its saved configuration wins for the start position), a new one otherwise.
    pub(crate) fn open(inner: &Inner, stream: Arc<StreamHandle>, config: &ConsumerConfig) -> Result<Arc<Shared>> {
        let id = (stream.name.clone(), config.name.clone());
        let mut registry = inner.consumers.lock().unwrap();
        if let Some(existing) = registry.get(&id) {
            let mut st = existing.state.lock().unwrap();
            st.config.ack_wait = config.ack_wait;
            st.config.max_deliver = config.max_deliver;
            st.config.max_ack_pending = config.max_ack_pending;
            st.config.filter_subjects = config.filter_subjects.clone();
            drop(st);
            return Ok(existing.clone());
        }
        let key = state_key(&stream.name, &config.name);
        let state = match inner.meta.get(&key)? {
            Some(v) => {
                let saved: Saved = serde_json::from_slice(&v)
                    .map_err(|e| BackboneError::Corrupt(format!("consumer {}: {e}", config.name)))?;
                let now = Instant::now();
                let mut cfg = config.clone();
                cfg.start = saved.config.start;
                State {
                    config: cfg,
                    next_seq: saved.next_seq,
                    outstanding: saved
                        .outstanding
                        .into_iter()
                        .map(|(s, d)| (s, Outstanding { deadline: now, deliveries: d }))
                        .collect(),
                }
            }
            None => State {
                config: config.clone(),
                next_seq: stream.start_seq(&config.start)?,
                outstanding: BTreeMap::new(),
            },
        };
        let shared = Arc::new(Shared { stream, meta: inner.meta.clone(), key, state: Mutex::new(state) });
        shared.persist()?;
        registry.insert(id, shared.clone());
        Ok(shared)
    }

    pub(crate) fn persist(&self) -> Result<()> {
        let st = self.state.lock().unwrap();
        let saved = Saved {
            config: st.config.clone(),
            next_seq: st.next_seq,
            outstanding: st.outstanding.iter().map(|(s, o)| (*s, o.deliveries)).collect(),
        };
        drop(st);
        self.meta.insert(&self.key, serde_json::to_vec(&saved).expect("consumer state serialises"))?;
        Ok(())
    }

    /// Collects due redeliveries and new messages, without waiting.
    fn take(self: &Arc<Self>, max: usize) -> Result<(Vec<Delivery>, Option<Instant>)> {
        let mut out = Vec::new();
        let now = Instant::now();
        let mut st = self.state.lock().unwrap();
        let ack_wait = st.config.ack_wait;
        let max_deliver = st.config.max_deliver;

        let due: Vec<u64> =
            st.outstanding.iter().filter(|(_, o)| o.deadline <= now).map(|(s, _)| *s).take(max).collect();
        for seq in due {
            let gave_up = max_deliver > 0 && st.outstanding[&seq].deliveries >= max_deliver;
            let message = if gave_up { None } else { self.stream.read(seq)? };
            match message {
                None => {
                    st.outstanding.remove(&seq);
                }
                Some(message) => {
                    let o = st.outstanding.get_mut(&seq).unwrap();
                    o.deliveries += 1;
                    o.deadline = now + ack_wait;
                    out.push(self.delivery(message, o.deliveries));
                }
            }
        }

        let durable = *self.stream.durable.borrow();
        let first = self.stream.state.lock().unwrap().first_seq;
        if st.next_seq < first {
            st.next_seq = first;
        }
        if out.len() < max && st.outstanding.len() < st.config.max_ack_pending && st.next_seq <= durable {
            let room = (max - out.len()).min(st.config.max_ack_pending - st.outstanding.len());
            let st = &mut *st;
            let mut taken = 0;
            let mut scanned_to = durable + 1;
            self.stream.scan(st.next_seq, durable, |seq, record| {
                if !crate::subject::matches_any(&st.config.filter_subjects, codec::subject_of(record)?) {
                    return Ok(true);
                }
                let message = codec::decode(&self.stream.name, seq, record)?;
                st.outstanding.insert(seq, Outstanding { deadline: now + ack_wait, deliveries: 1 });
                out.push(self.delivery(message, 1));
                taken += 1;
                if taken >= room {
                    scanned_to = seq + 1;
                    return Ok(false);
                }
                Ok(true)
            })?;
            st.next_seq = scanned_to;
        }
        let next_deadline = st.outstanding.values().map(|o| o.deadline).min();
        drop(st);
        if !out.is_empty() {
            self.persist()?;
        }
        Ok((out, next_deadline))
    }

    fn delivery(self: &Arc<Self>, message: crate::StoredMessage, delivered: u32) -> Delivery {
        let seq = message.sequence;
        Delivery { message, delivered, acker: Box::new(EmbeddedAcker { shared: self.clone(), seq }) }
    }

    fn pending(&self) -> Result<u64> {
        let st = self.state.lock().unwrap();
        let durable = *self.stream.durable.borrow();
        let in_flight = st.outstanding.len() as u64;
        if st.next_seq > durable {
            return Ok(in_flight);
        }
        if st.config.filter_subjects.is_empty() {
            return Ok(in_flight + durable + 1 - st.next_seq.max(self.stream.state.lock().unwrap().first_seq));
        }
        let mut n = in_flight;
        self.stream.scan(st.next_seq, durable, |_, record| {
            if crate::subject::matches_any(&st.config.filter_subjects, codec::subject_of(record)?) {
                n += 1;
            }
            Ok(true)
        })?;
        Ok(n)
    }
}

struct EmbeddedAcker {
    shared: Arc<Shared>,
    seq: u64,
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<()> {
        self.shared.state.lock().unwrap().outstanding.remove(&self.seq);
        Ok(())
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<()> {
        if let Some(o) = self.shared.state.lock().unwrap().outstanding.get_mut(&self.seq) {
            o.deadline = Instant::now() + delay.unwrap_or_default();
        }
        Ok(())
    }
}

/// A handle on an embedded durable consumer; handles of the same name share one position.
pub(crate) struct EmbeddedConsumer {
    shared: Arc<Shared>,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl EmbeddedConsumer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let changes = shared.stream.durable.subscribe();
        EmbeddedConsumer { shared, changes }
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        if let Err(e) = self.shared.persist() {
            tracing::warn!(error = %e, "consumer position not saved when the consumer was dropped");
        }
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + wait;
        loop {
            self.changes.borrow_and_update();
            let (out, next_redelivery) = self.shared.take(max.max(1))?;
            if !out.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            let wake = next_redelivery.map_or(deadline, |d| d.min(deadline)).max(now + Duration::from_millis(1));
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return Err(BackboneError::Closed);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn pending(&mut self) -> Result<u64> {
        self.shared.pending()
    }
}
