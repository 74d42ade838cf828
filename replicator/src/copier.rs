//! The copy loop of one (link, stream): a reader that replays the source from the sequence
//! after the checkpoint and prepares batches, and a publisher that stores each batch in the
//! target, then moves the checkpoint. The two overlap through a small bounded channel, so
//! the next batch is read while the current one is being acknowledged, and the reader waits
//! when the target is slow or down.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Backbone, Message, ReplayOptions, StartPosition, StoredMessage, StreamConfig};
use chorus_runtime::Shutdown;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::progress::Progress;
use crate::rewrite::{rewrite_subject, Rewrite};
use crate::sampling::Sampler;

/// Everything one copier needs.
pub(crate) struct Copier {
    pub progress: Progress,
    pub source: Arc<dyn Backbone>,
    pub target: Arc<dyn Backbone>,
    /// Created on the target (if missing) before the first publish, retried while the
    /// target is unreachable, so a replicator can start before its hub.
    pub target_stream: Option<StreamConfig>,
    pub filter_subjects: Vec<String>,
    pub rewrites: Vec<Rewrite>,
    pub source_site: Option<String>,
    pub target_site: Option<String>,
    pub sampler: Option<Sampler>,
    pub batch: usize,
}

/// How long the reader waits for the source before checking that its replay still moves.
const STALL_CHECK: Duration = Duration::from_secs(5);

/// A prepared batch: what to publish, and the source position it completes.
struct Batch {
    messages: Vec<Message>,
    last_sequence: u64,
    last_time: chrono::DateTime<chrono::Utc>,
}

/// The few envelope fields the copier looks at, read without building the event.
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    site: Option<Cow<'a, str>>,
    #[serde(default)]
    specversion: Option<serde::de::IgnoredAny>,
}

impl Copier {
    /// Runs until `stop` turns true. Never returns an error: every failure is counted,
    /// reported through health, and retried, because giving up would lose events.
    pub async fn run(mut self, stop: Shutdown) {
        let Some(start) = self.progress.load(&stop).await else { return };
        self.progress.reached(start, 0);
        let (tx, rx) = mpsc::channel::<Batch>(4);
        let sampler = self.sampler.take();
        let me = Arc::new(self);
        let lag = tokio::spawn(me.clone().track_lag(stop.clone()));
        let reader = tokio::spawn(me.clone().read(start + 1, sampler, tx, stop.clone()));
        let (acked, acked_rx) = watch::channel((start, 0i64));
        let checkpoint = tokio::spawn({
            let me = me.clone();
            async move { me.checkpoint(acked_rx).await }
        });
        me.publish(rx, acked, stop).await;
        reader.await.ok();
        checkpoint.await.ok();
        lag.abort();
    }

