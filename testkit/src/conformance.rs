//! The conformance suite: one set of behaviours every [`Backbone`] engine must show.
//!
//! Each case takes a fresh backbone and a unique stream name, so the same cases run unchanged
//! against the embedded store, a single nats-server and a 3-node JetStream cluster (see
//! `tests/conformance.rs`). A case panics with a message naming what differed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{
    Backbone, BackboneError, ConsumerConfig, Message, ReplayOptions, StartPosition, StoredMessage, StreamConfig,
};
use futures::future::BoxFuture;
use futures::StreamExt;

use crate::eventually;

/// A case of the suite: `(backbone, stream name, replicas)`.
pub type Case = fn(Arc<dyn Backbone>, String, usize) -> BoxFuture<'static, ()>;

/// Every case, by name, so harnesses can generate one test per case.
pub const CASES: &[(&str, Case)] = &[
    ("publish_and_read_back", |b, s, r| Box::pin(publish_and_read_back(b, s, r))),
    ("dedupe_by_event_id", |b, s, r| Box::pin(dedupe_by_event_id(b, s, r))),
    ("publish_stream_acknowledges_in_order", |b, s, r| Box::pin(publish_stream_acknowledges_in_order(b, s, r))),
    ("headers_are_kept", |b, s, r| Box::pin(headers_are_kept(b, s, r))),
    ("no_stream_for_subject_is_an_error", |b, s, r| Box::pin(no_stream_for_subject_is_an_error(b, s, r))),
    ("invalid_messages_are_refused", |b, s, r| Box::pin(invalid_messages_are_refused(b, s, r))),
    ("consumer_ack_and_redelivery", |b, s, r| Box::pin(consumer_ack_and_redelivery(b, s, r))),
    ("consumer_nak_redelivers", |b, s, r| Box::pin(consumer_nak_redelivers(b, s, r))),
    ("consumer_resumes_by_name", |b, s, r| Box::pin(consumer_resumes_by_name(b, s, r))),
    ("consumer_filters_and_start", |b, s, r| Box::pin(consumer_filters_and_start(b, s, r))),
    ("consumer_waits_for_new_messages", |b, s, r| Box::pin(consumer_waits_for_new_messages(b, s, r))),
    ("replay_from_sequence_and_time", |b, s, r| Box::pin(replay_from_sequence_and_time(b, s, r))),
    ("replay_follows_new_messages", |b, s, r| Box::pin(replay_follows_new_messages(b, s, r))),
    ("retention_limits", |b, s, r| Box::pin(retention_limits(b, s, r))),
    ("retention_by_age", |b, s, r| Box::pin(retention_by_age(b, s, r))),
    ("ensure_stream_never_changes_an_existing_one", |b, s, r| {
        Box::pin(ensure_stream_never_changes_an_existing_one(b, s, r))
    }),
    ("update_stream_changes_limits_and_subjects", |b, s, r| {
        Box::pin(update_stream_changes_limits_and_subjects(b, s, r))
    }),
    ("concurrent_publishers", |b, s, r| Box::pin(concurrent_publishers(b, s, r))),
    ("delete_stream_and_consumer", |b, s, r| Box::pin(delete_stream_and_consumer(b, s, r))),
    ("purge_below_a_sequence", |b, s, r| Box::pin(purge_below_a_sequence(b, s, r))),
    ("kv_put_get_create_update_delete", |b, s, r| Box::pin(kv_put_get_create_update_delete(b, s, r))),
    ("kv_history_keys_and_watch", |b, s, r| Box::pin(kv_history_keys_and_watch(b, s, r))),
    ("kv_values_expire_after_the_ttl", |b, s, r| Box::pin(kv_values_expire_after_the_ttl(b, s, r))),
    ("kv_create_is_atomic_between_writers", |b, s, r| Box::pin(kv_create_is_atomic_between_writers(b, s, r))),
];

fn subject_of(stream: &str, leaf: &str) -> String {
    format!("{}.{leaf}", stream.to_lowercase())
}

/// A stream capturing `<stream lowercased>.>`.
pub fn stream_config(stream: &str, replicas: usize) -> StreamConfig {
    let mut c = StreamConfig::new(stream, vec![format!("{}.>", stream.to_lowercase())]);
    c.replicas = replicas;
    c
}

