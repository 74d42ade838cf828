//! What a running projector reports: the sequence applied and flushed, the lag, counts.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Live counters of a projector, shared with whoever reports them (HTTP, CLI, tests).
#[derive(Debug)]
pub struct Progress {
    view: String,
    stream: std::sync::RwLock<String>,
    /// Why the projector is not running yet (its stream missing, its server unreachable).
    waiting: std::sync::RwLock<Option<String>>,
    applied_sequence: AtomicU64,
    pub(super) stream_last_sequence: AtomicU64,
    applied: AtomicU64,
    dead_lettered: AtomicU64,
    batches: AtomicU64,
    duplicates: AtomicU64,
    conflicts: AtomicU64,
    pub(super) clock_skewed: AtomicU64,
    committed: tokio::sync::watch::Sender<u64>,
}

/// A copy of [`Progress`] at one moment, as served to dashboards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// The view.
    pub view: String,
    /// The stream it is built from.
    pub stream: String,
    /// Last stream sequence committed into the view and flushed.
    pub applied_sequence: u64,
    /// Last sequence of the stream when last asked.
    pub stream_last_sequence: u64,
    /// `stream_last_sequence - applied_sequence`: events still to apply (an upper bound when
    /// the view filters subjects).
    pub lag: u64,
    /// Events applied by this process.
    pub applied: u64,
    /// Messages dead-lettered by this process.
    pub dead_lettered: u64,
    /// Batches committed by this process.
    pub batches: u64,
    /// Why the projector does not run yet (its stream is missing, its server unreachable):
    /// it waits and retries, and starts by itself once it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Events skipped by this process because the same event (source and id, same payload)
    /// was already applied: published twice without a message id.
    #[serde(default)]
    pub duplicates: u64,
    /// Events not applied by this process because another payload was already applied under
    /// their source and id (dead-lettered as `conflict`; included in `dead_lettered`).
    #[serde(default)]
    pub conflicts: u64,
    /// Events whose time was ahead of the time the stream stored them by more than the
    /// allowed skew: applied at the store time instead.
    #[serde(default)]
    pub clock_skewed: u64,
}

impl Progress {
    pub(super) fn new(view: &str, stream: &str, checkpoint: u64) -> Self {
        Progress {
            view: view.into(),
            stream: std::sync::RwLock::new(stream.into()),
            waiting: std::sync::RwLock::new(None),
            applied_sequence: AtomicU64::new(checkpoint),
            stream_last_sequence: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            clock_skewed: AtomicU64::new(0),
            committed: tokio::sync::watch::channel(checkpoint).0,
        }
    }

    /// Last stream sequence committed into the view (and flushed, unless
    /// [`ProjectorOptions::flush`] is off).
    pub fn applied_sequence(&self) -> u64 {
        self.applied_sequence.load(Ordering::Acquire)
    }

    /// Events between the checkpoint and the stream's last sequence.
    pub fn lag(&self) -> u64 {
        self.stream_last_sequence.load(Ordering::Acquire).saturating_sub(self.applied_sequence())
    }

    /// Says why the projector is not running yet (`None`: it runs).
    pub fn set_waiting(&self, why: Option<String>) {
        *self.waiting.write().expect("progress lock") = why;
    }

    pub(super) fn set_stream(&self, stream: &str) {
        *self.stream.write().expect("progress lock") = stream.to_string();
    }

    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let applied_sequence = self.applied_sequence();
        let last = self.stream_last_sequence.load(Ordering::Acquire).max(applied_sequence);
        ProgressSnapshot {
            view: self.view.clone(),
            stream: self.stream.read().expect("progress lock").clone(),
            waiting: self.waiting.read().expect("progress lock").clone(),
            applied_sequence,
            stream_last_sequence: last,
            lag: last - applied_sequence,
            applied: self.applied.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            clock_skewed: self.clock_skewed.load(Ordering::Relaxed),
        }
    }

    /// Waits until the view has committed (and flushed) stream sequence `sequence` or anything
    /// after it. Returns at once if the projector is gone.
    pub async fn wait_for(&self, sequence: u64) {
        let mut rx = self.committed.subscribe();
        // An error means the projector is gone: nothing more will be committed.
        rx.wait_for(|s| *s >= sequence).await.ok();
    }

    /// A receiver that sees each newly committed sequence (intermediate ones may be skipped
    /// when the reader is slower than the commits).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.subscribe()
    }

    pub(super) fn committed(&self, c: Committed) {
        self.applied.fetch_add(c.applied, Ordering::Relaxed);
        self.dead_lettered.fetch_add(c.dead_lettered, Ordering::Relaxed);
        self.batches.fetch_add(c.batches, Ordering::Relaxed);
        self.duplicates.fetch_add(c.duplicates, Ordering::Relaxed);
        self.conflicts.fetch_add(c.conflicts, Ordering::Relaxed);
        self.applied_sequence.store(c.sequence, Ordering::Release);
        self.stream_last_sequence.fetch_max(c.sequence, Ordering::AcqRel);
        self.committed.send_replace(c.sequence);
    }
}

/// What one [`Projector::catch_up`] or [`Projector::run`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Events applied.
    pub applied: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Batches committed.
    pub batches: u64,
    /// Snapshots written (see [`super::Store`]).
    pub snapshots: u64,
    /// Events skipped as repeats of an applied event (same source, id and payload).
    pub duplicates: u64,
    /// Events dead-lettered because another payload was applied under their source and id.
    pub conflicts: u64,
    /// The view's checkpoint at the end.
    pub checkpoint: u64,
    /// Whether reading moved to its own task because applying cost more (see the projector).
    pub read_ahead: bool,
}

/// Commits not yet reported, merged.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Committed {
    pub(super) sequence: u64,
    pub(super) applied: u64,
    pub(super) dead_lettered: u64,
    pub(super) batches: u64,
    pub(super) duplicates: u64,
    pub(super) conflicts: u64,
}

impl Committed {
    /// Adds `later`'s counts to these and moves the sequence to its.
    pub(super) fn merge(&mut self, later: Committed) {
        self.sequence = later.sequence;
        self.applied += later.applied;
        self.dead_lettered += later.dead_lettered;
        self.batches += later.batches;
        self.duplicates += later.duplicates;
        self.conflicts += later.conflicts;
    }
}
