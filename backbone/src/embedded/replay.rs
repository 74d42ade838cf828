//! Ordered replays of an embedded stream, fed by a task through a bounded channel so a slow
//! reader applies backpressure instead of buffering the whole stream.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;

use super::codec;
use super::StreamHandle;
use crate::{MessageStream, ReplayOptions, Result};

/// Messages read per step (matching the filters or not).
const STEP: usize = 512;

pub(crate) fn start(handle: Arc<StreamHandle>, options: ReplayOptions) -> Result<MessageStream> {
    let mut next = handle.start_seq(&options.start)?;
    let end = *handle.durable.borrow();
    let (tx, rx) = tokio::sync::mpsc::channel(STEP * 2);
    let mut changes = handle.durable.subscribe();
    tokio::spawn(async move {
        loop {
            let limit = if options.follow { *changes.borrow_and_update() } else { end };
            while next <= limit {
                let first = handle.state.lock().unwrap().first_seq;
                let from = next.max(first);
                let mut batch = Vec::with_capacity(STEP);
                let mut scanned = 0;
                next = limit + 1;
                let read = handle.scan(from, limit, |seq, record| {
                    if crate::subject::matches_any(&options.filter_subjects, codec::subject_of(record)?) {
                        batch.push(codec::decode(&handle.name, seq, record)?);
                    }
                    scanned += 1;
                    if scanned >= STEP {
                        next = seq + 1;
                        return Ok(false);
                    }
                    Ok(true)
                });
                if let Err(e) = read {
                    tx.send(Err(e)).await.ok();
                    return;
                }
                for m in batch {
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
            }
            if !options.follow {
                return;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}