/// `n` messages `<prefix>-<i>` on `<stream>.<leaf>`.
pub fn messages(stream: &str, leaf: &str, prefix: &str, range: std::ops::Range<usize>) -> Vec<Message> {
    range
        .map(|i| {
            Message::new(
                format!("{prefix}-{i}"),
                subject_of(stream, leaf),
                format!("payload {prefix} {i}").into_bytes(),
            )
        })
        .collect()
}

/// Reads a whole stream with a finite replay.
pub async fn read_all(b: &dyn Backbone, stream: &str) -> Vec<StoredMessage> {
    let mut out = Vec::new();
    let mut r = b.replay(stream, ReplayOptions::default()).await.expect("replay");
    while let Some(m) = tokio::time::timeout(Duration::from_secs(20), r.next()).await.expect("replay stalled") {
        out.push(m.expect("replay item"));
    }
    out
}

async fn fetch_n(c: &mut dyn chorus_backbone::Consumer, n: usize, within: Duration) -> Vec<chorus_backbone::Delivery> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && tokio::time::Instant::now() < deadline {
        out.extend(c.fetch(n - out.len(), Duration::from_millis(500)).await.expect("fetch"));
    }
    out
}

async fn publish_and_read_back(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let info = b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    assert_eq!(info.messages, 0);
    let acks = b.publish_batch(messages(&stream, "a", "m", 0..100)).await.unwrap();
    let seqs: Vec<u64> = acks.iter().map(|a| a.sequence).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "sequences are assigned in publish order");
    assert!(acks.iter().all(|a| !a.duplicate && a.stream == stream));
    let one = b.publish(Message::new("single", subject_of(&stream, "b"), &b"x"[..])).await.unwrap();
    assert_eq!(one.sequence, 101);
    let info = b.stream_info(&stream).await.unwrap();
    assert_eq!((info.messages, info.first_sequence, info.last_sequence), (101, 1, 101));
    assert!(info.bytes > 0);
    let m = b.get(&stream, 5).await.unwrap().expect("message 5");
    assert_eq!((m.id.as_str(), m.subject.as_str(), m.sequence), ("m-4", subject_of(&stream, "a").as_str(), 5));
    assert_eq!(&m.payload[..], b"payload m 4");
    assert!(b.get(&stream, 1000).await.unwrap().is_none());
    let all = read_all(&*b, &stream).await;
    assert_eq!(all.len(), 101);
    assert!(all.windows(2).all(|w| w[0].sequence < w[1].sequence && w[0].time <= w[1].time));
    assert!(matches!(b.stream_info("NO_SUCH_STREAM").await, Err(BackboneError::NotFound { .. })));
}

async fn dedupe_by_event_id(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    let m = Message::new("evt-1", subject_of(&stream, "a"), &b"one"[..]);
    let first = b.publish(m.clone()).await.unwrap();
    let again = b.publish(m.clone()).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate, "second publish of the same id is reported as a duplicate");
    assert_eq!(again.sequence, first.sequence, "a duplicate reports the original's sequence");
    // Within one batch too, and mixed with new ids.
    let batch = vec![
        m.clone(),
        Message::new("evt-2", subject_of(&stream, "a"), &b"two"[..]),
        Message::new("evt-2", subject_of(&stream, "a"), &b"two"[..]),
    ];
    let acks = b.publish_batch(batch).await.unwrap();
    assert_eq!(acks.iter().map(|a| a.duplicate).collect::<Vec<_>>(), vec![true, false, true]);
    let info = b.stream_info(&stream).await.unwrap();
    assert_eq!(info.messages, 2, "each id stored once");
    let ids: Vec<String> = read_all(&*b, &stream).await.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec!["evt-1", "evt-2"]);
}

