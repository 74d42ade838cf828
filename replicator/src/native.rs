//! A plain link copied by the servers: a native JetStream source on the target stream, set
//! up and supervised by the replicator.
//!
//! The servers copy in flow-controlled batches and resume by themselves after a restart of
//! either side, and the replicator adds what a bare source lacks: it starts the source after
//! the link's checkpoint (so a link that was copied by the copier before goes on where it
//! was), reads where the target really is from the newest sourced message's
//! `Nats-Stream-Source` header, keeps the checkpoint, lag and copied count as the copier does,
//! checks the ids at both ends once caught up, records events the source's retention removed
//! before they were copied as a gap, and puts the source back when it is removed from the
//! target stream. Stopping the replicator leaves the source in place: the servers go on
//! copying, which is what a crashed replicator must not stop either.

use std::time::Duration;

use chorus_backbone::jetstream::{
    sourced_sequence, sources_stop_at_duplicates, JetStreamBackbone, NativeSource, SOURCE_HEADER,
};
use chorus_backbone::message::StreamInfo;
use chorus_backbone::{Backbone, BackboneError, ReplayOptions, StartPosition, StreamConfig};
use chorus_runtime::Shutdown;

use crate::progress::{newest_marked, Progress};

/// How often the source is looked at.
const POLL: Duration = Duration::from_secs(1);

/// How long a source may make no progress while behind, both servers reachable, before it
/// counts as stalled. A healthy source delivers continuously while it is behind; one that
/// is resuming after a restart of either side does so within a few seconds.
const STALL: Duration = Duration::from_secs(10);

/// How far back from the target stream's end the newest sourced message is looked for (a
/// target that also takes other sources or publishes interleaves them).
const SCAN_BACK: u64 = 64;

/// The supervisor of one native source.
pub(crate) struct Sourcing {
    pub progress: Progress,
    pub source: JetStreamBackbone,
    pub target: JetStreamBackbone,
    /// The target stream's name.
    pub target_stream: String,
    /// Used to create the target stream when it does not exist.
    pub create: Option<StreamConfig>,
    pub spec: NativeSource,
    /// How far past the checkpoint a copier that ran before may have stored events
    /// (its batches in flight when it stopped).
    pub handoff_scan: u64,
}

/// Why supervision ended.
pub(crate) enum Ended {
    /// Stopped (the replicator stops or loses its leadership); the source stays in place.
    Stopped,
    /// The source made no progress while behind and was removed from the target stream;
    /// the target holds the source up to `at`, and the copier goes on from there.
    Stalled { at: u64, why: String },
}

/// Gaps judged so far: recorded up to `recorded_to`; `suspect` is the newest copy when a
/// gap was first seen, recorded if the next look sees it again without progress.
struct Gaps {
    recorded_to: u64,
    suspect: Option<u64>,
}

/// Where the target is: the newest source sequence it holds and when it stored it (Unix ms).
#[derive(Clone, Copy, Debug, Default)]
struct Reached {
    sequence: u64,
    time: i64,
}

