//! The copy loop of one (link, stream): a reader that replays the source from the sequence
//! after the checkpoint and prepares batches, and a publisher that stores each batch in the
//! target, then moves the checkpoint. The two overlap through a small bounded channel, so
//! the next batch is read while the current one is being acknowledged, and the reader waits
//! when the target is slow or down.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::jetstream::JetStreamBackbone;
use chorus_backbone::{Backbone, Message, ReplayOptions, StartPosition, StoredMessage, StreamConfig};
use chorus_runtime::Shutdown;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::progress::{newest_marked, Progress, REPLICATED_FROM_HEADER};
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
    /// Whether this copier may append to its `target_stream` with sequenced publishes: no
    /// other link of this replicator copies into a stream of that name. Turned off for good
    /// when another writer shows up in the stream.
    pub sequenced: Arc<std::sync::atomic::AtomicBool>,
}

/// How far back from an owned stream's end the copier looks for its newest copy.
const SCAN_BACK: u64 = 256;

/// Sequenced batches on the wire at once.
const SEQUENCED_IN_FLIGHT: usize = 4;

/// How the copier publishes.
enum Publishing {
    /// Acknowledged publishes with ids (`Nats-Msg-Id`): the target's dedupe drops repeats.
    Ids,
    /// Appends to a stream it owns after sequence `last` (see `publish_sequenced`).
    Sequenced { js: Box<JetStreamBackbone>, stream: String, last: u64 },
}

impl Publishing {
    fn sequenced(js: &JetStreamBackbone, stream: &str, last: u64) -> Self {
        Publishing::Sequenced { js: Box::new(js.clone()), stream: stream.to_string(), last }
    }
}

/// What an owned target stream's newest message is.
enum Newest {
    /// None: the stream is empty (its last sequence is `last`).
    Empty { last: u64 },
    /// This copier's newest copy is of source sequence `source`; the stream's last sequence
    /// is `last`, and that copy is the last message (`at_end`) or was followed by others'.
    Ours { source: u64, last: u64, at_end: bool },
    /// Someone else's message (or a copy by an older version without the header).
    Other,
}

/// Why a publishing run ended.
enum Ended {
    Stopped,
    /// A sequenced batch failed; `progressed` when something was stored first.
    Restart {
        progressed: bool,
    },
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
    pub async fn run(self, stop: Shutdown) {
        let Some(checkpoint) = self.progress.load(&stop).await else { return };
        self.progress.reached(checkpoint, 0);
        let me = Arc::new(self);
        let lag = tokio::spawn(me.clone().track_lag(stop.clone()));
        let (acked, acked_rx) = watch::channel((checkpoint, 0i64));
        let checkpoint_task = tokio::spawn({
            let me = me.clone();
            async move { me.checkpoint(acked_rx).await }
        });
        let mut backoff = me.progress.backoff();
        loop {
            let checkpoint = acked.borrow().0;
            let Some((start, publishing)) = me.resume(checkpoint, &stop).await else { break };
            if start != checkpoint {
                acked.send_replace((start, 0));
            }
            me.progress.health.sequenced.store(matches!(publishing, Publishing::Sequenced { .. }), Ordering::Relaxed);
            let (tx, rx) = mpsc::channel::<Batch>(4);
            let reader = tokio::spawn(me.clone().read(start + 1, me.sampler.clone(), tx, stop.clone()));
            let ended = me.publish(rx, &acked, publishing, &stop).await;
            reader.abort();
            reader.await.ok();
            match ended {
                Ended::Stopped => break,
                Ended::Restart { progressed } => {
                    if progressed {
                        backoff.reset();
                    }
                    if !backoff.wait(&stop).await {
                        break;
                    }
                }
            }
        }
        drop(acked);
        checkpoint_task.await.ok();
        lag.abort();
    }