/// A flow of messages: acknowledged in order as they are stored, while the producer is
/// still making more; duplicates reported; the first invalid message ends the flow.
async fn publish_stream_acknowledges_in_order(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Message>(16);
    let flow = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut acks = b.clone().publish_stream(Box::pin(flow));
    let within = Duration::from_secs(30);
    // The producer has not finished: what it sent so far is acknowledged anyway.
    for m in messages(&stream, "a", "s", 0..10) {
        tx.send(m).await.unwrap();
    }
    for seq in 1..=10 {
        let ack = tokio::time::timeout(within, acks.next()).await.expect("acknowledged while the flow is open");
        assert_eq!(ack.unwrap().unwrap().sequence, seq);
    }
    // A steady flow, larger than any window, with a repeat of an earlier id.
    let producer = {
        let stream = stream.clone();
        tokio::spawn(async move {
            for m in messages(&stream, "a", "s", 10..3_000) {
                tx.send(m).await.unwrap();
            }
            tx.send(messages(&stream, "a", "s", 5..6).remove(0)).await.unwrap();
            tx.send(Message::new("has space", subject_of(&stream, "a"), &b""[..])).await.unwrap();
            tx.send(Message::new("after-the-error", subject_of(&stream, "a"), &b""[..])).await.ok();
        })
    };
    for seq in 11..=3_000 {
        let ack = tokio::time::timeout(within, acks.next()).await.unwrap().unwrap().unwrap();
        assert_eq!((ack.sequence, ack.duplicate), (seq, false));
    }
    let repeat = tokio::time::timeout(within, acks.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((repeat.sequence, repeat.duplicate), (6, true), "a repeated id is reported as a duplicate");
    let refused = tokio::time::timeout(within, acks.next()).await.unwrap().unwrap();
    assert!(matches!(refused, Err(BackboneError::InvalidMessage(_))), "{refused:?}");
    assert!(tokio::time::timeout(within, acks.next()).await.unwrap().is_none(), "nothing after the first error");
    drop(acks);
    producer.await.unwrap();
    let info = b.stream_info(&stream).await.unwrap();
    assert_eq!(info.messages, 3_000, "each id stored once, nothing after the error");
}

async fn headers_are_kept(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    let headers = vec![
        ("Traceparent".to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()),
        ("X-Choria".into(), "a value with spaces".into()),
        ("X-Choria".into(), "second value".into()),
    ];
    let with = Message::new("h-1", subject_of(&stream, "a"), &b"\xff\x00"[..]).with_headers(headers.clone());
    b.publish(with).await.unwrap();
    b.publish(Message::new("h-2", subject_of(&stream, "a"), &b"none"[..])).await.unwrap();
    let all = read_all(&*b, &stream).await;
    assert_eq!(all[0].headers, headers, "headers come back by name, every value");
    assert_eq!((all[0].id.as_str(), &all[0].payload[..]), ("h-1", &b"\xff\x00"[..]));
    assert!(all[1].headers.is_empty());
    assert_eq!(b.get(&stream, 1).await.unwrap().unwrap().headers, headers);
    let mut consumer = b.consumer(&stream, &ConsumerConfig::new("headers")).await.unwrap();
    let delivered = fetch_n(&mut *consumer, 2, Duration::from_secs(10)).await;
    assert_eq!(delivered[0].message.headers, headers, "a consumer sees them too");
    // A copy keeps them, less the directives meant for the original's stream.
    let mut directed = all[0].clone();
    directed.headers.push(("Nats-Expected-Last-Sequence".into(), "0".into()));
    let copy = directed.to_copy();
    let stored_time = (chorus_backbone::message::STORED_TIME_HEADER.to_string(), directed.first_stored());
    assert_eq!(copy.headers.len(), headers.len() + 1, "{:?}", copy.headers);
    assert!(headers.iter().all(|h| copy.headers.contains(h)), "{:?}", copy.headers);
    let carried = copy.headers.iter().find(|(n, _)| *n == stored_time.0).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(chrono::DateTime::parse_from_rfc3339(&carried).unwrap(), stored_time.1, "the original's store time");
}

async fn no_stream_for_subject_is_an_error(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    let err = b.publish(Message::new("x", "nobody.listens.here", &b""[..])).await.unwrap_err();
    assert!(matches!(err, BackboneError::NoStreamForSubject(_)), "got {err:?}");
}

async fn invalid_messages_are_refused(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    for bad in [
        Message::new("", subject_of(&stream, "a"), &b""[..]),
        Message::new("has space", subject_of(&stream, "a"), &b""[..]),
        Message::new("ok", format!("{}.*", stream.to_lowercase()), &b""[..]),
        Message::new("ok", format!("{}..a", stream.to_lowercase()), &b""[..]),
        Message::new("ok", subject_of(&stream, "a"), &b""[..]).with_headers(vec![("Bad Name".into(), "v".into())]),
        Message::new("ok", subject_of(&stream, "a"), &b""[..]).with_headers(vec![("N".into(), "line\nbreak".into())]),
        Message::new("ok", subject_of(&stream, "a"), &b""[..]).with_headers(vec![("nats-msg-id".into(), "x".into())]),
    ] {
        assert!(matches!(b.publish(bad.clone()).await, Err(BackboneError::InvalidMessage(_))), "{bad:?} accepted");
    }
    let mut bad_stream = stream_config(&stream, replicas);
    bad_stream.name = "has.dot".into();
    assert!(matches!(b.ensure_stream(&bad_stream).await, Err(BackboneError::Config(_))));
    assert_eq!(b.stream_info(&stream).await.unwrap().messages, 0);
}

async fn consumer_ack_and_redelivery(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..10)).await.unwrap();
    let cfg = ConsumerConfig::new("worker").with_ack_wait(Duration::from_secs(1));
    let mut c = b.consumer(&stream, &cfg).await.unwrap();
    let got = fetch_n(&mut *c, 10, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|d| d.message.sequence).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert!(got.iter().all(|d| d.delivered == 1));
    for d in got.iter().filter(|d| d.message.sequence % 2 == 0) {
        d.ack().await.unwrap();
    }
    // The five unacknowledged come back after ack_wait, marked as redeliveries.
    let again = fetch_n(&mut *c, 5, Duration::from_secs(10)).await;
    let mut seqs: Vec<u64> = again.iter().map(|d| d.message.sequence).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 3, 5, 7, 9]);
    assert!(again.iter().all(|d| d.delivered == 2), "redeliveries count deliveries");
    for d in &again {
        d.ack().await.unwrap();
    }
    let none = c.fetch(10, Duration::from_millis(1500)).await.unwrap();
    assert!(none.is_empty(), "acknowledged messages are not redelivered: {none:?}");
}

