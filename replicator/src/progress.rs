//! What every way of copying a (link, stream) shares: its checkpoint, its metrics and health,
//! its retry pauses, and how it reports failures and gaps.

use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::message::{StoredMessage, StreamInfo};
use chorus_backbone::{Backbone, Message};
use chorus_runtime::{Backoff, Retry, Shutdown};

use crate::checkpoint::Checkpoints;
use crate::metrics::{CopierHealth, Metrics, PathLabels, ReasonLabels, StreamLabels};

pub use chorus_backbone::message::REPLICATED_FROM_HEADER;

/// A message of a target stream that a mark was found on.
pub(crate) struct Marked<T> {
    /// What the mark says (the source sequence it is a copy of).
    pub value: T,
    /// Its sequence in the target stream.
    pub at: u64,
    /// Its time, Unix milliseconds.
    pub time_ms: i64,
}

/// The newest of the last `scan` messages of `stream` (as `info` saw it) on which `mark`
/// finds something: where a copier's, or a native source's, newest copy is after a failure
/// or a crash. `None` when none of them carries one.
pub(crate) async fn newest_marked<B: Backbone + ?Sized, T>(
    target: &B,
    stream: &str,
    info: &StreamInfo,
    scan: u64,
    mark: impl Fn(&StoredMessage) -> Option<T>,
) -> chorus_backbone::Result<Option<Marked<T>>> {
    let mut at = info.last_sequence;
    while at >= info.first_sequence.max(1) && info.last_sequence - at < scan {
        if let Some(m) = target.get(stream, at).await? {
            if let Some(value) = mark(&m) {
                return Ok(Some(Marked { value, at, time_ms: m.time.timestamp_millis() }));
            }
        }
        at -= 1;
    }
    Ok(None)
}

/// The bookkeeping of one (link, stream).
#[derive(Clone)]
pub(crate) struct Progress {
    pub link: String,
    pub stream: String,
    pub max_backoff: Duration,
    pub checkpoints: Checkpoints,
    pub metrics: Arc<Metrics>,
    pub health: Arc<CopierHealth>,
}

impl Progress {
    /// Retries of one failing side: from 50 ms doubling up to the link's `max_backoff`.
    pub fn backoff(&self) -> Retry {
        Backoff::doubling(Duration::from_millis(50), self.max_backoff.max(Duration::from_millis(50))).retry()
    }

    pub fn labels(&self) -> StreamLabels {
        StreamLabels { link: self.link.clone(), stream: self.stream.clone() }
    }

    pub fn reason(&self, reason: &str) -> ReasonLabels {
        ReasonLabels { link: self.link.clone(), stream: self.stream.clone(), reason: reason.into() }
    }

    /// Records the way the stream is copied (`copy` or `native`) and why: health and the
    /// `path` gauge.
    pub fn chose(&self, path: &'static str, why: String) {
        self.health.chose(path, why);
        for other in ["copy", "native"] {
            let labels = PathLabels { link: self.link.clone(), stream: self.stream.clone(), path: other.into() };
            self.metrics.path.get_or_create(&labels).set(i64::from(other == path));
        }
    }

    /// The `Chorus-Replicated-From` value of this link's copy of source `sequence`.
    pub fn copy_mark(&self, sequence: u64) -> String {
        // Written piece by piece: the copier makes one per event.
        let mut number = itoa::Buffer::new();
        let sequence = number.format(sequence);
        let mut mark = String::with_capacity(self.link.len() + self.stream.len() + sequence.len() + 2);
        for part in [self.link.as_str(), " ", self.stream.as_str(), " ", sequence] {
            mark.push_str(part);
        }
        mark
    }

    /// The source sequence a message is this link's copy of, if it is one (a copy of a copy
    /// made by another link carries that link's mark too: only this link's counts).
    pub fn copied_from(&self, headers: &[(String, String)]) -> Option<u64> {
        headers.iter().filter(|(n, _)| n == REPLICATED_FROM_HEADER).find_map(|(_, v)| {
            let mut fields = v.split_whitespace();
            let ours = fields.next() == Some(self.link.as_str()) && fields.next() == Some(self.stream.as_str());
            ours.then(|| fields.next()?.parse::<u64>().ok()).flatten()
        })
    }

    pub fn key(&self) -> String {
        Checkpoints::key(&self.link, &self.stream)
    }

    /// The last checkpoint, retried until it can be read; `None` when stopped first.
    pub async fn load(&self, stop: &Shutdown) -> Option<u64> {
        let mut backoff = self.backoff();
        loop {
            match self.checkpoints.load(&self.key()).await {
                Ok(cp) => return Some(cp),
                Err(e) => {
                    self.fail("checkpoint", e.to_string());
                    if !backoff.wait(stop).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Counts and reports a failure of `side` (`source`, `target`, `checkpoint`).
    pub fn fail(&self, side: &str, error: String) {
        tracing::warn!(link = %self.link, stream = %self.stream, side, %error, "replication error; retrying");
        self.metrics.errors.get_or_create(&self.reason(side)).inc();
        self.health.failed(format!("{side}: {error}"));
    }

    /// Reports source sequences `from..=to` as lost to retention: metric, health warning,
    /// and a gap record on the target's dead-letter stream (`chorus.deadletter.replicator`,
    /// id derived from link, stream and range, so a restart records it once).
    pub async fn record_gap(&self, target: &dyn Backbone, from: u64, to: u64, stop: &Shutdown) {
        let events = to - from + 1;
        let what = format!(
            "source: {events} events of {} (sequences {from} to {to}) were removed by its retention before they were copied",
            self.stream
        );
        tracing::warn!(link = %self.link, stream = %self.stream, from, to, "{what}");
        self.metrics.gap_events.get_or_create(&self.labels()).inc_by(events);
        self.health.gap(events, what.clone());
        let record = serde_json::json!({
            "origin": "replicator",
            "code": "gap",
            "link": self.link,
            "stream": self.stream,
            "from_sequence": from,
            "to_sequence": to,
            "events": events,
            "reason": what,
            "detected": chrono::Utc::now(),
        });
        let message = Message::new(
            format!("gap-{}-{}-{from}-{to}", self.link, self.stream),
            "chorus.deadletter.replicator",
            serde_json::to_vec(&record).unwrap_or_default(),
        );
        let mut backoff = self.backoff();
        for _ in 0..5 {
            match target.publish(message.clone()).await {
                Ok(_) => return,
                Err(e) => {
                    self.fail("target", format!("recording the gap: {e}"));
                    if !backoff.wait(stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sets the lag gauges and health: `lag` events behind, the newest copied event stored
    /// at `newest` (Unix ms, 0 = unknown).
    pub fn lag(&self, lag: u64, newest: i64) {
        use std::sync::atomic::Ordering;
        self.health.lag.store(lag, Ordering::Relaxed);
        self.metrics.lag_events.get_or_create(&self.labels()).set(lag as i64);
        let seconds = if lag == 0 || newest == 0 {
            0.0
        } else {
            ((chrono::Utc::now().timestamp_millis() - newest).max(0) as f64) / 1000.0
        };
        self.metrics.lag_seconds.get_or_create(&self.labels()).set(seconds);
    }

    /// Records that the target holds the source up to `sequence` (stored at `time`, Unix ms).
    pub fn reached(&self, sequence: u64, time: i64) {
        self.health.progressed(sequence);
        self.metrics.checkpoint.get_or_create(&self.labels()).set(sequence as i64);
        if time != 0 {
            self.health.newest_time.store(time, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
