//! The reactor against a real nats-server: exactly once per (rule, event) across kill -9,
//! absence rules and throttles.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Backbone, Message, StreamConfig};
use chorus_consumers::reactor::{Reactor, ReactorConfig};
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_runtime::{Service as _, Shutdown};
use chorus_schemas::lifecycle::Alive;
use chorus_schemas::subject::CHORUS_REACTOR;
use chorus_schemas::{Event, EventRecord, Reaction, ReactionOutcome};
use chorus_testkit::conformance::read_all;
use chorus_testkit::eventually;
use chorus_testkit::nats::NatsServer;

use crate::replicate::{count, js, publish_all, startups, try_http_get, wait_for_count};

/// Every reactor record in the stream, in order.
async fn reactions(b: &dyn Backbone) -> Vec<Reaction> {
    read_all(b, CHORUS_REACTOR)
        .await
        .into_iter()
        .map(|m| match EventRecord::decode(&m.payload).expect("reactor records decode").data {
            Event::Reaction(r) => r,
            other => panic!("not a reaction: {other:?}"),
        })
        .collect()
}

fn spawn_reactor(config: &std::path::Path, nats: &str, ops: std::net::SocketAddr) -> Child {
    Command::new(chorus_testkit::workspace_bin("chorus").expect("the chorus binary"))
        .args(["react", "--nats", nats, "--listen", &ops.to_string(), "--config"])
        .arg(config)
        .spawn()
        .expect("spawn chorus react")
}