async fn consumer_nak_redelivers(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..1)).await.unwrap();
    let cfg = ConsumerConfig::new("naker").with_ack_wait(Duration::from_secs(30));
    let mut c = b.consumer(&stream, &cfg).await.unwrap();
    let got = fetch_n(&mut *c, 1, Duration::from_secs(10)).await;
    got[0].nak(None).await.unwrap();
    let again = fetch_n(&mut *c, 1, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1, "a nak'd message comes back well before ack_wait");
    assert_eq!(again[0].message.id, "m-0");
    assert_eq!(again[0].delivered, 2);
    again[0].ack().await.unwrap();
}

async fn consumer_resumes_by_name(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..100)).await.unwrap();
    let cfg = ConsumerConfig::new("resumer").with_ack_wait(Duration::from_secs(2));
    {
        let mut c = b.consumer(&stream, &cfg).await.unwrap();
        let got = fetch_n(&mut *c, 40, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 40);
        for d in &got {
            d.ack().await.unwrap();
        }
        // Acks are asynchronous on JetStream: the lag settles at 60 shortly after.
        let c = tokio::sync::Mutex::new(c);
        eventually("pending to count the 60 unacknowledged", Duration::from_secs(5), || {
            let c = &c;
            async move {
                let lag = c.lock().await.pending().await.unwrap();
                if lag == 60 {
                    Ok(())
                } else {
                    Err(format!("pending is {lag}, not 60"))
                }
            }
        })
        .await;
    }
    // A new handle with the same durable name resumes after the acknowledged ones.
    let mut c = b.consumer(&stream, &cfg).await.unwrap();
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 60 && tokio::time::Instant::now() < deadline {
        for d in c.fetch(100, Duration::from_millis(500)).await.unwrap() {
            assert!(d.message.sequence > 40, "acknowledged message {} delivered again", d.message.sequence);
            seen.insert(d.message.sequence);
            d.ack().await.unwrap();
        }
    }
    assert_eq!(seen, (41..=100).collect());
}

