//! No acknowledged event is lost: kill -9 of a process writing to the embedded store, and a
//! JetStream cluster node killed while publishing; a single server killed under a full
//! publish window.

use std::collections::BTreeSet;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, ConsumerConfig, Message};
use chorus_testkit::conformance::{messages, read_all, stream_config};
use chorus_testkit::nats::{NatsCluster, NatsServer};

/// A child process publishes to an embedded store and prints each acknowledged id; it is
/// killed with SIGKILL mid-stream. Every id it printed must be in the reopened store, once,
/// with gap-free sequences.
#[test]
fn kill_9_of_an_embedded_writer_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    for round in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_embedded-writer"))
            .arg(&path)
            .arg(format!("r{round}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (rx, reader) = chorus_testkit::child::whole_lines(child.stdout.take().unwrap());
        let ack = |line: String| line.strip_prefix("ACK ").map(str::to_string);
        let mut acked = Vec::new();
        while acked.len() < 20_000 + round * 7_919 {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => acked.extend(ack(line)),
                Err(_) => break,
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter().filter_map(ack));
        assert!(acked.len() >= 20_000, "writer died early");

        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let b = EmbeddedBackbone::open_path(&path).unwrap();
            let stored = read_all(&b, "CRASH").await;
            let ids: BTreeSet<&str> = stored.iter().map(|m| m.id.as_str()).collect();
            assert_eq!(ids.len(), stored.len(), "an event was stored twice");
            for id in &acked {
                assert!(ids.contains(id.as_str()), "round {round}: acknowledged event {id} lost");
            }
            assert!(stored.windows(2).all(|w| w[1].sequence == w[0].sequence + 1), "sequence gap");
            let info = b.stream_info("CRASH").await.unwrap();
            assert_eq!(info.messages as usize, stored.len(), "counters agree with the stored messages");
        });
    }
}