/// A burst of 10,000 matching events; the reactor is killed with SIGKILL in the middle of
/// it and started again. Every event fires its rule once: one `fired` record and one
/// `succeeded` record per event, and the rule's publish action stored once per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reactor_killed_during_a_burst_fires_each_rule_and_event_exactly_once() {
    const EVENTS: u64 = 10_000;
    let server = NatsServer::start().unwrap();
    let b = js(&server.url()).await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    b.ensure_stream(&StreamConfig::new("ACTED", vec!["acted.>".into()])).await.unwrap();

    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("rules.yaml");
    std::fs::write(
        &config,
        format!(
            r#"name: burst
state_dir: {}
start: first
rules:
  - name: started
    match:
      stream: CHORUS_LIFECYCLE
      type: io.choria.lifecycle.v1.startup
      expression: 'data.component == "server"'
    actions:
      - publish: {{subject: "acted.{{{{ event.subject }}}}", type: test.acted, data: {{node: "{{{{ event.subject }}}}"}}}}
"#,
            work.path().join("state").display()
        ),
    )
    .unwrap();
    ReactorConfig::load(&config).expect("the test's config is valid");
    let ops: std::net::SocketAddr =
        format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap();

    let mut child = spawn_reactor(&config, &server.url(), ops);
    publish_all(&*b, startups("node", 0..EVENTS as usize, None)).await;
    // Killed once it has acted on some of the burst but not all of it.
    wait_for_count(&*b, "ACTED", 1_000, Duration::from_secs(120)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let acted = count(&*b, "ACTED").await;
    assert!(acted < EVENTS, "killed after the burst was done ({acted}): not mid-burst");

    let mut child = spawn_reactor(&config, &server.url(), ops);
    wait_for_count(&*b, CHORUS_REACTOR, 2 * EVENTS, Duration::from_secs(300)).await;
    wait_for_count(&*b, "ACTED", EVENTS, Duration::from_secs(60)).await;
    eventually("the reactor has nothing pending", Duration::from_secs(60), || async move {
        let metrics = try_http_get(ops, "/metrics").await.map_err(|e| e.to_string())?;
        if metrics.lines().any(|l| l == "chorus_reactor_pending 0") {
            Ok(())
        } else {
            Err(metrics.lines().filter(|l| l.contains("pending")).collect::<Vec<_>>().join("; "))
        }
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    // Stored once each: as many records as distinct ids, one per event and outcome.
    let records = reactions(&*b).await;
    let mut per_firing: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for r in &records {
        *per_firing.entry((r.firing.clone(), r.outcome.as_str())).or_default() += 1;
    }
    assert_eq!(records.len() as u64, 2 * EVENTS, "fired + succeeded per event, nothing twice");
    assert!(per_firing.values().all(|n| *n == 1), "a record stored twice");
    let fired: Vec<_> = records.iter().filter(|r| r.outcome == ReactionOutcome::Fired).collect();
    assert_eq!(fired.len() as u64, EVENTS);
    let mut causes: Vec<u64> = fired.iter().map(|r| r.cause.as_ref().unwrap().sequence).collect();
    causes.sort();
    causes.dedup();
    assert_eq!(causes, (1..=EVENTS).collect::<Vec<_>>(), "every event fired once");
    let acted = read_all(&*b, "ACTED").await;
    assert_eq!(acted.len() as u64, EVENTS, "each publish action stored once");
    let ids: std::collections::BTreeSet<_> = acted.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len() as u64, EVENTS);
}

fn alive_at(identity: &str, timestamp: i64) -> Message {
    let mut alive = Alive::new(identity, "server", "1.0.0", None);
    alive.timestamp = timestamp;
    let r = EventRecord::new(alive, 1);
    Message::new(r.id.clone(), r.nats_subject().unwrap(), r.encode())
}

/// An absence rule fires once per node gone silent (and again only after the node spoke and
/// went silent again); a throttle lets one firing per key through per interval, by event time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absence_fires_once_per_silent_node_and_throttles_hold() {
    let server = NatsServer::start().unwrap();
    let b = js(&server.url()).await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = ReactorConfig::from_yaml(&format!(
        r#"name: watch
state_dir: {}
start: first
tick: 50ms
rules:
  - name: silent
    match: {{stream: CHORUS_LIFECYCLE, type: io.choria.lifecycle.v1.alive, expression: 'event.subject startsWith "n"'}}
    when: {{absent_for: 5m}}
  - name: flapping
    match: {{stream: CHORUS_LIFECYCLE, type: io.choria.lifecycle.v1.alive, expression: 'event.subject startsWith "t"'}}
    throttle: 1h
"#,
        state.path().display()
    ))
    .unwrap();
    let now = chrono::Utc::now().timestamp();
    let mut events = Vec::new();
    // Five nodes silent for ten minutes, five that spoke a moment ago (and "later": their
    // deadlines are an hour away).
    for i in 0..5 {
        events.push(alive_at(&format!("n-silent-{i}"), now - 600));
        events.push(alive_at(&format!("n-live-{i}"), now + 3600));
    }
    // One node reporting every minute for 20 minutes, then once more two hours later.
    for m in 0..20 {
        events.push(alive_at("t-flap", now - 7200 - 3600 + m * 60));
    }
    events.push(alive_at("t-flap", now - 3600));
    publish_all(&*b, events).await;

    let mut reactor = Reactor::start(b.clone(), None, config, false, Shutdown::new()).await.unwrap();
    let fired = |rule: &'static str, want: usize| {
        let b = b.clone();
        async move {
            let b = b.clone();
            eventually(&format!("{want} firings of {rule}"), Duration::from_secs(60), move || {
                let b = b.clone();
                async move {
                    let n = reactions(&*b)
                        .await
                        .iter()
                        .filter(|r| r.rule == rule && r.outcome == ReactionOutcome::Fired)
                        .count();
                    if n >= want {
                        Ok(())
                    } else {
                        Err(format!("{n} firings"))
                    }
                }
            })
            .await
        }
    };
    fired("silent", 5).await;
    fired("flapping", 2).await;
    // n-silent-0 speaks (ten minutes ago again) and goes silent: one more firing for it.
    publish_all(&*b, vec![alive_at("n-silent-0", now - 600)]).await;
    fired("silent", 6).await;
    assert!(reactor.health().healthy, "{:?}", reactor.health());
    reactor.stop().await.unwrap();

    let records = reactions(&*b).await;
    let mut silent: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records.iter().filter(|r| r.rule == "silent") {
        *silent.entry(r.key.as_str()).or_default() += 1;
        assert!(r.reason.starts_with("no matching event for 5m"), "{}", r.reason);
    }
    let want: BTreeMap<&str, usize> =
        [("n-silent-0", 2), ("n-silent-1", 1), ("n-silent-2", 1), ("n-silent-3", 1), ("n-silent-4", 1)].into();
    assert_eq!(silent, want, "once per silence, never for a live node");
    let flapping: Vec<_> = records.iter().filter(|r| r.rule == "flapping").map(|r| r.time).collect();
    assert_eq!(flapping, [now - 7200 - 3600, now - 3600], "one firing per hour of event time");
}