async fn consumer_filters_and_start(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..30 {
        let leaf = ["alive.server", "startup.server", "alive.provision"][i % 3];
        batch.push(Message::new(format!("f-{i}"), subject_of(&stream, leaf), &b"x"[..]));
    }
    b.publish_batch(batch).await.unwrap();
    let one = ConsumerConfig::new("alive").with_filter(subject_of(&stream, "alive.*"));
    let mut c = b.consumer(&stream, &one).await.unwrap();
    let got = fetch_n(&mut *c, 20, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 20);
    assert!(got.iter().all(|d| d.message.subject.contains(".alive.")));
    for d in &got {
        d.ack().await.unwrap();
    }
    assert!(c.fetch(10, Duration::from_millis(300)).await.unwrap().is_empty());

    let two = ConsumerConfig::new("two")
        .with_filter(subject_of(&stream, "startup.*"))
        .with_filter(subject_of(&stream, "*.provision"));
    let mut c = b.consumer(&stream, &two).await.unwrap();
    let got = fetch_n(&mut *c, 20, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 20, "two filters select the union");
    assert!(got.iter().all(|d| !d.message.subject.ends_with("alive.server")));
    for d in &got {
        d.ack().await.unwrap();
    }

    let from = ConsumerConfig::new("from25").with_start(StartPosition::Sequence(25));
    let mut c = b.consumer(&stream, &from).await.unwrap();
    let got = fetch_n(&mut *c, 6, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|d| d.message.sequence).collect::<Vec<_>>(), (25..=30).collect::<Vec<_>>());

    let new = ConsumerConfig::new("newonly").with_start(StartPosition::New);
    let mut c = b.consumer(&stream, &new).await.unwrap();
    assert!(c.fetch(10, Duration::from_millis(300)).await.unwrap().is_empty());
    b.publish(Message::new("late", subject_of(&stream, "alive.server"), &b"x"[..])).await.unwrap();
    let got = fetch_n(&mut *c, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].message.id, "late");
}

async fn consumer_waits_for_new_messages(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    let mut c = b.consumer(&stream, &ConsumerConfig::new("waiter")).await.unwrap();
    let publisher = {
        let b = b.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.publish_batch(messages(&stream, "a", "w", 0..3)).await.unwrap();
        })
    };
    let started = std::time::Instant::now();
    let got = c.fetch(10, Duration::from_secs(10)).await.unwrap();
    assert!(!got.is_empty(), "fetch returns messages published while it waits");
    assert!(started.elapsed() < Duration::from_secs(8), "fetch returned as soon as messages came");
    publisher.await.unwrap();
}

async fn replay_from_sequence_and_time(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    b.publish_batch(messages(&stream, "a", "early", 0..50)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    b.publish_batch(messages(&stream, "b", "late", 0..50)).await.unwrap();

    let collect = |opts: ReplayOptions| {
        let b = b.clone();
        let stream = stream.clone();
        async move {
            let mut r = b.replay(&stream, opts).await.unwrap();
            let mut out = Vec::new();
            while let Some(m) = tokio::time::timeout(Duration::from_secs(20), r.next()).await.expect("replay stalled") {
                out.push(m.unwrap());
            }
            out
        }
    };
    let from_seq = collect(ReplayOptions { start: StartPosition::Sequence(60), ..Default::default() }).await;
    assert_eq!(from_seq.iter().map(|m| m.sequence).collect::<Vec<_>>(), (60..=100).collect::<Vec<_>>());
    let from_time = collect(ReplayOptions { start: StartPosition::Time(between), ..Default::default() }).await;
    assert_eq!(from_time.len(), 50, "replay from a time starts at the first message stored after it");
    assert!(from_time.iter().all(|m| m.id.starts_with("late-")));
    let filtered =
        collect(ReplayOptions { filter_subjects: vec![subject_of(&stream, "a")], ..Default::default() }).await;
    assert_eq!(filtered.len(), 50);
    assert!(filtered.iter().all(|m| m.id.starts_with("early-")));
    let past_end = collect(ReplayOptions { start: StartPosition::Sequence(1000), ..Default::default() }).await;
    assert!(past_end.is_empty());
    let none = collect(ReplayOptions { filter_subjects: vec![subject_of(&stream, "zzz")], ..Default::default() }).await;
    assert!(none.is_empty(), "a filter matching nothing ends at once");
}

async fn replay_follows_new_messages(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    b.publish_batch(messages(&stream, "a", "old", 0..5)).await.unwrap();
    let mut r = b.replay(&stream, ReplayOptions { follow: true, ..Default::default() }).await.unwrap();
    for i in 0..5 {
        let m = tokio::time::timeout(Duration::from_secs(10), r.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(m.id, format!("old-{i}"));
    }
    b.publish_batch(messages(&stream, "a", "new", 0..3)).await.unwrap();
    for i in 0..3 {
        let m =
            tokio::time::timeout(Duration::from_secs(10), r.next()).await.expect("follow delivers").unwrap().unwrap();
        assert_eq!(m.id, format!("new-{i}"));
    }
}

async fn retention_limits(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let mut cfg = stream_config(&stream, replicas);
    cfg.max_messages = 10;
    b.ensure_stream(&cfg).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..25)).await.unwrap();
    let info = b.stream_info(&stream).await.unwrap();
    assert_eq!((info.messages, info.first_sequence, info.last_sequence), (10, 16, 25));
    let all = read_all(&*b, &stream).await;
    assert_eq!(all.first().unwrap().id, "m-15");
    assert!(b.get(&stream, 3).await.unwrap().is_none());

    let other = format!("{stream}B");
    let mut cfg = stream_config(&other, replicas);
    cfg.max_bytes = 2_000;
    b.ensure_stream(&cfg).await.unwrap();
    let big: Vec<Message> =
        (0..20).map(|i| Message::new(format!("big-{i}"), subject_of(&other, "a"), vec![b'x'; 300])).collect();
    b.publish_batch(big).await.unwrap();
    let info = b.stream_info(&other).await.unwrap();
    assert!(info.bytes <= 2_000, "max_bytes holds: {}", info.bytes);
    assert!(info.messages >= 4 && info.messages < 20, "oldest removed first: {info:?}");
    assert_eq!(info.last_sequence, 20);
}

