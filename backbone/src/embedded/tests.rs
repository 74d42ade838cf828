//! Chunk layout behaviour of the embedded engine: reads across chunk boundaries, retention that
//! cuts into a chunk, recovery and dedupe rebuilt from chunks after a reopen.

use std::time::Duration;

use futures::StreamExt;

use super::writer::{CHUNK_MAX_MESSAGES, CHUNK_TARGET_BYTES};
use super::{codec, EmbeddedBackbone};
use crate::{Backbone, ConsumerConfig, Message, ReplayOptions, StartPosition, StoredMessage, StreamConfig};

fn msgs(prefix: &str, range: std::ops::Range<usize>, size: usize) -> Vec<Message> {
    range.map(|i| Message::new(format!("{prefix}-{i}"), format!("t.{}", i % 3), vec![i as u8; size])).collect()
}

async fn replay_all(b: &EmbeddedBackbone, opts: ReplayOptions) -> Vec<StoredMessage> {
    let mut r = b.replay("T", opts).await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = r.next().await {
        out.push(m.unwrap());
    }
    out
}

/// (first sequence, message count) of every chunk of stream `T`.
fn chunks(b: &EmbeddedBackbone) -> Vec<(u64, u64)> {
    chunk_sizes(b).into_iter().map(|(first, count, _)| (first, count)).collect()
}

/// (first sequence, message count, bytes) of every chunk of stream `T`.
fn chunk_sizes(b: &EmbeddedBackbone) -> Vec<(u64, u64, usize)> {
    let h = b.stream("T").unwrap();
    h.tree
        .iter()
        .map(|item| {
            let (k, v) = item.unwrap();
            (codec::key_seq(&k).unwrap(), u64::from(codec::chunk_count(&v).unwrap()), v.len())
        })
        .collect()
}

fn assert_contiguous(chunks: &[(u64, u64)]) {
    for w in chunks.windows(2) {
        assert_eq!(w[0].0 + w[0].1, w[1].0, "chunks follow each other without gap or overlap: {chunks:?}");
    }
}

#[tokio::test]
async fn messages_span_chunks_and_read_back_by_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let b = EmbeddedBackbone::open_path(dir.path()).unwrap();
    b.ensure_stream(&StreamConfig::new("T", vec!["t.>".into()])).await.unwrap();
    // Chunks are sealed by size; a message larger than a chunk has one of its own.
    let mut batch = msgs("small", 0..2 * CHUNK_MAX_MESSAGES as usize + 10, 0);
    batch.extend(msgs("big", 0..40, 500));
    batch.push(Message::new("huge", "t.h", vec![7u8; 3 * CHUNK_TARGET_BYTES]));
    let n = batch.len() as u64;
    let acks = b.publish_batch(batch.clone()).await.unwrap();
    assert_eq!(acks.iter().map(|a| a.sequence).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>());
    let sizes = chunk_sizes(&b);
    assert!(sizes.len() >= 10, "{sizes:?}");
    assert!(sizes.iter().all(|(_, count, _)| *count <= u64::from(CHUNK_MAX_MESSAGES)));
    assert!(sizes[..sizes.len() - 1].iter().all(|(_, _, bytes)| *bytes <= CHUNK_TARGET_BYTES), "{sizes:?}");
    assert!(sizes[0].2 > CHUNK_TARGET_BYTES - 100, "a chunk is filled before it is sealed: {sizes:?}");
    assert_eq!(*chunks(&b).last().unwrap(), (n, 1), "an oversized message has a chunk of its own");
    assert_contiguous(&chunks(&b));

    for (i, m) in batch.iter().enumerate() {
        let got = b.get("T", i as u64 + 1).await.unwrap().expect("stored");
        assert_eq!((got.id.as_str(), &got.payload[..]), (m.id.as_str(), &m.payload[..]));
    }
    assert!(b.get("T", 0).await.unwrap().is_none());
    assert!(b.get("T", n + 1).await.unwrap().is_none());

    let all = replay_all(&b, ReplayOptions::default()).await;
    assert_eq!(all.iter().map(|m| m.sequence).collect::<Vec<_>>(), (1..=n).collect::<Vec<_>>());
    let from = replay_all(&b, ReplayOptions { start: StartPosition::Sequence(1030), ..Default::default() }).await;
    assert_eq!(from.first().unwrap().sequence, 1030);
    assert_eq!(from.len() as u64, n - 1029);
    let filtered = replay_all(&b, ReplayOptions { filter_subjects: vec!["t.1".into()], ..Default::default() }).await;
    assert!(filtered.iter().all(|m| m.subject == "t.1"));
    assert_eq!(filtered.len(), batch.iter().filter(|m| m.subject == "t.1").count());
}

