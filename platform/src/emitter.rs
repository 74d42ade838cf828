//! Turning documents into sequenced events and handing them on.
//!
//! Every producer (a node, an autonomous agent, the AAA service) numbers its events with a
//! monotonically increasing sequence. Consumers use it to detect gaps and to check per-node
//! order; the event id (a UUIDv7) is the dedupe key everywhere downstream.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chorus_backbone::{Backbone, Message};
use chorus_schemas::{Event, EventRecord};
use futures::{Stream, StreamExt};

use crate::PlatformError;

/// Events a producer makes as it goes, for [`EventSink::store_flow`]; it may borrow what
/// they are made from, and is polled only as the sink has room, so making them on demand
/// overlaps the producer's work with storing.
pub type RecordFlow<'a> = Pin<Box<dyn Stream<Item = EventRecord> + Send + 'a>>;

/// Records [`EventSink::store_flow`]'s default takes at once from what is ready.
const FLOW_CHUNK: usize = 1_024;

/// Where stamped events go: the node's outbox, a backbone, or a batching sink.
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Stores the events durably (or fails); order is kept.
    async fn store(&self, records: Vec<EventRecord>) -> Result<(), PlatformError>;

    /// Stores a flow of events durably, in order, as the producer makes them (a storm of
    /// simulated nodes): unlike repeated [`EventSink::store`] calls, a backbone keeps its
    /// publishes on the wire between the producer's batches. Returns how many were stored;
    /// stops at the first failure (the events before it are stored). The default stores what
    /// is ready in batches.
    async fn store_flow<'a>(&self, records: RecordFlow<'a>) -> Result<u64, PlatformError> {
        let mut chunks = records.ready_chunks(FLOW_CHUNK);
        let mut stored = 0;
        while let Some(chunk) = chunks.next().await {
            let n = chunk.len() as u64;
            self.store(chunk).await?;
            stored += n;
        }
        Ok(stored)
    }
}

/// `items` mapped by `convert` up to the first conversion that fails, whose error is left in
/// the returned slot (take it with [`take_failure`] once the stream is done): how a flow
/// stops at an event that cannot be made or carried (its subject, its signature) while what
/// came before it is still stored.
pub fn until_failure<'a, T, U, E>(
    items: impl Stream<Item = T> + Send + 'a,
    mut convert: impl FnMut(T) -> Result<U, E> + Send + 'a,
) -> (impl Stream<Item = U> + Send + 'a, Arc<Mutex<Option<E>>>)
where
    T: Send + 'a,
    U: Send + 'a,
    E: Send + 'a,
{
    let failure = Arc::new(Mutex::new(None));
    let slot = failure.clone();
    let converted = items.scan((), move |_, item| {
        futures::future::ready(match convert(item) {
            Ok(u) => Some(u),
            Err(e) => {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                None
            }
        })
    });
    (converted, failure)
}

/// The failure [`until_failure`] left, if any.
pub fn take_failure<E>(slot: &Mutex<Option<E>>) -> Option<E> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Converts a record into the backbone message that carries it.
pub fn to_message(record: &EventRecord) -> Result<Message, PlatformError> {
    Ok(Message::new(record.id.clone(), record.nats_subject()?, record.encode()))
}

/// [`to_message`] for a record that is not needed afterwards: its id moves into the message
/// instead of being copied (a storm of simulated nodes makes one per event).
fn into_message(record: EventRecord) -> Result<Message, PlatformError> {
    let (subject, payload) = (record.nats_subject()?, record.encode());
    Ok(Message::new(record.id, subject, payload))
}

/// Any backbone is a sink: events are published on their subjects.
pub struct BackboneSink(pub Arc<dyn Backbone>);

#[async_trait]
impl EventSink for BackboneSink {
    async fn store(&self, records: Vec<EventRecord>) -> Result<(), PlatformError> {
        let messages = records.into_iter().map(into_message).collect::<Result<Vec<_>, _>>()?;
        self.0.publish_batch(messages).await?;
        Ok(())
    }

    async fn store_flow<'a>(&self, records: RecordFlow<'a>) -> Result<u64, PlatformError> {
        let (messages, refused) = until_failure(records, into_message);
        let mut acks = self.0.clone().publish_stream(Box::pin(messages));
        let mut stored = 0;
        while let Some(ack) = acks.next().await {
            ack?;
            stored += 1;
        }
        match take_failure(&refused) {
            Some(e) => Err(e),
            None => Ok(stored),
        }
    }
}

