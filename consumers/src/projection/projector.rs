//! The projector: replays a stream into a view, commits each batch to the view's state and
//! snapshots it, flushed off the apply path.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Backbone, BackboneError, ReplayOptions, StartPosition, StoredMessage};
use chorus_platform::deadletter::{self, DeadLetter};
use chorus_schemas::subject::validate_token;
use chorus_schemas::EventRecord;
use futures::StreamExt;

use super::identity::{Identities, Seen};
use super::progress::{Committed, Progress, RunStats};
use super::store::{Store, Txn, ViewState};
use super::{ProjectionError, ViewError};

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
    /// Most events per commit. A batch is whatever has arrived, up to this; each is committed
    /// to the view's state in memory, where queries see it at once.
    pub max_batch: usize,
    /// Longest time committed batches wait for a snapshot (the atomic write of the changed
    /// state with its checkpoint, see [`Store`]) while more events keep arriving, i.e. while
    /// catching up. At the head of the stream, whenever nothing more is ready to apply, what
    /// is committed is snapshotted at once, so each event is durable soon after it arrives.
    /// A crash loses about this much work (plus a flush in flight), which the next run
    /// re-applies from the snapshot's checkpoint. Keep it well below the dead-letter stream's
    /// duplicate window, so dead letters published again by that re-application are
    /// deduplicated.
    pub snapshot_every: Duration,
    /// How often a following projector refreshes the stream's last sequence for the lag.
    pub stream_info_every: Duration,
    /// Flush the store to disk after snapshots: at most one flush is in flight, overlapping
    /// the next batches, and [`Progress`] reports only flushed sequences. Exactly-once holds
    /// without it (sled recovers a prefix of atomic batches); flushing bounds how much is
    /// re-applied after a power loss and keeps the dead-letter dedupe window meaningful.
    pub flush: bool,
    /// When set, only events signed by their node's key under a node credential of a trusted
    /// issuer are applied; unsigned, forged, tampered or misattributed events go to the
    /// dead-letter stream with the reason ([`chorus_schemas::signature::VerifyError::code`]:
    /// `unsigned`, `no_credential`, the credential's codes such as `unknown_issuer`,
    /// `key_mismatch`, `wrong_identity`, `bad_signature`, `malformed_signature`) and the
    /// projector goes on.
    pub verifier: Option<std::sync::Arc<chorus_schemas::signature::Verifier>>,
    /// How many of the latest stream sequences' event identities (CloudEvents source and
    /// id) are remembered, so an event stored twice without a message id is applied once
    /// and a changed copy under an applied id is dead-lettered as a `conflict` (see
    /// [`super::identity`]); 0 turns the check off. About 100 bytes each (measured).
    pub remember_events: u64,
    /// An event whose time is ahead of the time the stream stored it by more than this
    /// cannot be right (nothing is stored before it happens): it is applied at the store
    /// time instead, so a clock years ahead never makes old state win over newer state, and
    /// counted ([`ProgressSnapshot::clock_skewed`](super::ProgressSnapshot)). Events older
    /// than their store time are normal (an outbox forwarding after an outage).
    pub max_clock_skew: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        ProjectorOptions {
            max_batch: 2_000,
            snapshot_every: Duration::from_secs(1),
            stream_info_every: Duration::from_secs(1),
            flush: true,
            verifier: None,
            remember_events: 100_000,
            max_clock_skew: Duration::from_secs(300),
        }
    }
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
    /// The last sequence whose effects are in the view's state.
    checkpoint: u64,
    /// Dead letters counted in the view's state.
    dead_letters: u64,
    /// What was committed since the last snapshot.
    unsaved: Option<Unsaved>,
    identities: Identities,
    /// Whether `identities` holds what the window before the checkpoint says.
    identities_loaded: bool,
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
        let mut state = match store.state(&name) {
            Ok(state) => state,
            // A view is a fold of its stream: one whose snapshot cannot be read is rebuilt.
            Err(ProjectionError::Corrupt(reason)) => {
                tracing::error!(view = %name, %reason, "the view's snapshot cannot be read: rebuilding it");
                store.reset(&name)?
            }
            Err(e) => return Err(e),
        };
        match state.stream()? {
            Some(built_from) if built_from != stream && state.checkpoint()? > 0 => {
                tracing::warn!(view = %name, %built_from, %stream, "the view was built from another stream: rebuilding it");
                state = store.reset(&name)?;
            }
            _ => {}
        }
        state.set_stream(&stream)?;
        let checkpoint = state.checkpoint()?;
        let dead_letters = state.dead_letters()?;
        // A projector of this view that stopped before its last snapshot was written (a
        // failed write) left state that no snapshot holds: it is this one's to write, and
        // progress starts from what is durable.
        let (saved, unsaved) = state.saved();
        let unsaved = unsaved.then(|| Unsaved {
            counts: Committed { sequence: checkpoint, ..Default::default() },
            due: tokio::time::Instant::now(),
        });
        Ok(Projector {
            progress: Arc::new(Progress::new(&name, &stream, saved)),
            backbone,
            stream,
            store: store.clone(),
            state,
            view,
            options: ProjectorOptions::default(),
            checkpoint,
            dead_letters,
            unsaved,
            identities: Identities::new(ProjectorOptions::default().remember_events),
            identities_loaded: false,
        })
    }

    /// Replaces the tuning.
    pub fn with_options(mut self, options: ProjectorOptions) -> Self {
        self.identities = Identities::new(options.remember_events);
        self.identities_loaded = false;
        self.options = options;
        self
    }

    /// Discards the view's state so the next run rebuilds it from the stream's first message.
    /// Take [`ViewState`]s for queries after this call.
    pub fn rebuild(&mut self) -> Result<(), ProjectionError> {
        self.state = self.store.reset(self.view.name())?;
        self.state.set_stream(&self.stream)?;
        self.checkpoint = 0;
        self.dead_letters = 0;
        self.unsaved = None;
        self.identities.clear();
        self.identities_loaded = true;
        self.progress = Arc::new(Progress::new(self.view.name(), &self.stream, 0));
        Ok(())
    }

    /// Reads `stream` instead of the stream it was made for (found once it exists: Choria's
    /// `CHORIA_EVENTS` holding the lifecycle subjects, say). Only before the view holds
    /// anything: a view built from one stream is not resumed on another (its checkpoint is
    /// a sequence of the first); [`Projector::new`] rebuilds such a view.
    pub fn read_from(&mut self, stream: &str) -> Result<(), ProjectionError> {
        if stream == self.stream {
            return Ok(());
        }
        if self.checkpoint > 0 {
            return Err(ProjectionError::Corrupt(format!(
                "view {} is built from stream {} and cannot continue from {stream}: rebuild it",
                self.view.name(),
                self.stream
            )));
        }
        self.state.set_stream(stream)?;
        self.stream = stream.to_string();
        self.progress.set_stream(stream);
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

    /// Reads the identities of the window before the checkpoint, deciding about each event as
    /// the run that applied it did, so the memory is what an uninterrupted run would hold.
    async fn load_identities(&mut self, first: u64) -> Result<(), ProjectionError> {
        self.identities.clear();
        let window = self.identities.window();
        if window > 0 && self.checkpoint > 0 {
            let start = self.checkpoint.saturating_sub(window - 1).max(first).max(1);
            let options = ReplayOptions {
                start: StartPosition::Sequence(start),
                filter_subjects: self.view.filter_subjects(),
                follow: false,
            };
            let mut replay = self.backbone.replay(&self.stream, options).await?;
            while let Some(message) = replay.next().await {
                let message = message?;
                if message.sequence > self.checkpoint {
                    break;
                }
                let Ok(record) = EventRecord::decode(&message.payload) else { continue };
                if self.options.verifier.as_deref().is_some_and(|v| v.verify(&record).is_err()) {
                    continue;
                }
                self.identities.check(message.sequence, &record, &message.payload);
            }
        }
        self.identities_loaded = true;
        Ok(())
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
        if !self.identities_loaded {
            self.load_identities(first).await?;
        }
        let options = ReplayOptions {
            start: StartPosition::Sequence(self.checkpoint + 1),
            filter_subjects: self.view.filter_subjects(),
            follow,
        };
        let filtered = !options.filter_subjects.is_empty();
        let replay = self.backbone.replay(&self.stream, options).await?;
        let max_batch = self.options.max_batch.max(1);
        // Reading and decoding start on this task, interleaved with applying and committing
        // (handing events to another thread costs more than it gains for a view that does
        // little per event). Once applying is seen to cost more than reading, the reader
        // moves to its own task and the two overlap; whatever arrives during a commit then
        // makes the next batch, so batches grow exactly when commits are the bottleneck.
        let group = max_batch.min(READ_GROUP);
        let groups_per_batch = (max_batch / group).max(1);
        let (tx, mut rx) = tokio::sync::mpsc::channel(groups_per_batch * 2);
        let decode = Decode {
            verifier: self.options.verifier.clone(),
            max_skew: chrono::Duration::from_std(self.options.max_clock_skew).unwrap_or(chrono::Duration::MAX),
            progress: self.progress.clone(),
        };
        let mut reader = Reader::Inline(Some(Box::pin(read_and_decode(replay, self.checkpoint, group, decode, tx))));
        let mut costs = Costs::default();
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
                _ = reader.poll_inline(&mut costs), if reader.is_inline() => {}
                done = flusher.wait(), if flusher.busy() => {
                    if let Err(e) = done {
                        flusher.abandon();
                        break Err(e);
                    }
                    flusher.completed(&self.progress);
                    flusher.start(&self.state);
                }
                n = rx.recv_many(&mut groups, groups_per_batch) => {
                    if n == 0 {
                        break Ok(());
                    }
                    let count = groups.iter().map(Vec::len).sum();
                    let items = groups.drain(..).flatten();
                    let started = std::time::Instant::now();
                    let applied = self.apply_batch(items, count, &mut stats).await;
                    let committed = match applied {
                        Ok(()) if self.snapshot_due() => self.snapshot(&mut stats),
                        Ok(()) => Ok(None),
                        Err(e) => break Err(e),
                    };
                    costs.applying += started.elapsed();
                    costs.applied += n as u64;
                    costs.batches += 1;
                    if reader.is_inline() && costs.apply_costs_more(rx.len() as u64) {
                        tracing::debug!(view = self.view.name(), "applying costs more than reading: reading ahead on another task");
                        reader.read_ahead();
                        stats.read_ahead = true;
                    }
                    match committed {
                        Ok(committed) => flusher.report(committed, &self.state, &self.progress, self.options.flush),
                        Err(e) => break Err(e),
                    }
                }
                _ = tick.tick(), if follow => {
                    if let Err(e) = self.refresh_stream_last().await {
                        tracing::warn!(view = self.view.name(), error = %e, "stream info for the lag");
                    }
                }
                // Nothing else is ready at the head of the stream, or unsaved for long enough
                // (the reader may be stalled): snapshot.
                _ = snapshot_moment(self.unsaved.as_ref().map(|u| u.due), self.at_head(filtered)), if self.unsaved.is_some() => {
                    match self.snapshot(&mut stats) {
                        Ok(committed) => flusher.report(committed, &self.state, &self.progress, self.options.flush),
                        Err(e) => break Err(e),
                    }
                }
            }
        };

        drop(reader);
        // What was committed is snapshotted (after a failed read or view too: the state holds
        // exactly the batches before the failure), then flushed, before returning, error or
        // not.
        let committed = self.snapshot(&mut stats);
        if let Ok(committed) = committed {
            flusher.report(committed, &self.state, &self.progress, self.options.flush);
        }
        let flushed = flusher.finish(&self.state, &self.progress).await;
        result?;
        committed?;
        flushed?;
        stats.checkpoint = self.checkpoint;
        Ok(stats)
    }

    /// Whether the unsaved commits are due for a snapshot while more events are ready.
    fn snapshot_due(&self) -> bool {
        self.unsaved.as_ref().is_some_and(|u| tokio::time::Instant::now() >= u.due)
    }

    /// Whether what is applied reaches the end of the stream as last seen, so waiting for the
    /// reader is waiting for new events, not for the rest of a backlog. A filtered view
    /// cannot tell (the stream's last message may not be one of its subjects): for it, any
    /// wait counts.
    fn at_head(&self, filtered: bool) -> bool {
        filtered || self.checkpoint >= self.progress.stream_last_sequence.load(Ordering::Acquire)
    }

    /// Applies one batch (`items`, `count` of them) and commits it with its checkpoint to the
    /// view's state (in memory, not yet snapshotted). Dead letters are stored before the
    /// checkpoint passes them. When reading failed, what came before the failure is committed
    /// and the error returned; when the view failed or a dead letter could not be stored,
    /// nothing of the batch is.
    async fn apply_batch(
        &mut self,
        items: impl Iterator<Item = Item>,
        count: usize,
        stats: &mut RunStats,
    ) -> Result<(), ProjectionError> {
        let name = self.view.name().to_owned();
        // Room for a write per event from the start: growing the staged map as a batch fills
        // rehashed it two or three times per batch.
        let mut txn = Txn::new(&self.state, count);
        let mut letters = Vec::new();
        let mut last = self.checkpoint;
        let (mut applied, mut duplicates, mut conflicts) = (0u64, 0u64, 0u64);
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
            match self.identities.check(message.sequence, &record, &message.payload) {
                Seen::New => {}
                Seen::Duplicate { .. } => {
                    duplicates += 1;
                    last = message.sequence;
                    continue;
                }
                Seen::Conflict { sequence } => {
                    let reason = format!(
                        "event {} from {} was applied at sequence {sequence} with another payload; this copy is not applied",
                        record.id, record.source
                    );
                    letters.push(DeadLetter::new(&name, &message, "conflict", reason));
                    conflicts += 1;
                    last = message.sequence;
                    continue;
                }
            }
            match self.view.apply(message.sequence, &record, &mut txn) {
                Ok(()) => applied += 1,
                Err(ViewError::Reject(reason)) => letters.push(DeadLetter::new(&name, &message, "rejected", reason)),
                Err(source) => {
                    let sequence = message.sequence;
                    let stream = self.stream.clone();
                    // Nothing of the batch is committed: what it remembered is re-read.
                    self.identities_loaded = false;
                    return Err(ProjectionError::View { view: name, stream, sequence, source });
                }
            }
            last = message.sequence;
        }
        if last > self.checkpoint {
            // Dead letters are stored before the checkpoint passes them (see chorus_platform::deadletter).
            if let Err(e) = deadletter::publish(&*self.backbone, &letters).await {
                self.identities_loaded = false;
                return Err(e.into());
            }
            let dead = letters.len() as u64;
            self.state.commit(txn.into_staged(), last, self.dead_letters + dead);
            self.checkpoint = last;
            self.dead_letters += dead;
            stats.applied += applied;
            stats.dead_lettered += dead;
            stats.batches += 1;
            stats.duplicates += duplicates;
            stats.conflicts += conflicts;
            let batch = Committed { sequence: last, applied, dead_lettered: dead, batches: 1, duplicates, conflicts };
            let now = tokio::time::Instant::now();
            // An interval too long to add is as good as never.
            let due = now.checked_add(self.options.snapshot_every).unwrap_or(now + Duration::from_secs(1 << 30));
            self.unsaved.get_or_insert_with(|| Unsaved { counts: Committed::default(), due }).counts.merge(batch);
        }
        failure.map_or(Ok(()), Err)
    }

    /// Snapshots what was committed (not yet flushed), and returns what the snapshot covers.
    fn snapshot(&mut self, stats: &mut RunStats) -> Result<Option<Committed>, ProjectionError> {
        let Some(unsaved) = self.unsaved.take() else {
            return Ok(None);
        };
        if let Err(e) = self.state.snapshot() {
            self.unsaved = Some(unsaved);
            return Err(e);
        }
        stats.snapshots += 1;
        Ok(Some(unsaved.counts))
    }
}