#[tokio::test]
async fn consumers_and_time_search_cross_chunk_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let b = EmbeddedBackbone::open_path(dir.path()).unwrap();
    b.ensure_stream(&StreamConfig::new("T", vec!["t.>".into()])).await.unwrap();
    b.publish_batch(msgs("a", 0..1500, 100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Many small groups: chunks of a few messages each.
    for i in 0..30 {
        b.publish_batch(msgs(&format!("b{i}"), 0..7, 100)).await.unwrap();
    }
    assert!(chunks(&b).len() > 30);
    let late = replay_all(&b, ReplayOptions { start: StartPosition::Time(between), ..Default::default() }).await;
    assert_eq!(late.first().unwrap().sequence, 1501, "time search lands on the first later message");
    assert_eq!(late.len(), 210);

    let mut c = b.consumer("T", &ConsumerConfig::new("c").with_filter("t.2")).await.unwrap();
    let expected: Vec<u64> =
        replay_all(&b, ReplayOptions { filter_subjects: vec!["t.2".into()], ..Default::default() })
            .await
            .iter()
            .map(|m| m.sequence)
            .collect();
    assert_eq!(c.pending().await.unwrap(), expected.len() as u64);
    let mut got = Vec::new();
    loop {
        let batch = c.fetch(37, Duration::from_millis(50)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for d in batch {
            got.push(d.message.sequence);
            d.ack().await.unwrap();
        }
    }
    assert_eq!(got, expected, "small fetches resume mid-chunk without loss or repeat");
    assert_eq!(c.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn retention_cuts_into_a_chunk_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let b = EmbeddedBackbone::open_path(dir.path()).unwrap();
        let mut cfg = StreamConfig::new("T", vec!["t.>".into()]);
        cfg.max_messages = 10;
        b.ensure_stream(&cfg).await.unwrap();
        b.publish_batch(msgs("m", 0..25, 10)).await.unwrap();
        assert_eq!(chunks(&b), vec![(16, 10)], "the kept end of the chunk is stored under its new first sequence");
        let info = b.stream_info("T").await.unwrap();
        assert_eq!(
            (info.messages, info.first_sequence, info.last_sequence, info.bytes),
            (10, 16, 25, 10 * (4 + 3 + 10))
        );
        assert!(b.get("T", 15).await.unwrap().is_none());
        assert_eq!(b.get("T", 16).await.unwrap().unwrap().id, "m-15");

        // Whole chunks go first, then the start of the next one.
        for i in 0..4 {
            b.publish_batch(msgs(&format!("n{i}"), 0..3, 10)).await.unwrap();
        }
        let c = chunks(&b);
        assert_eq!(c.first().unwrap().0, 28);
        assert_eq!(c.iter().map(|c| c.1).sum::<u64>(), 10);
        assert_contiguous(&c);

        // A lower byte limit applies at once to the stored messages.
        cfg.max_bytes = 5 * 17;
        b.update_stream(&cfg).await.unwrap();
        let info = b.stream_info("T").await.unwrap();
        assert_eq!((info.messages, info.first_sequence, info.last_sequence), (5, 33, 37));
    }
    let b = EmbeddedBackbone::open_path(dir.path())
        .expect("reopening (the store waits out the lock a closing handle holds)");
    let info = b.stream_info("T").await.unwrap();
    assert_eq!((info.messages, info.first_sequence, info.last_sequence), (5, 33, 37));
    let all = replay_all(&b, ReplayOptions::default()).await;
    assert_eq!(all.iter().map(|m| m.sequence).collect::<Vec<_>>(), (33..=37).collect::<Vec<_>>());
    assert_eq!(b.publish(Message::new("next", "t.x", &b""[..])).await.unwrap().sequence, 38);
}

#[tokio::test]
async fn reopen_recounts_from_chunks_and_rebuilds_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let batch = msgs("m", 0..3000, 40);
    {
        let b = EmbeddedBackbone::open_path(dir.path()).unwrap();
        b.ensure_stream(&StreamConfig::new("T", vec!["t.>".into()])).await.unwrap();
        for part in batch.chunks(700) {
            b.publish_batch(part.to_vec()).await.unwrap();
        }
        // Lose the saved counters, as a crash between a write and its stats would.
        b.inner.meta.remove(b"stats/T").unwrap();
    }
    let b = EmbeddedBackbone::open_path(dir.path())
        .expect("reopening (the store waits out the lock a closing handle holds)");
    let info = b.stream_info("T").await.unwrap();
    let bytes: u64 = batch.iter().map(codec::stored_size).sum();
    assert_eq!((info.messages, info.first_sequence, info.last_sequence, info.bytes), (3000, 1, 3000, bytes));
    // Ids from every chunk are still known, newest and oldest alike.
    let again = vec![batch[2999].clone(), batch[0].clone(), batch[1234].clone(), Message::new("new", "t.0", &b""[..])];
    let acks = b.publish_batch(again).await.unwrap();
    assert_eq!(
        acks.iter().map(|a| (a.sequence, a.duplicate)).collect::<Vec<_>>(),
        vec![(3000, true), (1, true), (1235, true), (3001, false)]
    );
}