    /// Replays the source from `next` and sends prepared batches; reopens the replay after a
    /// source failure from the first sequence not yet handed to the publisher.
    async fn read(
        self: Arc<Self>,
        mut next: u64,
        mut sampler: Option<Sampler>,
        tx: mpsc::Sender<Batch>,
        stop: Shutdown,
    ) {
        let mut backoff = self.progress.backoff();
        // A link that never copied starts at the oldest event left; from then on, events
        // the source's retention removed before they were copied are a gap: said, counted
        // and recorded on the target, never skipped silently.
        let mut started = next > 1;
        loop {
            if let Ok(info) = self.source.stream_info(&self.progress.stream).await {
                if info.first_sequence > next && started {
                    self.progress.record_gap(&*self.target, next, info.first_sequence - 1, &stop).await;
                    next = info.first_sequence;
                } else if info.first_sequence > next {
                    tracing::info!(link = %self.progress.link, stream = %self.progress.stream, first = info.first_sequence, "a new link starts at the oldest event left");
                    next = info.first_sequence;
                }
                started = true;
            }
            let options = ReplayOptions {
                start: StartPosition::Sequence(next),
                filter_subjects: self.filter_subjects.clone(),
                follow: true,
            };
            let replay = tokio::select! {
                r = self.source.replay(&self.progress.stream, options) => r,
                _ = stop.requested() => return,
            };
            let replay = match replay {
                Ok(r) => r,
                Err(e) => {
                    self.progress.fail("source", e.to_string());
                    if !backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            };
            let mut chunks = replay.ready_chunks(self.batch);
            loop {
                let items = tokio::select! {
                    items = tokio::time::timeout(STALL_CHECK, chunks.next()) => items,
                    _ = stop.requested() => return,
                };
                let items = match items {
                    Ok(items) => items,
                    // Nothing for a while: fine if the source has nothing new. If it has, the
                    // replay is stuck (an ephemeral consumer the server dropped while the
                    // reader waited on a slow or restarting target): open a new one from `next`.
                    Err(_elapsed) => match self.source.stream_info(&self.progress.stream).await {
                        // (With subject filters the stream's last sequence says nothing about
                        // matching messages, so filtered links rely on replay errors alone.)
                        Ok(info) if self.filter_subjects.is_empty() && info.last_sequence >= next => {
                            self.progress.fail(
                                "source",
                                format!("replay stalled before sequence {next} of {}; reopening", info.last_sequence),
                            );
                            break;
                        }
                        _ => continue,
                    },
                };
                let Some(items) = items else { break };
                let mut batch = Batch {
                    messages: Vec::with_capacity(items.len()),
                    last_sequence: 0,
                    last_time: Default::default(),
                };
                let mut failed = None;
                for item in items {
                    match item {
                        Ok(m) => {
                            next = m.sequence + 1;
                            batch.last_sequence = m.sequence;
                            batch.last_time = m.time;
                            if let Some(message) = self.prepare(m, sampler.as_mut()) {
                                batch.messages.push(message);
                            }
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if batch.last_sequence != 0 {
                    backoff.reset();
                    if tx.send(batch).await.is_err() {
                        return;
                    }
                }
                if let Some(e) = failed {
                    self.progress.fail("source", e.to_string());
                    break;
                }
            }
            if !backoff.wait(&stop).await {
                return;
            }
        }
    }

    /// Loop prevention, sampling, rewrite and provenance; `None` when the event is not
    /// copied. Events the copier cannot read are copied unchanged: consumers dead-letter
    /// them with the reason, the replicator does not silently drop them.
    fn prepare(&self, m: StoredMessage, sampler: Option<&mut Sampler>) -> Option<Message> {
        // Another publisher's message (go-choria's have no id) is copied with a derived id and
        // its headers, so a restarted copier stores it once and the copy is the original; the
        // copy carries the original's store time (views check event clocks against it).
        let (id, headers) = (m.copy_id(), m.copy_headers());
        let mut payload = m.payload;
        if self.source_site.is_some() || self.target_site.is_some() {
            let peek: Option<Peek> = serde_json::from_slice(&payload).ok();
            let site = peek.as_ref().and_then(|p| p.site.as_deref());
            if site.is_some() && site == self.target_site.as_deref() {
                self.progress.metrics.skipped.get_or_create(&self.progress.reason("loop")).inc();
                return None;
            }
            if let (Some(p), None, Some(source_site)) = (&peek, site, &self.source_site) {
                if p.specversion.is_some() {
                    payload = with_site(&payload, source_site).map(Into::into).unwrap_or(payload.clone());
                }
            }
        }
        if let Some(s) = sampler {
            if !s.forward(&m.subject, &payload) {
                self.progress.metrics.skipped.get_or_create(&self.progress.reason("sampled")).inc();
                return None;
            }
        }
        let subject = match rewrite_subject(&self.rewrites, &m.subject) {
            Cow::Borrowed(_) => m.subject,
            Cow::Owned(s) => s,
        };
        Some(Message::new(id, subject, payload).with_headers(headers))
    }

    /// Publishes batches in order, retrying each until the target stores it, then moves the
    /// checkpoint. Batches waiting in the channel are merged up to the batch size so a
    /// fast source meets few, large, pipelined publishes.
    async fn publish(&self, mut rx: mpsc::Receiver<Batch>, acked: watch::Sender<(u64, i64)>, stop: Shutdown) {
        let labels = self.progress.labels();
        if let Some(cfg) = &self.target_stream {
            let mut backoff = self.progress.backoff();
            while let Err(e) = self.target.ensure_stream(cfg).await {
                self.progress.fail("target", format!("creating stream {}: {e}", cfg.name));
                if !backoff.wait(&stop).await {
                    return;
                }
            }
        }
        loop {
            let first = tokio::select! {
                b = rx.recv() => b,
                _ = stop.requested() => return,
            };
            let Some(mut batch) = first else { return };
            while batch.messages.len() < self.batch {
                match rx.try_recv() {
                    Ok(more) => {
                        batch.messages.extend(more.messages);
                        batch.last_sequence = more.last_sequence;
                        batch.last_time = more.last_time;
                    }
                    Err(_) => break,
                }
            }
            let count = batch.messages.len();
            if count > 0 {
                let mut backoff = self.progress.backoff();
                loop {
                    match self.target.publish_batch(batch.messages.clone()).await {
                        Ok(acks) => {
                            let dups = acks.iter().filter(|a| a.duplicate).count() as u64;
                            self.progress.metrics.copied.get_or_create(&labels).inc_by(count as u64 - dups);
                            if dups > 0 {
                                self.progress.metrics.skipped.get_or_create(&self.progress.reason("duplicate")).inc_by(dups);
                            }
                            break;
                        }
                        Err(e) => {
                            self.progress.fail("target", e.to_string());
                            if !backoff.wait(&stop).await {
                                return;
                            }
                        }
                    }
                }
            }
            // The checkpoint is written by its own task, off the publish path: a flush costs
            // an fsync, and the next batch should be on the wire meanwhile. Losing the newest
            // checkpoint in a crash only re-sends batches the target's dedupe drops.
            acked.send_replace((batch.last_sequence, batch.last_time.timestamp_millis()));
        }
    }

    /// Persists the newest acknowledged position, coalescing updates that arrive while a
    /// flush is running; on stop, writes the last one before returning.
    async fn checkpoint(&self, mut acked: watch::Receiver<(u64, i64)>) {
        let key = self.progress.key();
        let mut written = acked.borrow().0;
        loop {
            let closed = acked.changed().await.is_err();
            let (sequence, time) = *acked.borrow_and_update();
            if sequence != written {
                // Not cancelled by a stop: the last position must be written before returning.
                let mut backoff = self.progress.backoff();
                while let Err(e) = self.progress.checkpoints.store(&key, sequence).await {
                    self.progress.fail("checkpoint", e.to_string());
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                written = sequence;
                self.progress.reached(sequence, time);
            }
            if closed {
                return;
            }
        }
    }

    /// Refreshes the lag gauges once a second from the source stream's last sequence.
    async fn track_lag(self: Arc<Self>, stop: Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.requested() => return,
            }
            let health = &self.progress.health;
            health.reachability(self.source.connected(), self.target.connected());
            let Ok(info) = self.source.stream_info(&self.progress.stream).await else { continue };
            let done = health.checkpoint.load(Ordering::Relaxed);
            self.progress.lag(info.last_sequence.saturating_sub(done), health.newest_time.load(Ordering::Relaxed));
        }
    }
}

/// The event with the `site` extension added (CloudEvents extensions are top-level
/// attributes), or `None` when it is not a JSON object.
fn with_site(payload: &[u8], site: &str) -> Option<Vec<u8>> {
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload).ok()?;
    map.insert("site".into(), serde_json::Value::String(site.into()));
    serde_json::to_vec(&map).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_schemas::lifecycle::Startup;
    use chorus_schemas::EventRecord;

    #[test]
    fn site_is_added_as_an_extension_the_decoder_reads() {
        let r = EventRecord::new(Startup::new("n1", "server", "1.0"), 1);
        let stamped = with_site(&r.encode(), "east").unwrap();
        let back = EventRecord::decode(&stamped).unwrap();
        assert_eq!(back.site.as_deref(), Some("east"));
        assert_eq!(back.id, r.id);
        assert_eq!(back.data, r.data);
    }
}