async fn retention_by_age(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let mut cfg = stream_config(&stream, replicas);
    cfg.max_age = Some(Duration::from_secs(1));
    cfg.dedupe_window = Duration::from_secs(1);
    b.ensure_stream(&cfg).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..5)).await.unwrap();
    let info = eventually("messages older than max_age to be removed", Duration::from_secs(15), || {
        let (b, stream) = (&*b, stream.as_str());
        async move {
            let info = b.stream_info(stream).await.unwrap();
            if info.messages == 0 {
                Ok(info)
            } else {
                Err(format!("messages older than max_age were not removed: {info:?}"))
            }
        }
    })
    .await;
    assert_eq!(info.last_sequence, 5, "the last sequence stays after expiry");
    let ack = b.publish(Message::new("after", subject_of(&stream, "a"), &b""[..])).await.unwrap();
    assert_eq!(ack.sequence, 6, "sequences continue after expiry");
}

async fn ensure_stream_never_changes_an_existing_one(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let cfg = stream_config(&stream, replicas);
    b.ensure_stream(&cfg).await.unwrap();
    assert_eq!(b.stream_config(&stream).await.unwrap(), cfg, "created as asked");
    b.publish_batch(messages(&stream, "a", "m", 0..20)).await.unwrap();
    let again = b.ensure_stream(&cfg).await.unwrap();
    assert_eq!(again.messages, 20, "ensuring an existing stream keeps its messages");
    let mut other = cfg.clone();
    other.max_messages = 5;
    other.max_age = Some(Duration::from_secs(3600));
    other.dedupe_window = Duration::from_secs(60);
    other.subjects.push(format!("{}extra.>", stream.to_lowercase()));
    let kept = b.ensure_stream(&other).await.unwrap();
    assert_eq!(kept.messages, 20, "ensure never applies limits to an existing stream");
    assert_eq!(b.stream_config(&stream).await.unwrap(), cfg, "nor changes its configuration");
    assert!(b.streams().await.unwrap().contains(&cfg), "listed with its configuration");
    assert!(matches!(b.stream_config("NO_SUCH_STREAM").await, Err(BackboneError::NotFound { .. })));
}

