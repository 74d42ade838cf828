//! Ordered replays of an embedded stream, fed by a task through a bounded channel so a slow
//! reader applies backpressure instead of buffering the whole stream.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;

use super::codec::{self, seq_key};
use super::StreamHandle;
use crate::{MessageStream, ReplayOptions, Result};

const CHUNK: usize = 512;

pub(crate) fn start(handle: Arc<StreamHandle>, options: ReplayOptions) -> Result<MessageStream> {
    let mut next = handle.start_seq(&options.start)?;
    let end = *handle.durable.borrow();
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNK * 2);
    let mut changes = handle.durable.subscribe();
    tokio::spawn(async move {
        loop {
            let limit = if options.follow { *changes.borrow_and_update() } else { end };
            while next <= limit {
                let first = handle.state.lock().unwrap().first_seq;
                next = next.max(first);
                let mut chunk = Vec::with_capacity(CHUNK);
                let mut last = next;
                let read: Result<()> = (|| {
                    for item in handle.tree.range(seq_key(next)..=seq_key(limit)).take(CHUNK) {
                        let (k, v) = item?;
                        let seq = codec::key_seq(&k)?;
                        last = seq;
                        if crate::subject::matches_any(&options.filter_subjects, codec::subject_of(&v)?) {
                            chunk.push(codec::decode(&handle.name, seq, &v)?);
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = read {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                if chunk.is_empty() && last == next && handle.tree.get(seq_key(next)).ok().flatten().is_none() {
                    // nothing at or after `next` up to the limit
                    next = limit + 1;
                } else {
                    next = last + 1;
                }
                for m in chunk {
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