/// Two reactors of one name, one elected; the leader is killed with SIGKILL while one of its
/// webhook calls hangs. The standby takes over, skips every action the leader completed and
/// runs the rest: each webhook key arrives once, but for the call the leader never saw
/// answered, which comes again with the same idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_reactor_takes_over_from_a_killed_leader_without_a_double_action() {
    use chorus_platform::election::Candidate;
    const EVENTS: usize = 600;
    const HELD: usize = 200;
    let server = NatsServer::start().unwrap();
    let b = js(&server.url()).await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();

    // The webhook receiver: counts calls per idempotency key, and never answers the HELD-th.
    let calls: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Arc::default();
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let app = {
        let calls = calls.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let (calls, held_tx) = (calls.clone(), held_tx.clone());
                async move {
                    let key =
                        headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                    let n = {
                        let mut calls = calls.lock().unwrap();
                        *calls.entry(key.clone()).or_default() += 1;
                        calls.len()
                    };
                    if n == HELD && calls.lock().unwrap()[&key] == 1 {
                        held_tx.send(key).ok();
                        std::future::pending::<()>().await;
                    }
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let work = tempfile::tempdir().unwrap();
    let spawn = |i: usize| {
        let config = work.path().join(format!("rules{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                r#"name: ha
state_dir: {}
start: first
concurrency: 1
election: {{ttl: 2s, candidate: "instance{i}"}}
rules:
  - name: started
    match: {{stream: CHORUS_LIFECYCLE, type: io.choria.lifecycle.v1.startup}}
    actions:
      - webhook: {{url: "http://{addr}/hook", timeout: 60s}}
"#,
                work.path().join(format!("state{i}")).display()
            ),
        )
        .unwrap();
        ReactorConfig::load(&config).expect("the test's config is valid");
        let ops: std::net::SocketAddr =
            format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap();
        spawn_reactor(&config, &server.url(), ops)
    };
    let mut instances = [spawn(0), spawn(1)];
    publish_all(&*b, startups("node", 0..EVENTS, None)).await;
    let held = tokio::time::timeout(Duration::from_secs(120), held_rx.recv()).await.expect("a call held").unwrap();

    let leader = Candidate::leader_of(&*b, "ha", Duration::from_secs(2)).await.unwrap().expect("a leader");
    let (dead, alive) = if instances[0].id() == leader.pid { (0, 1) } else { (1, 0) };
    assert_eq!(instances[dead].id(), leader.pid, "the leader is one of the two instances");
    instances[dead].kill().unwrap(); // SIGKILL
    instances[dead].wait().unwrap();

    let c = calls.clone();
    eventually("every event's webhook called", Duration::from_secs(120), move || {
        let c = c.clone();
        async move {
            let n = c.lock().unwrap().len();
            if n == EVENTS {
                Ok(())
            } else {
                Err(format!("{n} keys called"))
            }
        }
    })
    .await;
    wait_for_count(&*b, CHORUS_REACTOR, 2 * EVENTS as u64, Duration::from_secs(120)).await;
    let now_leader = Candidate::leader_of(&*b, "ha", Duration::from_secs(2)).await.unwrap().expect("a leader");
    assert_eq!(now_leader.pid, instances[alive].id(), "the standby leads");
    instances[alive].kill().unwrap();
    instances[alive].wait().unwrap();

    let calls = calls.lock().unwrap().clone();
    let twice: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).map(|(k, n)| (k.clone(), *n)).collect();
    assert_eq!(twice, [(held.clone(), 2)], "only the call in flight at the kill is made again, with its key");
    let records = reactions(&*b).await;
    assert_eq!(records.len(), 2 * EVENTS, "one fired and one succeeded record per event");
    let succeeded: std::collections::BTreeSet<_> =
        records.iter().filter(|r| r.outcome == ReactionOutcome::Succeeded).map(|r| r.firing.clone()).collect();
    assert_eq!(succeeded.len(), EVENTS);
}

/// A rule under a governor of capacity 1 runs its firings' actions one at a time, however
/// many the reactor could run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_under_a_governor_never_exceeds_its_capacity() {
    use chorus_platform::governor::{Governor, GovernorSpec};
    let server = NatsServer::start().unwrap();
    let b = js(&server.url()).await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    Governor::add(&*b, "one_at_a_time", GovernorSpec { capacity: 1, expires: Duration::from_secs(30) }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("held.log");
    let config = ReactorConfig::from_yaml(&format!(
        r#"name: governed
state_dir: {}
start: first
concurrency: 8
rules:
  - name: started
    match: {{stream: CHORUS_LIFECYCLE, type: io.choria.lifecycle.v1.startup}}
    governor: one_at_a_time
    actions:
      - command: {{run: [sh, -c, 'echo "+ $CHORUS_KEY" >> {log}; sleep 0.05; echo "- $CHORUS_KEY" >> {log}']}}
"#,
        dir.path().join("state").display(),
        log = log.display()
    ))
    .unwrap();
    let mut reactor = Reactor::start(b.clone(), None, config, false, Shutdown::new()).await.unwrap();
    publish_all(&*b, startups("gov", 0..12, None)).await;
    let l = &log;
    eventually("every firing's command ran", Duration::from_secs(60), || async move {
        let n = std::fs::read_to_string(l).unwrap_or_default().lines().filter(|x| x.starts_with('-')).count();
        if n == 12 {
            Ok(())
        } else {
            Err(format!("{n} done"))
        }
    })
    .await;
    reactor.stop().await.unwrap();
    let (mut held, mut most) = (0i32, 0i32);
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        held += if line.starts_with('+') { 1 } else { -1 };
        most = most.max(held);
    }
    assert_eq!(most, 1, "two firings acted at once under a governor of capacity 1");
}