impl Sourcing {
    /// Supervises until `stop`; every failure is counted, reported through health and
    /// looked at again at the next poll.
    pub async fn run(self, stop: Shutdown) -> Ended {
        let Some(mut start) = self.progress.load(&stop).await else { return Ended::Stopped };
        // The first time this link goes native, a copier may have stored events past its
        // checkpoint: the source must start after them.
        let mut backoff = self.progress.backoff();
        loop {
            match self.target.source_status(&self.target_stream, &self.spec).await {
                Ok(Some(_)) => break,
                Ok(None) | Err(BackboneError::NotFound { .. }) => match self.handoff(start).await {
                    Ok(position) => {
                        start = position;
                        break;
                    }
                    Err((side, e)) => self.progress.fail(side, e),
                },
                Err(e) => self.progress.fail("target", e.to_string()),
            }
            if !backoff.wait(&stop).await {
                return Ended::Stopped;
            }
        }
        self.progress.reached(start, 0);
        let mut reached = Reached { sequence: start, time: 0 };
        let mut gaps = Gaps { recorded_to: start, suspect: None };
        let mut tick = tokio::time::interval(POLL);
        // What moves when the source progresses, and since when it has not.
        let mut moved = (reached.sequence, tokio::time::Instant::now());
        let ended = loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.requested() => break Ended::Stopped,
            }
            self.progress.health.reachability(self.source.connected(), self.target.connected());
            // A side that cannot be read is not a stall of the source: the timer restarts.
            let mut readable = self.source.connected() && self.target.connected();
            let mut marker = moved.0;
            match self.step(&mut reached, &mut gaps, &stop).await {
                Ok(now) => marker = now,
                Err((side, error)) => {
                    readable &= side != "source";
                    self.progress.fail(side, error);
                }
            }
            let behind = self.progress.health.lag.load(std::sync::atomic::Ordering::Relaxed) > 0;
            if marker != moved.0 || !behind || !readable {
                moved = (marker, tokio::time::Instant::now());
            } else if moved.1.elapsed() >= STALL && !self.replaceable() {
                // The servers resume a source by themselves (after a restart of either side,
                // with their own backoff): said, and looked at again.
                self.progress.fail(
                    "target",
                    format!(
                        "the native {} made no progress for {}s at source sequence {} while behind",
                        if self.spec.mirror { "mirror" } else { "source" },
                        moved.1.elapsed().as_secs(),
                        reached.sequence
                    ),
                );
                moved.1 = tokio::time::Instant::now();
            } else if moved.1.elapsed() >= STALL {
                let why = format!(
                    "the native source made no progress for {}s at source sequence {} while behind (nats-server {} \
                     stops a source at an event the target already holds under the same id); copying with the copier",
                    STALL.as_secs(),
                    reached.sequence,
                    self.target.server_version().unwrap_or_default()
                );
                match self.target.remove_source(&self.target_stream, &self.spec).await {
                    Ok(_) => break Ended::Stalled { at: reached.sequence, why },
                    Err(e) => self.progress.fail("target", format!("removing the stalled native source: {e}")),
                }
            }
        };
        if let Err(e) = self.progress.checkpoints.store(&self.progress.key(), reached.sequence).await {
            self.progress.fail("checkpoint", e.to_string());
        }
        ended
    }

    /// Whether a stalled source is handed to the copier: a source (not a mirror, which owns
    /// its stream) on a server that stops sources at a duplicate id, where only the copier
    /// (which the target's dedupe serves) gets past it.
    fn replaceable(&self) -> bool {
        !self.spec.mirror && self.target.server_version().is_some_and(|v| sources_stop_at_duplicates(&v))
    }

    /// One look at the source and the target. Returns what moves when the source makes
    /// progress: the newest copy's source sequence, or, when that cannot be told (the newest
    /// copy is not among the target stream's last messages: nothing copied yet, or other
    /// writers' messages after it), the server's lag, and then no gap is judged.
    async fn step(
        &self,
        reached: &mut Reached,
        gaps: &mut Gaps,
        stop: &Shutdown,
    ) -> Result<u64, (&'static str, String)> {
        let target = |e: BackboneError| ("target", e.to_string());
        let status = match self.target.source_status(&self.target_stream, &self.spec).await {
            Ok(Some(status)) => status,
            Ok(None) | Err(BackboneError::NotFound { .. }) => {
                return self.set_up(reached.sequence).await.map(|_| reached.sequence)
            }
            Err(e) => return Err(target(e)),
        };
        if let Some(error) = status.error {
            // The target's server cannot read the source (a leafnode down, the stream gone).
            return Err((
                "source",
                format!("the target's server reports for the native source of {}: {error}", self.spec.stream),
            ));
        }
        let info = self.source.stream_info(&self.progress.stream).await.map_err(|e| ("source", e.to_string()))?;
        // One look at the target serves the whole step.
        let target_info = self.target.stream_info(&self.target_stream).await.map_err(target)?;
        let sourced = self.newest_sourced(&target_info).await.map_err(target)?;
        let now = sourced.as_ref().map(|(reached, _)| *reached);
        if now.is_none() && target_info.messages > 0 {
            self.progress.lag(status.lag, reached.time);
            return Ok(u64::MAX - status.lag);
        }
        // The source copies in order: nothing after `now` is in the target yet, so source
        // events before the oldest one left and after `now` were removed uncopied. Judged on
        // two looks in a row without progress (what the source already handed over may not
        // be stored yet), and not for a filtered source (the stream's first sequence says
        // nothing about the events the filter matches).
        let newest = now.map_or(reached.sequence, |n| n.sequence.max(reached.sequence));
        let lost = info.first_sequence > newest + 1
            && info.first_sequence > gaps.recorded_to + 1
            && (newest > 0 || gaps.recorded_to > 0)
            && self.spec.filter_subject.is_none();
        if !lost {
            gaps.suspect = None;
        } else if gaps.suspect != Some(newest) {
            gaps.suspect = Some(newest);
        } else {
            let from = (newest + 1).max(gaps.recorded_to + 1);
            self.progress.record_gap(&self.target, from, info.first_sequence - 1, stop).await;
            gaps.recorded_to = info.first_sequence - 1;
            gaps.suspect = None;
        }
        if let Some(now) = now.filter(|n| n.sequence > reached.sequence) {
            self.progress.metrics.copied.get_or_create(&self.progress.labels()).inc_by(now.sequence - reached.sequence);
            self.progress
                .checkpoints
                .store(&self.progress.key(), now.sequence)
                .await
                .map_err(|e| ("checkpoint", e.to_string()))?;
            *reached = now;
        }
        self.progress.reached(reached.sequence, reached.time);
        let lag = if self.spec.filter_subject.is_some() || status.lag == 0 {
            // The server's own count: the stream's last sequence says nothing about filtered
            // messages, and events removed at the source's end are not behind.
            status.lag
        } else {
            info.last_sequence.saturating_sub(reached.sequence)
        };
        self.progress.lag(lag, reached.time);
        if lag == 0 && reached.sequence > 0 {
            let at = sourced.filter(|(r, _)| r.sequence == reached.sequence).map(|(_, at)| at);
            self.verify(reached.sequence, at).await?;
        }
        Ok(reached.sequence)
    }

    /// The newest source sequence whose event the target holds among what a copier may have
    /// stored past `checkpoint`: its ids are looked for among the target stream's newest
    /// messages. nats-server 2.9 stops a source for good at the first sourced message its
    /// dedupe drops, so the source must not start on an event the target already has.
    async fn handoff(&self, checkpoint: u64) -> Result<u64, (&'static str, String)> {
        use futures::StreamExt;
        let info = match self.target.stream_info(&self.target_stream).await {
            Ok(info) => info,
            Err(BackboneError::NotFound { .. }) => return Ok(checkpoint),
            Err(e) => return Err(("target", e.to_string())),
        };
        if info.messages == 0 {
            return Ok(checkpoint);
        }
        let read = |b: &JetStreamBackbone, stream: &str, from: u64, filter: Vec<String>| {
            let (b, stream) = (b.clone(), stream.to_string());
            async move {
                let options = ReplayOptions {
                    start: StartPosition::Sequence(from),
                    follow: false,
                    filter_subjects: filter.clone(),
                };
                let replay = b.replay(&stream, options).await?;
                replay
                    .take(self.handoff_scan as usize)
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
            }
        };
        let tail_from = info.last_sequence.saturating_sub(self.handoff_scan).max(info.first_sequence).max(1);
        let tail = read(&self.target, &self.target_stream, tail_from, Vec::new())
            .await
            .map_err(|e| ("target", e.to_string()))?;
        // A sequenced copier marks every copy with the source sequence: exact.
        let marked = tail.iter().filter_map(|m| self.progress.copied_from(&m.headers)).max().unwrap_or(0);
        let checkpoint = checkpoint.max(marked);
        let held: std::collections::HashSet<String> = tail.into_iter().map(|m| m.id).collect();
        let next = read(
            &self.source,
            &self.progress.stream,
            checkpoint + 1,
            self.spec.filter_subject.iter().cloned().collect(),
        )
        .await
        .map_err(|e| ("source", e.to_string()))?;
        // The events a copier stored past its checkpoint are the source's next ones, in order:
        // the source starts at the first one the target does not hold. (If one further on is
        // held too, the source stalls there and the copier takes over: see `STALL`.)
        let position =
            next.iter().take_while(|m| held.contains(&m.copy_id())).last().map_or(checkpoint, |m| m.sequence);
        if position > checkpoint {
            tracing::info!(
                link = %self.progress.link, stream = %self.progress.stream, checkpoint, position,
                "the target already holds events past the checkpoint; the native source starts after them"
            );
            self.progress
                .checkpoints
                .store(&self.progress.key(), position)
                .await
                .map_err(|e| ("checkpoint", e.to_string()))?;
        }
        Ok(position)
    }

    /// Adds the source to the target stream (creating the stream if configured to), from
    /// the first sequence the target is not known to hold.
    async fn set_up(&self, reached: u64) -> Result<(), (&'static str, String)> {
        let spec = NativeSource { start_sequence: reached + 1, ..self.spec.clone() };
        let config = match (&self.create, self.target.stream_info(&self.target_stream).await) {
            (_, Ok(_)) => StreamConfig::new(self.target_stream.clone(), Vec::new()),
            (Some(config), Err(BackboneError::NotFound { .. })) => config.clone(),
            (None, Err(BackboneError::NotFound { .. })) => {
                return Err(("target", format!("stream {} no longer exists on the target", self.target_stream)))
            }
            (_, Err(e)) => return Err(("target", e.to_string())),
        };
        match self.target.add_source(&config, &spec).await {
            Ok(true) => {
                tracing::info!(
                    link = %self.progress.link, stream = %self.progress.stream, target = %self.target_stream,
                    from = spec.start_sequence, api = %spec.api_prefix, "native source set up"
                );
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(("target", format!("setting up the native source into {}: {e}", self.target_stream))),
        }
    }

    /// The newest message of the target stream (as `info` saw it) sourced from this link's
    /// stream, looked for among the last [`SCAN_BACK`] messages: how far the source got, and
    /// where in the target that copy is.
    async fn newest_sourced(&self, info: &StreamInfo) -> Result<Option<(Reached, u64)>, BackboneError> {
        if self.spec.mirror {
            // A mirror keeps the source's sequences.
            let newest = match info.last_sequence {
                0 => None,
                last => self.target.get(&self.target_stream, last).await?,
            };
            return Ok(newest.map(|m| (Reached { sequence: m.sequence, time: m.time.timestamp_millis() }, m.sequence)));
        }
        let origin = self.spec.origin();
        let newest = newest_marked(&self.target, &self.target_stream, info, SCAN_BACK, |m| {
            m.headers.iter().find(|(name, _)| name == SOURCE_HEADER).and_then(|(_, value)| {
                let named = value.split_whitespace().next() == Some(origin.as_str());
                named.then(|| sourced_sequence(value)).flatten()
            })
        })
        .await?;
        Ok(newest.map(|copy| (Reached { sequence: copy.value, time: copy.time_ms }, copy.at)))
    }

    /// Once caught up: the target's newest sourced message is the source's message at that
    /// sequence (same id), so a source recreated under the same name, or a target fed the
    /// wrong stream, shows in health instead of passing for a copy.
    /// `at` is where in the target the copy of `sequence` was found (none: not found this
    /// look, nothing to compare).
    async fn verify(&self, sequence: u64, at: Option<u64>) -> Result<(), (&'static str, String)> {
        let Some(at) = at else { return Ok(()) };
        let original = self.source.get(&self.progress.stream, sequence).await.map_err(|e| ("source", e.to_string()))?;
        let Some(original) = original else { return Ok(()) }; // removed by retention meanwhile
        let copy = self.target.get(&self.target_stream, at).await.map_err(|e| ("target", e.to_string()))?;
        let is_copy = |copy: &chorus_backbone::StoredMessage| {
            self.spec.mirror
                || copy.headers.iter().any(|(n, v)| n == SOURCE_HEADER && sourced_sequence(v) == Some(sequence))
        };
        match copy {
            Some(copy) if is_copy(&copy) && copy.id != original.id => Err((
                "target",
                format!(
                    "the copy of source sequence {sequence} has id {:?}, the source's message has {:?}",
                    copy.id, original.id
                ),
            )),
            _ => Ok(()),
        }
    }
}
