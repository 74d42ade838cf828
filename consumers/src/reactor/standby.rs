//! Active-standby reactors: every instance of an elected reactor reads and evaluates the
//! streams into its own state (a *hot* standby), but only the leader acts. A standby learns
//! what the leader did from the leader's records (`succeeded`/`failed` with the firing and
//! the action's index, in the records stream) and notes it; when it takes over it first
//! reads those records to their end, then acts on its pending firings from the first action
//! nobody recorded. Since firings are a deterministic function of the streams, the standby's
//! firings are the leader's, with the same ids: what the leader did is not done again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{ReplayOptions, StartPosition};
use chorus_schemas::{Event, EventRecord, ReactionOutcome};
use futures::StreamExt;

use super::engine::{Shared, READ_BACKOFF};
use super::error::ReactorError;
use super::rules::Firing;
use super::store::Commit;

/// How long notes of done actions are kept: longer than any standby lags behind.
const KEEP_DONE: Duration = Duration::from_secs(24 * 3600);

/// Reads the reactor's own records and notes every action done, for a takeover.
pub(super) async fn follow(shared: Arc<Shared>, seen: Arc<AtomicU64>) -> Result<(), ReactorError> {
    let stream = shared.config.records_stream.clone();
    let shutdown = shared.shutdown.clone();
    let mut retry = READ_BACKOFF.retry();
    let mut pruned_at = tokio::time::Instant::now();
    loop {
        let from = shared.store.records_position()?.map(|p| p + 1).unwrap_or(1);
        let options = ReplayOptions { start: StartPosition::Sequence(from), filter_subjects: vec![], follow: true };
        let mut records = match shared.backbone.replay(&stream, options).await {
            Ok(r) => {
                shared.reading.reading(&stream);
                retry.reset();
                r
            }
            Err(e) => {
                shared.reading.waiting(stream.clone(), e.to_string());
                if !retry.wait(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        if let Ok(info) = shared.backbone.stream_info(&stream).await {
            if info.last_sequence < from {
                seen.fetch_max(info.last_sequence, Ordering::SeqCst);
            }
        }
        loop {
            let item = tokio::select! { m = records.next() => m, _ = shutdown.requested() => return Ok(()) };
            let m = match item {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    shared.reading.waiting(stream.clone(), e.to_string());
                    break;
                }
                None => break,
            };
            let mut commit = Commit::new();
            if let Ok(EventRecord { data: Event::Reaction(r), .. }) = EventRecord::decode(&m.payload) {
                if let (true, Some(action), false) =
                    (r.reactor == shared.config.name, r.action.as_ref(), r.outcome == ReactionOutcome::Fired)
                {
                    let next = action.index as usize + 1;
                    if shared.store.actions_done(&r.firing)?.is_none_or(|n| n < next) {
                        commit.actions_done(&r.firing, next, chrono::Utc::now().timestamp_millis());
                    }
                }
            }
            commit.records_position(m.sequence);
            // Durable with the evaluator's next flush; read again after a crash.
            shared.store.apply_lazily(commit)?;
            seen.fetch_max(m.sequence, Ordering::SeqCst);
            if pruned_at.elapsed() > Duration::from_secs(600) {
                pruned_at = tokio::time::Instant::now();
                prune(&shared)?;
            }
        }
        if !retry.wait(&shutdown).await {
            return Ok(());
        }
    }
}

fn prune(shared: &Shared) -> Result<(), ReactorError> {
    let before = chrono::Utc::now().timestamp_millis() - KEEP_DONE.as_millis() as i64;
    let mut commit = Commit::new();
    for id in shared.store.done_before(before)? {
        commit.forget_done(&id);
    }
    shared.store.apply_lazily(commit)
}

/// Waits until the follower has read the records stream up to where it ends now.
pub(super) async fn catch_up(shared: &Shared, seen: &AtomicU64) -> Result<(), ReactorError> {
    let end = shared.backbone.stream_info(&shared.config.records_stream).await?.last_sequence;
    let mut wait = tokio::time::interval(Duration::from_millis(20));
    while seen.load(Ordering::SeqCst) < end {
        tokio::select! {
            _ = wait.tick() => {}
            _ = shared.shutdown.requested() => return Ok(()),
        }
    }
    Ok(())
}

/// `firing` with the actions another instance recorded as done skipped; `None` when all are.
pub(super) fn settle(shared: &Shared, mut firing: Firing, actions: usize) -> Result<Option<Firing>, ReactorError> {
    if let Some(next) = shared.store.actions_done(&firing.id)? {
        firing.next_action = firing.next_action.max(next);
    }
    Ok((firing.next_action < actions).then_some(firing))
}