    /// The target stream this copier owns (its `target_stream`, on JetStream), which it may
    /// append to with sequenced publishes.
    fn owned(&self) -> Option<(&JetStreamBackbone, &str)> {
        if !self.sequenced.load(Ordering::Relaxed) {
            return None;
        }
        let js = self.target.as_any().downcast_ref::<JetStreamBackbone>()?;
        Some((js, self.target_stream.as_ref()?.name.as_str()))
    }

    /// Where to go on from and how to publish: creates the configured target stream (retried
    /// while the target is unreachable), then, on a stream it owns, reads the source sequence
    /// of the newest copy (exact, whatever the checkpoint says) and appends with sequenced
    /// publishes after it. Without one (or after another writer), publishes with ids from
    /// `checkpoint`. `None` when stopped first.
    async fn resume(&self, checkpoint: u64, stop: &Shutdown) -> Option<(u64, Publishing)> {
        let mut backoff = self.progress.backoff();
        if let Some(cfg) = &self.target_stream {
            while let Err(e) = self.target.ensure_stream(cfg).await {
                self.progress.fail("target", format!("creating stream {}: {e}", cfg.name));
                if !backoff.wait(stop).await {
                    return None;
                }
            }
        }
        let Some((js, stream)) = self.owned() else { return Some((checkpoint, Publishing::Ids)) };
        loop {
            match self.newest_copy(js, stream).await {
                Ok(Newest::Empty { last }) => return Some((checkpoint, Publishing::sequenced(js, stream, last))),
                Ok(Newest::Ours { source, last, at_end: true }) => {
                    return Some((source, Publishing::sequenced(js, stream, last)))
                }
                Ok(Newest::Ours { source, at_end: false, .. }) => {
                    // Another writer appended after this copier's newest copy: from here on,
                    // publishes with ids (which share a stream), after that copy (or after
                    // the checkpoint, where a native source went further since).
                    self.shared(stream);
                    return Some((source.max(checkpoint), Publishing::Ids));
                }
                Ok(Newest::Other) => {
                    self.shared(stream);
                    return Some((checkpoint, Publishing::Ids));
                }
                Err(e) => {
                    self.progress.fail("target", e.to_string());
                    if !backoff.wait(stop).await {
                        return None;
                    }
                }
            }
        }
    }

    fn shared(&self, stream: &str) {
        if self.sequenced.swap(false, Ordering::Relaxed) {
            tracing::info!(
                link = %self.progress.link, stream = %self.progress.stream, target = stream,
                "another writer appends to the target stream: publishing with ids"
            );
        }
    }

    /// This copier's newest copy in an owned target stream, looked for among its last
    /// [`SCAN_BACK`] messages.
    async fn newest_copy(&self, js: &JetStreamBackbone, stream: &str) -> chorus_backbone::Result<Newest> {
        let info = js.stream_info(stream).await?;
        if info.messages == 0 {
            return Ok(Newest::Empty { last: info.last_sequence });
        }
        let newest = newest_marked(js, stream, &info, SCAN_BACK, |m| self.progress.copied_from(&m.headers)).await?;
        Ok(match newest {
            Some(copy) => {
                Newest::Ours { source: copy.value, last: info.last_sequence, at_end: copy.at == info.last_sequence }
            }
            None => Newest::Other,
        })
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
        let sequence = m.sequence;
        let mut copy = m.into_copy();
        // A copy of a copy carries this link's mark alone, in its place among the sorted
        // headers.
        let headers = &mut copy.headers;
        headers.retain(|(n, _)| n != REPLICATED_FROM_HEADER);
        let at = headers.partition_point(|(n, _)| n.as_str() < REPLICATED_FROM_HEADER);
        headers.insert(at, (REPLICATED_FROM_HEADER.into(), self.progress.copy_mark(sequence)));
        if self.source_site.is_some() || self.target_site.is_some() {
            let peek: Option<Peek> = serde_json::from_slice(&copy.payload).ok();
            let site = peek.as_ref().and_then(|p| p.site.as_deref());
            if site.is_some() && site == self.target_site.as_deref() {
                self.progress.metrics.skipped.get_or_create(&self.progress.reason("loop")).inc();
                return None;
            }
            if let (Some(p), None, Some(source_site)) = (&peek, site, &self.source_site) {
                if p.specversion.is_some() {
                    if let Some(stamped) = with_site(&copy.payload, source_site) {
                        copy.payload = stamped.into();
                    }
                }
            }
        }
        if let Some(s) = sampler {
            if !s.forward(&copy.subject, &copy.payload) {
                self.progress.metrics.skipped.get_or_create(&self.progress.reason("sampled")).inc();
                return None;
            }
        }
        if let Cow::Owned(s) = rewrite_subject(&self.rewrites, &copy.subject) {
            copy.subject = s;
        }
        Some(copy)
    }