/// Keeps every record it is given in memory, in order; can be switched off to fail like an
/// unreachable store. For tests and in-process tools that want the records themselves.
#[derive(Debug, Default)]
pub struct MemorySink {
    records: std::sync::Mutex<Vec<EventRecord>>,
    down: std::sync::atomic::AtomicBool,
}

impl MemorySink {
    /// Every record stored so far, in order.
    pub fn records(&self) -> Vec<EventRecord> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// While `down`, every store fails with [`PlatformError::Unavailable`] and keeps nothing.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

#[async_trait]
impl EventSink for MemorySink {
    async fn store(&self, records: Vec<EventRecord>) -> Result<(), PlatformError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PlatformError::Unavailable("memory sink switched off".into()));
        }
        self.records.lock().unwrap_or_else(|e| e.into_inner()).extend(records);
        Ok(())
    }
}

/// Signs every record with the producer's key, its node credential beside the signature,
/// before passing it on, so consumers trusting the issuer can tell the node's own events
/// from forged or misattributed ones. Wraps any sink (the outbox, the backbone), so what is
/// stored and forwarded is already signed.
pub struct SigningSink {
    inner: Arc<dyn EventSink>,
    identity: chorus_identity::Identity,
}

impl SigningSink {
    /// Signs as `identity`, then stores in `inner`.
    pub fn new(inner: Arc<dyn EventSink>, identity: chorus_identity::Identity) -> Self {
        SigningSink { inner, identity }
    }
}

#[async_trait]
impl EventSink for SigningSink {
    async fn store(&self, records: Vec<EventRecord>) -> Result<(), PlatformError> {
        let (signer, token) = (self.identity.signer(), Some(self.identity.token()));
        let signed = records.into_iter().map(|r| r.signed(&**signer, token)).collect::<Result<Vec<_>, _>>()?;
        self.inner.store(signed).await
    }

    async fn store_flow<'a>(&self, records: RecordFlow<'a>) -> Result<u64, PlatformError> {
        let identity = self.identity.clone();
        let (signed, refused) = until_failure(records, move |r| r.signed(&**identity.signer(), Some(identity.token())));
        let stored = self.inner.store_flow(Box::pin(signed)).await?;
        match take_failure(&refused) {
            Some(e) => Err(e.into()),
            None => Ok(stored),
        }
    }
}

/// Stamps documents of one producer with its sequence and site, and stores them in a sink.
pub struct Emitter {
    sink: Arc<dyn EventSink>,
    next_seq: AtomicU64,
    site: Option<String>,
    /// Held from stamping to storing, so store order is sequence order.
    order: tokio::sync::Mutex<()>,
}

impl Emitter {
    /// `next_seq` is the sequence of the next event (1 for a new producer; after a restart,
    /// one past the last event this producer stored).
    pub fn new(sink: Arc<dyn EventSink>, next_seq: u64, site: Option<String>) -> Self {
        Emitter { sink, next_seq: AtomicU64::new(next_seq.max(1)), site, order: tokio::sync::Mutex::new(()) }
    }

    /// The site stamped on this producer's events, if any.
    pub fn site(&self) -> Option<&str> {
        self.site.as_deref()
    }

    /// Stamps a document without storing it (for callers that batch).
    pub fn stamp(&self, data: impl Into<Event>) -> EventRecord {
        let record = EventRecord::new(data, self.next_seq.fetch_add(1, Ordering::SeqCst));
        match &self.site {
            Some(site) => record.with_site(site.clone()),
            None => record,
        }
    }

    /// Stamps and durably stores one event, and returns it as stored.
    pub async fn emit(&self, data: impl Into<Event>) -> Result<EventRecord, PlatformError> {
        let _order = self.order.lock().await;
        let record = self.stamp(data);
        self.sink.store(vec![record.clone()]).await?;
        Ok(record)
    }

    /// Stamps and durably stores one event, for callers that do not need it back: saves the
    /// copy [`Emitter::emit`] makes (an RPC server records two events per node per request).
    pub async fn record(&self, data: impl Into<Event>) -> Result<(), PlatformError> {
        let _order = self.order.lock().await;
        let record = self.stamp(data);
        self.sink.store(vec![record]).await
    }

    /// The sink events go to.
    pub fn sink(&self) -> &Arc<dyn EventSink> {
        &self.sink
    }

    /// The sequence the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst)
    }
}