/// R3 stream on a 3-node cluster; a node is killed with SIGKILL while publishers and a consumer
/// run. Every acknowledged event is in the stream afterwards, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_killed_mid_publish_loses_no_acknowledged_event() {
    let mut cluster = NatsCluster::start(3).unwrap();
    let mut cfg = NatsConfig::from_url_list(&cluster.url_list());
    cfg.request_timeout = Duration::from_secs(3);
    cfg.publish_retry_for = Duration::from_secs(20);
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&cfg).await.unwrap());
    b.ensure_stream(&stream_config("KILL", 3)).await.unwrap();

    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let b = b.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for chunk in 0..40 {
                let batch = messages("KILL", "a", &format!("c{chunk}"), 0..200);
                let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
                match b.publish_batch(batch).await {
                    Ok(acks) => {
                        acked.extend(ids.into_iter().zip(acks));
                        progress.store(acked.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(e) => eprintln!("batch {chunk} failed (not acknowledged): {e}"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Kill the node the client is most likely talking to and the stream leader alike: node 0.
    cluster.kill_node(0).unwrap();
    let at_kill = progress.load(std::sync::atomic::Ordering::SeqCst);
    let acked = publisher.await.unwrap();
    assert!(at_kill > 0 && at_kill < acked.len(), "the node died mid-publish ({at_kill} of {} acked)", acked.len());
    assert!(acked.len() >= 4_000, "publishing kept going through the failover: {} acked", acked.len());

    // Read back through a durable consumer on the surviving nodes.
    let mut consumer = b.consumer("KILL", &ConsumerConfig::new("verify")).await.unwrap();
    let mut seen = BTreeSet::new();
    let mut dups = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < acked.len() && tokio::time::Instant::now() < deadline {
        for d in consumer.fetch(1000, Duration::from_secs(1)).await.unwrap_or_default() {
            if !seen.insert(d.message.id.clone()) {
                dups += 1;
            }
            d.ack().await.ok();
        }
    }
    let stored = read_all(&*b, "KILL").await;
    let stored_ids: BTreeSet<&str> = stored.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(stored_ids.len(), stored.len(), "no event stored twice");
    for (id, _) in &acked {
        assert!(stored_ids.contains(id.as_str()), "acknowledged event {id} lost");
        assert!(seen.contains(id), "acknowledged event {id} not delivered to the consumer");
    }
    assert_eq!(dups, 0, "no duplicate deliveries once acknowledged");
    // The killed node comes back and catches up.
    cluster.restart_node(0).unwrap();
    b.publish(Message::new("after-restart", "kill.a", &b""[..])).await.unwrap();
}

/// A server killed and restarted while one large batch has a full window of publishes in
/// flight: the batch completes (every lost acknowledgement retried, the retries deduped) in
/// about one request timeout, not one timeout per lost publish (a producer seemed hung for
/// hours that way), and the stream holds every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_under_a_full_publish_window_costs_one_timeout() {
    let mut server = NatsServer::start().unwrap();
    let mut cfg = NatsConfig::from_url_list(&server.url());
    cfg.request_timeout = Duration::from_secs(2);
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&cfg).await.unwrap());
    let observer = JetStreamBackbone::connect(&cfg).await.unwrap();
    b.ensure_stream(&stream_config("WINDOW", 1)).await.unwrap();
    let batch = messages("WINDOW", "a", "w", 0..100_000);
    let publisher = {
        let b = b.clone();
        tokio::spawn(async move { b.publish_batch(batch).await })
    };
    loop {
        let stored = observer.stream_info("WINDOW").await.map(|i| i.messages).unwrap_or(0);
        assert!(!publisher.is_finished(), "the batch finished before the server could be killed");
        if stored >= 5_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::block_in_place(|| {
        server.kill().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        server.restart().unwrap();
    });
    // One lost window costs one 2 s timeout plus the retries; per-publish timeouts would
    // take thousands of seconds.
    let acks = tokio::time::timeout(Duration::from_secs(45), publisher)
        .await
        .expect("the batch did not complete within 45 s of the restart")
        .unwrap()
        .expect("the batch is acknowledged");
    assert_eq!(acks.len(), 100_000);
    let stored = read_all(&*b, "WINDOW").await;
    let ids: BTreeSet<&str> = stored.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len(), stored.len(), "no event stored twice");
    assert_eq!(ids.len(), 100_000, "every event stored");
}

/// A server that is gone for good: a batch larger than the client's command queue fails after
/// `publish_retry_for` instead of waiting forever to hand publishes to a connection that
/// keeps reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_to_a_server_gone_for_good_fails_instead_of_hanging() {
    let mut server = NatsServer::start().unwrap();
    let mut cfg = NatsConfig::from_url_list(&server.url());
    cfg.request_timeout = Duration::from_secs(1);
    cfg.publish_retry_for = Duration::from_secs(3);
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&cfg).await.unwrap());
    b.ensure_stream(&stream_config("GONE", 1)).await.unwrap();
    // The pipeline's inbox is taken (and later reused) while the server is up.
    b.publish_batch(messages("GONE", "a", "w", 0..10)).await.unwrap();
    tokio::task::block_in_place(|| server.kill().unwrap());
    let batch = messages("GONE", "a", "w", 10..20_010);
    let outcome = tokio::time::timeout(Duration::from_secs(60), b.publish_batch(batch))
        .await
        .expect("the batch neither failed nor finished within 60 s of losing the server");
    assert!(outcome.is_err(), "a batch to a server that is gone must fail");
}

/// Reads `n` messages of a following replay, skipping the error items a replay reports while
/// it starts again (they say why); fails if the replay stops or stalls for a minute.
async fn read_following(replay: &mut chorus_backbone::MessageStream, n: usize) -> (Vec<u64>, usize) {
    use futures::StreamExt;
    let (mut sequences, mut errors) = (Vec::new(), 0);
    while sequences.len() < n {
        let item = tokio::time::timeout(Duration::from_secs(60), replay.next())
            .await
            .expect("the replay stalled for a minute")
            .expect("a following replay does not end");
        match item {
            Ok(m) => sequences.push(m.sequence),
            Err(_) => errors += 1,
        }
    }
    (sequences, errors)
}