async fn update_stream_changes_limits_and_subjects(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let cfg = stream_config(&stream, replicas);
    let mut missing = cfg.clone();
    missing.name = format!("{stream}_MISSING");
    assert!(matches!(b.update_stream(&missing).await, Err(BackboneError::NotFound { .. })));
    b.ensure_stream(&cfg).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..20)).await.unwrap();
    let mut smaller = cfg.clone();
    smaller.max_messages = 5;
    b.update_stream(&smaller).await.unwrap();
    let info = b.stream_info(&stream).await.unwrap();
    assert_eq!(info.messages, 5, "lowering max_messages applies to the stored messages");
    assert_eq!(b.stream_config(&stream).await.unwrap(), smaller);
    let mut wider = smaller.clone();
    wider.subjects.push(format!("{}extra.>", stream.to_lowercase()));
    b.update_stream(&wider).await.unwrap();
    let ack = b.publish(Message::new("x", format!("{}extra.q", stream.to_lowercase()), &b""[..])).await.unwrap();
    assert_eq!(ack.stream, stream);
}

async fn concurrent_publishers(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    let mut tasks = Vec::new();
    for p in 0..4 {
        let b = b.clone();
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for chunk in 0..10 {
                let acks = b.publish_batch(messages(&stream, "a", &format!("p{p}c{chunk}"), 0..100)).await.unwrap();
                seqs.extend(acks.into_iter().map(|a| a.sequence));
            }
            seqs
        }));
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        for s in t.await.unwrap() {
            assert!(all.insert(s), "sequence {s} given twice");
        }
    }
    assert_eq!(all, (1..=4000).collect());
    assert_eq!(b.stream_info(&stream).await.unwrap().messages, 4000);
}

async fn delete_stream_and_consumer(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..3)).await.unwrap();
    drop(b.consumer(&stream, &ConsumerConfig::new("gone")).await.unwrap());
    assert_eq!(b.stream_info(&stream).await.unwrap().consumers, 1);
    b.delete_consumer(&stream, "gone").await.unwrap();
    // On a cluster the stream's info comes from its leader, which learns of the deletion
    // from the meta leader a moment after the delete returns.
    eventually("the stream to count no consumer", Duration::from_secs(10), || {
        let b = b.clone();
        let stream = stream.clone();
        async move {
            match b.stream_info(&stream).await.unwrap().consumers {
                0 => Ok(()),
                n => Err(format!("{n} consumers")),
            }
        }
    })
    .await;
    assert!(matches!(b.delete_consumer(&stream, "gone").await, Err(BackboneError::NotFound { .. })));
    b.delete_stream(&stream).await.unwrap();
    assert!(matches!(b.stream_info(&stream).await, Err(BackboneError::NotFound { .. })));
    assert!(matches!(
        b.publish(Message::new("z", subject_of(&stream, "a"), &b""[..])).await,
        Err(BackboneError::NoStreamForSubject(_))
    ));
    // The name can be used again, starting empty.
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    assert_eq!(b.stream_info(&stream).await.unwrap().messages, 0);
}

async fn purge_below_a_sequence(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    b.ensure_stream(&stream_config(&stream, replicas)).await.unwrap();
    b.publish_batch(messages(&stream, "a", "m", 0..30)).await.unwrap();
    assert_eq!(b.purge(&stream, 11).await.unwrap(), 10, "messages 1..=10 purged");
    let info = b.stream_info(&stream).await.unwrap();
    assert_eq!((info.messages, info.first_sequence, info.last_sequence), (20, 11, 30));
    assert!(b.get(&stream, 10).await.unwrap().is_none());
    assert_eq!(read_all(&*b, &stream).await.first().unwrap().sequence, 11);
    assert_eq!(b.purge(&stream, 5).await.unwrap(), 0, "purging below the first sequence removes nothing");
    assert_eq!(b.purge(&stream, 31).await.unwrap(), 20, "purge everything");
    let info = b.stream_info(&stream).await.unwrap();
    assert_eq!((info.messages, info.last_sequence), (0, 30));
    let ack = b.publish(Message::new("after-purge", subject_of(&stream, "a"), &b""[..])).await.unwrap();
    assert_eq!(ack.sequence, 31, "sequences are not reused after a purge");
}

fn bucket_config(stream: &str, replicas: usize) -> chorus_backbone::BucketConfig {
    let mut c = chorus_backbone::BucketConfig::new(format!("kv_{}", stream.to_lowercase()));
    c.replicas = replicas;
    c
}

fn wrong_revision<T: std::fmt::Debug>(r: chorus_backbone::Result<T>) -> bool {
    matches!(r, Err(chorus_backbone::BackboneError::WrongRevision { .. }))
}