    /// Publishes batches in order and moves the checkpoint as the target stores them. With
    /// ids, each batch is retried until stored (the target's dedupe drops what a retry
    /// repeats). Sequenced, up to [`SEQUENCED_IN_FLIGHT`] batches are on the wire, each
    /// acknowledged once; any failure ends the run with `Restart`, and the next run goes on
    /// after the newest copy the target holds. Batches waiting in the channel are merged up
    /// to the batch size so a fast source meets few, large publishes.
    async fn publish(
        &self,
        mut rx: mpsc::Receiver<Batch>,
        acked: &watch::Sender<(u64, i64)>,
        mut publishing: Publishing,
        stop: &Shutdown,
    ) -> Ended {
        let labels = self.progress.labels();
        let mut inflight = FuturesOrdered::new();
        let mut progressed = false;
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.requested() => return Ended::Stopped,
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    match done {
                        Ok((sequence, time, count)) => {
                            self.progress.metrics.copied.get_or_create(&labels).inc_by(count);
                            acked.send_replace((sequence, time));
                            progressed = true;
                        }
                        Err(e) => {
                            self.progress.fail("target", format!("{e}; going on after the newest copy"));
                            return Ended::Restart { progressed };
                        }
                    }
                    continue;
                }
                b = rx.recv(), if inflight.len() < SEQUENCED_IN_FLIGHT => b,
            };
            let Some(mut batch) = first else { return Ended::Stopped };
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
            let count = batch.messages.len() as u64;
            let (sequence, time) = (batch.last_sequence, batch.last_time.timestamp_millis());
            match &mut publishing {
                Publishing::Sequenced { js, stream, last } => {
                    if count == 0 {
                        inflight
                            .push_back(futures::future::Either::Left(futures::future::ready(Ok((sequence, time, 0)))));
                        continue;
                    }
                    match js.publish_sequenced(stream, batch.messages, *last).await {
                        Ok(ack) => {
                            *last += count;
                            inflight.push_back(futures::future::Either::Right(async move {
                                ack.stored().await.map(|_| (sequence, time, count))
                            }));
                        }
                        Err(e) => {
                            self.progress.fail("target", e.to_string());
                            return Ended::Restart { progressed };
                        }
                    }
                }
                Publishing::Ids => {
                    if count > 0 {
                        let mut backoff = self.progress.backoff();
                        loop {
                            match self.target.publish_batch(batch.messages.clone()).await {
                                Ok(acks) => {
                                    let dups = acks.iter().filter(|a| a.duplicate).count() as u64;
                                    self.progress.metrics.copied.get_or_create(&labels).inc_by(count - dups);
                                    if dups > 0 {
                                        self.progress
                                            .metrics
                                            .skipped
                                            .get_or_create(&self.progress.reason("duplicate"))
                                            .inc_by(dups);
                                    }
                                    break;
                                }
                                Err(e) => {
                                    self.progress.fail("target", e.to_string());
                                    if !backoff.wait(stop).await {
                                        return Ended::Stopped;
                                    }
                                }
                            }
                        }
                    }
                    // The checkpoint is written by its own task, off the publish path: a flush
                    // costs an fsync, and the next batch should be on the wire meanwhile.
                    // Losing the newest checkpoint in a crash only re-sends batches the
                    // target's dedupe drops.
                    acked.send_replace((sequence, time));
                    progressed = true;
                }
            }
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