/// Commits not yet in a snapshot.
struct Unsaved {
    /// Counts and last sequence of the batches committed.
    counts: Committed,
    /// When they must be snapshotted: [`ProjectorOptions::snapshot_every`] after the first
    /// of them was committed.
    due: tokio::time::Instant,
}

/// Completes at once at the head of the stream (polled last, so only when nothing else is
/// ready), else at `due`, or never without it.
async fn snapshot_moment(due: Option<tokio::time::Instant>, at_head: bool) {
    match due {
        _ if at_head => {}
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
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

/// How the reader turns messages into items.
struct Decode {
    verifier: Option<std::sync::Arc<chorus_schemas::signature::Verifier>>,
    max_skew: chrono::Duration,
    progress: Arc<Progress>,
}

impl Decode {
    fn item(&self, m: StoredMessage) -> Item {
        let mut record = match EventRecord::decode(&m.payload) {
            Ok(record) => record,
            Err(e) => return Item::Malformed(m, e),
        };
        if let Some(Err(e)) = self.verifier.as_deref().map(|v| v.verify(&record).map(|_| ())) {
            return Item::Unverified(m, e);
        }
        // A copy (replicated, restored) is checked against when its original was stored.
        let stored = m.first_stored();
        if record.time.signed_duration_since(stored) > self.max_skew {
            tracing::debug!(sequence = m.sequence, time = %record.time, %stored, "event time ahead of its store time; applied at the store time");
            self.progress.clock_skewed.fetch_add(1, Ordering::Relaxed);
            record.time = stored;
        }
        Item::Event(m, record)
    }
}

/// Reads the replay, decodes each message, and sends the results in order, in groups of what
/// was ready (at most `group`).
async fn read_and_decode(
    replay: chorus_backbone::MessageStream,
    checkpoint: u64,
    group: usize,
    decode: Decode,
    tx: tokio::sync::mpsc::Sender<Vec<Item>>,
) {
    let mut groups = replay.ready_chunks(group);
    while let Some(group) = groups.next().await {
        let mut items = Vec::with_capacity(group.len());
        let mut failed = false;
        for next in group {
            items.push(match next {
                Ok(m) if m.sequence <= checkpoint => continue,
                Ok(m) => decode.item(m),
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

/// Where the reader runs: on the projector's task, polled beside applying, or on its own.
enum Reader {
    /// Polled in the projector's loop (`None` once it finished).
    Inline(Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>),
    /// On its own task; aborted when the projector stops.
    Ahead { _task: AbortOnDrop },
}

impl Reader {
    fn is_inline(&self) -> bool {
        matches!(self, Reader::Inline(Some(_)))
    }

    /// Drives the inline reader (each poll reads and decodes what is ready, until the channel
    /// is full), timing every poll; completes only when the reader has finished.
    async fn poll_inline(&mut self, costs: &mut Costs) {
        let Reader::Inline(slot) = self else { return std::future::pending().await };
        let Some(reader) = slot.as_mut() else { return std::future::pending().await };
        std::future::poll_fn(|cx| {
            let started = std::time::Instant::now();
            let polled = reader.as_mut().poll(cx);
            costs.reading += started.elapsed();
            polled
        })
        .await;
        *slot = None;
    }

    /// Moves the reader onto its own task.
    fn read_ahead(&mut self) {
        if let Reader::Inline(slot) = self {
            if let Some(reader) = slot.take() {
                *self = Reader::Ahead { _task: AbortOnDrop(tokio::spawn(reader)) };
            }
        }
    }
}

/// Time spent reading (inline) and applying over the first groups, to decide once whether
/// reading ahead pays.
#[derive(Default)]
struct Costs {
    reading: std::time::Duration,
    applying: std::time::Duration,
    /// Groups applied so far.
    applied: u64,
    /// Batches applied so far.
    batches: u64,
    decided: bool,
}

impl Costs {
    /// Groups and batches measured before deciding: past the first commits (slower: the
    /// store warms up), enough to average out one slow commit.
    const SAMPLE: u64 = 32;
    const SAMPLE_BATCHES: u64 = 4;

    /// True once, when the sample is complete and applying a group cost more than reading
    /// one. `queued`: groups read but not yet applied (the reader runs ahead by a channel).
    fn apply_costs_more(&mut self, queued: u64) -> bool {
        if self.decided || self.applied < Self::SAMPLE || self.batches < Self::SAMPLE_BATCHES {
            return false;
        }
        self.decided = true;
        let read = self.applied + queued;
        // applying / applied > reading / read, without dividing.
        self.applying.as_nanos() * u128::from(read) > self.reading.as_nanos() * u128::from(self.applied)
    }
}

/// Aborts the reader when the projector stops, so a following replay does not outlive it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

    /// Takes a commit: flushed (and then reported) with the ones before it still waiting, or
    /// reported at once when the projector does not flush.
    fn report(&mut self, committed: Option<Committed>, state: &ViewState, progress: &Progress, flush: bool) {
        let Some(c) = committed else { return };
        if !flush {
            progress.committed(c);
            return;
        }
        self.waiting.get_or_insert_with(Committed::default).merge(c);
        if !self.busy() {
            self.start(state);
        }
    }

    /// Starts flushing what is waiting, if anything.
    fn start(&mut self, state: &ViewState) {
        if let Some(c) = self.waiting.take() {
            let flushed = state.store.flush();
            let flush: FlushFuture = Box::pin(async move { Ok(flushed.await?) });
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

    /// Forgets a flush that failed (its future is finished and must not be polled again);
    /// what it covered is flushed with the next one.
    fn abandon(&mut self) {
        if let Some((_, mut c)) = self.in_flight.take() {
            if let Some(later) = self.waiting.take() {
                c.merge(later);
            }
            self.waiting = Some(c);
        }
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