/// Put and get; create only when absent; update only at the current revision; delete.
async fn kv_put_get_create_update_delete(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let kv = b.bucket(&bucket_config(&stream, replicas)).await.unwrap();
    assert!(kv.get("a.b").await.unwrap().is_none());
    let r1 = kv.put("a.b", "one".into()).await.unwrap();
    let e = kv.get("a.b").await.unwrap().unwrap();
    assert_eq!((e.value.as_ref(), e.revision, e.operation), (&b"one"[..], r1, chorus_backbone::KvOperation::Put));
    assert!(wrong_revision(kv.create("a.b", "two".into()).await), "create over a value");
    assert!(wrong_revision(kv.update("a.b", "two".into(), r1 + 100).await), "update at a wrong revision");
    let r2 = kv.update("a.b", "two".into(), r1).await.unwrap();
    assert!(r2 > r1);
    assert!(wrong_revision(kv.update("a.b", "three".into(), r1).await), "update at a stale revision");
    assert!(wrong_revision(kv.delete("a.b", Some(r1)).await), "delete at a stale revision");
    kv.delete("a.b", Some(r2)).await.unwrap();
    assert!(kv.get("a.b").await.unwrap().is_none());
    let r3 = kv.create("a.b", "again".into()).await.expect("create after a delete");
    assert!(r3 > r2);
    assert!(kv.put("bad key", "x".into()).await.is_err(), "keys are checked");
    // Opening the bucket again gives the same bucket.
    let again = b.bucket(&bucket_config(&stream, replicas)).await.unwrap();
    assert_eq!(again.get("a.b").await.unwrap().unwrap().revision, r3);
}

/// History keeps the configured number of values; keys lists live keys; a watch sees the
/// current values, then every change.
async fn kv_history_keys_and_watch(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let kv = b.bucket(&bucket_config(&stream, replicas).with_history(3)).await.unwrap();
    for v in ["1", "2", "3", "4"] {
        kv.put("k", v.to_string().into()).await.unwrap();
    }
    kv.put("other", "x".into()).await.unwrap();
    let history: Vec<_> = kv.history("k").await.unwrap().into_iter().map(|e| e.value).collect();
    assert_eq!(history, ["2", "3", "4"].map(bytes::Bytes::from));
    kv.delete("other", None).await.unwrap();
    assert_eq!(kv.keys().await.unwrap(), ["k"]);
    let mut watch = kv.watch(">").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((first.key.as_str(), first.value.as_ref()), ("k", &b"4"[..]));
    kv.put("w.1", "new".into()).await.unwrap();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
        if e.key == "w.1" {
            assert_eq!(e.value.as_ref(), b"new");
            break;
        }
    }
}

/// A value not written again within the bucket's ttl is gone, and can be created again.
async fn kv_values_expire_after_the_ttl(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    // Long enough that the new value is read before it expires in turn on a loaded machine.
    let kv = b.bucket(&bucket_config(&stream, replicas).with_ttl(Duration::from_secs(3))).await.unwrap();
    kv.create("lease", "holder-1".into()).await.unwrap();
    assert!(wrong_revision(kv.create("lease", "holder-2".into()).await));
    let kv2 = kv.clone();
    crate::eventually("the lease to expire", Duration::from_secs(30), move || {
        let kv = kv2.clone();
        async move {
            match kv.create("lease", "holder-2".into()).await {
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    // In a cluster a replica may answer a (direct) get before it has applied the create.
    let kv3 = kv.clone();
    crate::eventually("the new holder to be read", Duration::from_secs(10), move || {
        let kv = kv3.clone();
        async move {
            match kv.get("lease").await {
                Ok(Some(e)) if e.value.as_ref() == b"holder-2" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

/// Of many writers creating one key at once, exactly one succeeds.
async fn kv_create_is_atomic_between_writers(b: Arc<dyn Backbone>, stream: String, replicas: usize) {
    let kv = b.bucket(&bucket_config(&stream, replicas)).await.unwrap();
    for round in 0..5 {
        let key = format!("slot{round}");
        let mut tasks = Vec::new();
        for w in 0..10 {
            let (kv, key) = (kv.clone(), key.clone());
            tasks.push(tokio::spawn(async move { kv.create(&key, format!("w{w}").into()).await }));
        }
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(e) => assert!(matches!(e, chorus_backbone::BackboneError::WrongRevision { .. }), "{e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
}