/// A backbone on `server`, its stream `name` holding `count` messages (ids `<prefix>0`, ...),
/// and a replay of the stream that follows it.
async fn following_replay(
    server: &NatsServer,
    name: &str,
    prefix: &str,
    count: usize,
) -> (Arc<dyn Backbone>, chorus_backbone::MessageStream) {
    let cfg = NatsConfig::from_url_list(&server.url());
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&cfg).await.unwrap());
    b.ensure_stream(&stream_config(name, 1)).await.unwrap();
    b.publish_batch(messages(name, "a", prefix, 0..count)).await.unwrap();
    let options = chorus_backbone::ReplayOptions { follow: true, ..Default::default() };
    let replay = b.replay(name, options).await.unwrap();
    (b, replay)
}

/// A replay whose consumer the server drops (deleted by an operator, lost with a server's
/// memory) goes on after the last message it delivered: every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_consumer_is_deleted_goes_on_in_order() {
    use futures::TryStreamExt;
    let server = NatsServer::start().unwrap();
    let (b, mut replay) = following_replay(&server, "ORDERED", "o", 3_000).await;
    let (mut seen, _) = read_following(&mut replay, 500).await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js.get_stream("ORDERED").await.unwrap();
    let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    assert!(!names.is_empty(), "the replay reads through a consumer");
    for name in names {
        stream.delete_consumer(&name).await.unwrap();
    }
    // New messages after the deletion are read too.
    b.publish_batch(messages("ORDERED", "a", "o", 3_000..3_500)).await.unwrap();
    let (rest, _) = read_following(&mut replay, 3_000).await;
    seen.extend(rest);
    assert_eq!(seen, (1..=3_500).collect::<Vec<u64>>(), "every message once, in order");
}

/// A finite replay whose remaining range is purged before the server sent it (it holds back
/// what flow control has not let through) ends after what it did send: it does not wait for
/// messages that will never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finite_replay_ends_when_the_rest_of_its_range_is_purged() {
    use futures::StreamExt;
    let server = NatsServer::start().unwrap();
    let cfg = NatsConfig::from_url_list(&server.url());
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&cfg).await.unwrap());
    b.ensure_stream(&stream_config("PURGED", 1)).await.unwrap();
    // 16 MB: more than a push consumer sends before its first flow control is answered.
    let total = 4_000;
    let mut batch = messages("PURGED", "a", "p", 0..total);
    for m in &mut batch {
        m.payload = vec![b'x'; 4096].into();
    }
    b.publish_batch(batch).await.unwrap();
    let mut replay = b.replay("PURGED", Default::default()).await.unwrap();
    let first = replay.next().await.expect("a first message").unwrap();
    assert_eq!(first.sequence, 1);
    b.purge("PURGED", total as u64 + 1).await.unwrap();
    let mut sequences = vec![first.sequence];
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = replay.next().await {
            sequences.push(m.expect("no error").sequence);
        }
    })
    .await;
    assert!(rest.is_ok(), "the replay waited a minute for purged messages after {}", sequences.len());
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>(), "what was sent, once, in order");
    assert!(sequences.len() < total, "the purge took messages the server had not sent yet (else this shows nothing)");
}

/// A following replay survives a restart of its server (the consumer, kept in memory, is
/// gone with it): it goes on after the last message it delivered, every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_goes_on_in_order_after_its_server_restarts() {
    let mut server = NatsServer::start().unwrap();
    let (b, mut replay) = following_replay(&server, "RESTARTED", "r", 2_000).await;
    let (mut seen, _) = read_following(&mut replay, 700).await;
    tokio::task::block_in_place(|| {
        server.kill().unwrap();
        server.restart().unwrap();
    });
    b.publish_batch(messages("RESTARTED", "a", "r", 2_000..2_300)).await.unwrap();
    let (rest, _) = read_following(&mut replay, 1_600).await;
    seen.extend(rest);
    assert_eq!(seen, (1..=2_300).collect::<Vec<u64>>(), "every message once, in order");
}
