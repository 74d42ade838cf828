use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Backbone, StartPosition};
use chorus_platform::{to_message, BackboneSink, Emitter};
use chorus_runtime::{Backoff, Service as _, Shutdown};
use chorus_schemas::lifecycle::Lifecycle;
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_schemas::{Event, EventRecord};
use chrono::{DateTime, Utc};

use super::config::{ProvisionerConfig, Step};
use super::engine::Provisioner;
use super::record::{EventRef, NodeRecord, NodeStatus, ProvisionedOutcome, StartupOutcome};
use super::store::StateStore;
use super::PROVISION_MODE_COMPONENT;

const T0: i64 = 1_700_000_000;

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(T0 + secs, 0).unwrap()
}

fn ev(id: &str, sequence: u64) -> EventRef {
    EventRef { event_id: id.into(), sequence, time: at(0), component: PROVISION_MODE_COMPONENT.into() }
}

#[test]
fn config_defaults_and_yaml() {
    let c = ProvisionerConfig::from_yaml(
        "steps:\n  - {agent: rpcutil, action: ping}\n  - {agent: rpcutil, action: get_fact, data: {fact: country}, timeout: 5s}\n",
    )
    .unwrap();
    assert_eq!(c.components, vec!["provision_mode_server".to_string()]);
    assert_eq!((c.consumer.as_str(), c.concurrency, c.event_component.as_str()), ("provisioner", 50, "provisioner"));
    assert_eq!(c.steps[1].data.get("fact"), Some(&serde_json::json!("country")));
    assert_eq!((c.steps[0].timeout, c.steps[1].timeout), (None, Some(Duration::from_secs(5))));
    assert_eq!(
        c.filter_subjects(),
        vec!["choria.lifecycle.event.startup.provision_mode_server", "choria.lifecycle.event.provisioned.*"]
    );
    assert_eq!(c, ProvisionerConfig::new(c.steps.clone()));
    let c = ProvisionerConfig::from_yaml(
        "components: [provision_mode_server, bootstrap]\nconcurrency: 5\nsweep_interval: 2s\nbackoff: {initial: 1s, max: 4s}\nstart: {from: new}\nsteps: [{agent: a, action: b}]\n",
    )
    .unwrap();
    assert_eq!(c.filter_subjects().len(), 3);
    assert_eq!(
        (c.backoff.initial, c.backoff.max, c.backoff.multiplier),
        (Duration::from_secs(1), Duration::from_secs(4), 2.0)
    );
    assert_eq!(c.start, StartPosition::New);
}

#[test]
fn bad_configs_name_the_field() {
    let err = |yaml: &str| ProvisionerConfig::from_yaml(yaml).unwrap_err().to_string();
    assert!(err("steps: [{agent: a, action: b, bogus: 1}]").contains("steps[0].bogus: unknown field `bogus`"));
    assert!(err("stepz: []").contains("unknown field `stepz`"));
    assert!(err("components: [a]").contains("steps: must list at least one step (or enrol nodes)"));
    assert!(err("steps: []").contains("steps: must list at least one step"));
    assert!(err("steps: [{agent: a, action: b}]\ncomponents: []").contains("components: must list"));
    assert!(err("steps: [{agent: a, action: b}]\ncomponents: [web.prod]").contains("components[0]"));
    assert!(err("steps: [{agent: 'rpc util', action: b}]").contains("steps[0].agent"));
    assert!(err("steps: [{agent: a, action: ''}]").contains("steps[0].action"));
    assert!(err("steps: [{agent: a, action: b, timeout: 0s}]").contains("steps[0].timeout"));
    assert!(err("steps: [{agent: a, action: b}]\nconcurrency: 0").contains("concurrency"));
    assert!(err("steps: [{agent: a, action: b}]\nbackoff: {initial: 10s, max: 1s}").contains("backoff.max"));
    assert!(err("steps: [{agent: a, action: b}]\nbackoff: {multiplier: 0.5}").contains("backoff.multiplier"));
    assert!(err("steps: [{agent: a, action: b}]\nconsumer: 'a.b'").contains("consumer"));
    assert!(err("steps: [{agent: a, action: b}]\nsweep_interval: 1ms").contains("sweep_interval"));
    assert!(err("steps: [{agent: a, action: b}]\nevent_component: 'x y'").contains("event_component"));
    assert!(err("steps: [{agent: a, action: b}]\nbatch_size: 0").contains("batch_size"));
    assert!(err("steps: [{agent: a, action: b}]\nstep_timeout: nonsense").contains("step_timeout"));
}

#[test]
fn first_startup_makes_a_node_due_and_duplicates_do_not() {
    let mut n = NodeRecord::new("a", at(0));
    assert!(!n.is_due(at(0)), "a record without a startup is not due");
    assert_eq!(n.on_startup(ev("s1", 10), at(1)), StartupOutcome::New);
    assert_eq!((n.status, n.next_attempt_at, n.next_step), (NodeStatus::Pending, Some(at(1)), 0));
    assert!(n.is_due(at(1)));
    assert_eq!(n.on_startup(ev("s1", 10), at(2)), StartupOutcome::Duplicate);
    assert_eq!(n.on_startup(ev("s1", 99), at(2)), StartupOutcome::Duplicate, "the same event stored again later");
    assert_eq!(n.on_startup(ev("s0", 5), at(2)), StartupOutcome::Stale, "an older boot");
    assert_eq!(n.startup.as_ref().unwrap().event_id, "s1");
}

#[test]
fn failures_back_off_and_keep_progress() {
    let backoff = Backoff { initial: Duration::from_secs(5), max: Duration::from_secs(60), multiplier: 2.0 };
    let mut n = NodeRecord::new("a", at(0));
    n.on_startup(ev("s1", 10), at(0));
    n.step_done(0, at(1));
    n.attempt_failed("step 2: no reply".into(), &backoff, at(2));
    assert_eq!((n.status, n.attempts, n.next_step), (NodeStatus::Failed, 1, 1));
    assert_eq!(n.next_attempt_at, Some(at(7)));
    assert!(!n.is_due(at(6)) && n.is_due(at(7)));
    n.attempt_failed("again".into(), &backoff, at(7));
    assert_eq!((n.attempts, n.next_attempt_at), (2, Some(at(17))));
    assert_eq!(n.last_error.as_deref(), Some("again"));
    // A duplicate startup does not reset the backoff or the progress.
    assert_eq!(n.on_startup(ev("s1", 10), at(8)), StartupOutcome::Duplicate);
    assert_eq!((n.status, n.next_step, n.attempts), (NodeStatus::Failed, 1, 2));
    // A new boot does: all steps again, at once.
    assert_eq!(n.on_startup(ev("s2", 20), at(9)), StartupOutcome::Restarted);
    assert_eq!((n.status, n.next_step, n.attempts, n.last_error.clone()), (NodeStatus::Pending, 0, 0, None));
    assert!(n.is_due(at(9)));
    assert!(n.serves(Some("s2")) && !n.serves(Some("s1")), "an attempt for the old boot may not record");
}

#[test]
fn provisioned_nodes_are_skipped_unless_they_start_in_provisioning_mode_after_it() {
    let mut n = NodeRecord::new("a", at(0));
    n.on_startup(ev("s1", 10), at(0));
    n.outbox = Some("stamped".into());
    n.confirmed(ev("p1", 50), at(1));
    assert_eq!((n.status, n.attempts, n.times_provisioned, n.outbox.clone()), (NodeStatus::Provisioned, 1, 1, None));
    assert!(!n.is_due(at(100)));
    assert!(!n.serves(Some("s1")), "nothing records into a provisioned node");
    // Our own event read back from the stream, and the original startup replayed.
    assert_eq!(n.on_provisioned(ev("p1", 50), at(2)), ProvisionedOutcome::Duplicate);
    assert_eq!(n.on_startup(ev("s1", 10), at(2)), StartupOutcome::Duplicate);
    // A startup stored before the provisioned event (a late copy of another boot) is stale.
    assert_eq!(n.on_startup(ev("s1b", 30), at(2)), StartupOutcome::Stale);
    assert_eq!(n.status, NodeStatus::Provisioned);
    // Back in provisioning mode after it: provisioned again.
    assert_eq!(n.on_startup(ev("s2", 60), at(3)), StartupOutcome::Reprovision);
    assert_eq!((n.status, n.next_step, n.attempts), (NodeStatus::Pending, 0, 0));
    assert!(n.is_due(at(3)));
    n.confirmed(ev("p2", 70), at(4));
    assert_eq!(n.times_provisioned, 2);
}

#[test]
fn provisioned_events_from_the_stream_rebuild_the_state() {
    // A fresh state reading the stream from the start: startup, then its provisioned event.
    let mut n = NodeRecord::new("a", at(0));
    assert_eq!(n.on_startup(ev("s1", 10), at(0)), StartupOutcome::New);
    assert_eq!(n.on_provisioned(ev("p1", 50), at(0)), ProvisionedOutcome::Recorded);
    assert_eq!(n.status, NodeStatus::Provisioned);
    assert_eq!(n.on_provisioned(ev("p0", 40), at(0)), ProvisionedOutcome::Duplicate, "older provisioned event");
    // Provisioned by someone else before the startup we know of: stays pending.
    let mut m = NodeRecord::new("b", at(0));
    m.on_startup(ev("s5", 80), at(0));
    assert_eq!(m.on_provisioned(ev("p4", 70), at(0)), ProvisionedOutcome::Superseded);
    assert_eq!(m.status, NodeStatus::Pending);
    assert!(m.is_due(at(0)));
    // A provisioned event with no startup seen (a node provisioned by Choria).
    let mut o = NodeRecord::new("c", at(0));
    assert_eq!(o.on_provisioned(ev("p9", 5), at(0)), ProvisionedOutcome::Recorded);
    assert_eq!(o.on_startup(ev("s8", 3), at(0)), StartupOutcome::Stale);
    // A confirmation without a sequence learns it when the event is read back.
    let mut p = NodeRecord::new("d", at(0));
    p.on_startup(ev("s1", 10), at(0));
    p.confirmed(ev("p1", 0), at(0));
    assert_eq!(p.on_provisioned(ev("p1", 42), at(0)), ProvisionedOutcome::Duplicate);
    assert_eq!(p.provisioned.as_ref().unwrap().sequence, 42);
}

#[test]
fn state_store_writes_record_and_sequence_together() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = StateStore::open(dir.path()).unwrap();
        assert_eq!(s.next_seq().unwrap(), 1);
        s.modify("n1", |r, seq| {
            let r = r.get_or_insert_with(|| NodeRecord::new("n1", at(0)));
            r.on_startup(ev("s1", 1), at(0));
            *seq = Some(8);
        })
        .unwrap();
        // Unchanged records are not rewritten; absent ones not created.
        s.modify("n2", |_, _| ()).unwrap();
        s.flush_blocking().unwrap();
    }
    let s = StateStore::open(dir.path()).unwrap();
    assert_eq!(s.next_seq().unwrap(), 8);
    let all = s.all().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].identity.as_str(), all[0].status), ("n1", NodeStatus::Pending));
    assert!(s.get("n2").unwrap().is_none());
}

// -- The whole provisioner, in process: embedded backbone, local RPC transport. ----------

mod in_process {
    use super::*;
    use chorus_backbone::embedded::EmbeddedBackbone;
    use chorus_platform::{ensure_platform_streams, StreamLimits};
    use chorus_rpc::{agents, Agent, LocalTransport, NodeContext, RpcServer, ServerOptions};
    use chorus_schemas::lifecycle::Startup;
    use chorus_schemas::subject::CHORUS_DEADLETTER;

    struct Site {
        backbone: Arc<dyn Backbone>,
        transport: Arc<LocalTransport>,
        server: RpcServer,
        dir: tempfile::TempDir,
    }

    async fn site() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let backbone: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("streams")).unwrap());
        ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("rpcutil.policy"),
            "policy default deny\nallow\tchoria=provisioner\tping get_fact\t*\t*\n",
        )
        .unwrap();
        let transport = Arc::new(LocalTransport::new());
        let agents: Vec<Arc<dyn Agent>> = vec![Arc::new(agents::RpcUtil)];
        let options = ServerOptions { wildcard_directed: true, ..Default::default() };
        let server = RpcServer::new(transport.clone(), agents, Some(policies), options).unwrap();
        Site { backbone, transport, server, dir }
    }

    impl Site {
        async fn host(&self, identity: &str) {
            let emitter = Arc::new(Emitter::new(Arc::new(BackboneSink(self.backbone.clone())), 1, None));
            self.server.add_node(NodeContext::new(identity, "choria"), emitter, None).await.unwrap();
        }

        async fn startup(&self, identity: &str, component: &str) -> EventRecord {
            let record = EventRecord::new(Startup::new(identity, component, "1.0"), 1);
            self.backbone.publish(to_message(&record).unwrap()).await.unwrap();
            record
        }

        fn config(&self) -> ProvisionerConfig {
            let mut data = JsonObject::new();
            data.insert("fact".into(), "identity".into());
            let mut c = ProvisionerConfig::new(vec![
                Step::new("rpcutil", "ping"),
                Step::new("rpcutil", "get_fact").with_data(data),
            ]);
            c.state_dir = self.dir.path().join("state");
            c.step_timeout = Duration::from_millis(500);
            c.sweep_interval = Duration::from_millis(200);
            c.backoff =
                Backoff { initial: Duration::from_millis(200), max: Duration::from_millis(400), multiplier: 2.0 };
            c.fetch_wait = Duration::from_millis(100);
            c
        }

        async fn start(&self) -> Provisioner {
            Provisioner::start(self.backbone.clone(), self.transport.clone(), self.config(), Shutdown::new())
                .await
                .unwrap()
        }

        /// Lifecycle events of type `provisioned` per identity.
        async fn provisioned_events(&self) -> Vec<EventRecord> {
            let mut out = Vec::new();
            let mut replay =
                self.backbone.replay(CHORUS_LIFECYCLE, chorus_backbone::ReplayOptions::default()).await.unwrap();
            use futures::StreamExt;
            while let Some(m) = replay.next().await {
                // The junk message the test publishes does not decode.
                if let Ok(r) = EventRecord::decode(&m.unwrap().payload) {
                    if matches!(r.data, Event::Lifecycle(Lifecycle::Provisioned(_))) {
                        out.push(r);
                    }
                }
            }
            out
        }
    }

    async fn until<F: Fn(&Provisioner) -> bool>(p: &Provisioner, what: &str, ok: F) {
        chorus_testkit::eventually(what, Duration::from_secs(30), || {
            let result = if ok(p) { Ok(()) } else { Err(format!("{:?}", p.stats())) };
            async move { result }
        })
        .await
    }

    fn status(p: &Provisioner, identity: &str) -> Option<NodeStatus> {
        p.node(identity).unwrap().map(|n| n.status)
    }

    /// `/metrics` and `/healthz` over HTTP: counters and node counts from a provisioner
    /// that provisioned two nodes and failed one, then 503 once it stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_and_health_over_http() {
        let site = site().await;
        for n in ["a.example.net", "b.example.net"] {
            site.host(n).await;
        }
        for n in ["a.example.net", "b.example.net", "late.example.net"] {
            site.startup(n, PROVISION_MODE_COMPONENT).await;
        }
        let mut p = site.start().await;
        until(&p, "a and b provisioned, late failed", |p| {
            p.stats().provisioned == 2 && p.stats().in_flight == 0 && p.stats().failed >= 1
        })
        .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let ops = chorus_runtime::Ops::new().with(Arc::new(p.monitor()));
        let http_stop = Shutdown::new();
        let server = tokio::spawn({
            let stop = http_stop.clone();
            async move { ops.serve(listener, axum::Router::new(), stop).await }
        });
        let client = reqwest::Client::new();
        let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 200);
        let text = metrics.text().await.unwrap();
        for line in [
            "chorus_provisioner_provisioned_total 2",
            "chorus_provisioner_startups_total 3",
            "chorus_provisioner_steps_ok_total 4",
            "chorus_provisioner_in_flight 0",
            "chorus_provisioner_nodes{status=\"provisioned\"} 2",
            "chorus_provisioner_nodes{status=\"failed\"} 1",
            "# TYPE chorus_provisioner_failed_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
        let health = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let body: serde_json::Value = serde_json::from_str(&health.text().await.unwrap()).unwrap();
        let provisioner = &body["services"][0];
        assert_eq!(
            (provisioner["healthy"].as_bool(), provisioner["caught_up"].as_bool()),
            (Some(true), Some(true)),
            "{body}"
        );

        let monitor = p.monitor();
        p.stop().await.unwrap();
        assert_eq!(monitor.health().reason.as_deref(), Some("stopped"));
        let health = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 503);
        http_stop.request();
        server.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provisions_retries_reprovisions_and_dead_letters() {
        let site = site().await;
        for n in ["a.example.net", "b.example.net"] {
            site.host(n).await;
        }
        // A normal server's startup is not read; a malformed message is dead-lettered.
        site.startup("server.example.net", "server").await;
        site.backbone
            .publish(chorus_backbone::Message::new(
                "junk-1",
                "choria.lifecycle.event.startup.provision_mode_server",
                &b"{oops"[..],
            ))
            .await
            .unwrap();
        for n in ["a.example.net", "b.example.net", "late.example.net"] {
            site.startup(n, PROVISION_MODE_COMPONENT).await;
        }
        let mut p = site.start().await;
        until(&p, "a and b provisioned, late failed", |p| {
            status(p, "a.example.net") == Some(NodeStatus::Provisioned)
                && status(p, "b.example.net") == Some(NodeStatus::Provisioned)
                && p.node("late.example.net").unwrap().is_some_and(|n| n.attempts >= 2)
        })
        .await;
        let late = p.node("late.example.net").unwrap().unwrap();
        assert_eq!((late.status, late.next_step), (NodeStatus::Failed, 0));
        assert!(late.last_error.as_deref().unwrap().contains("step 1 (rpcutil#ping): no reply"), "{late:?}");
        assert!(p.node("server.example.net").unwrap().is_none());

        // The late node comes up: the sweep retries it.
        site.host("late.example.net").await;
        // The record turns provisioned before the attempt's flush and its counter bump.
        until(&p, "late provisioned", |p| {
            status(p, "late.example.net") == Some(NodeStatus::Provisioned) && p.stats().in_flight == 0
        })
        .await;
        let s = p.stats();
        assert_eq!((s.provisioned, s.dead_lettered), (3, 1), "{s:?}");
        assert!(s.failed >= 2 && s.retries >= 2, "{s:?}");

        // b restarts in provisioning mode after it was provisioned: provisioned again; a's
        // startup stored again under another message id is a duplicate.
        let events = site.provisioned_events().await;
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|e| matches!(&e.data, Event::Lifecycle(l) if l.component() == "provisioner")));
        let mut replay = site.backbone.replay(CHORUS_LIFECYCLE, Default::default()).await.unwrap();
        use futures::StreamExt;
        let mut original = None;
        while let Some(m) = replay.next().await {
            let m = m.unwrap();
            if let Ok(r) = EventRecord::decode(&m.payload) {
                if r.subject == "a.example.net" && matches!(r.data, Event::Lifecycle(Lifecycle::Startup(_))) {
                    original = Some(m);
                }
            }
        }
        let original = original.unwrap();
        site.backbone
            .publish(chorus_backbone::Message::new("copy-of-a", original.subject.clone(), original.payload.clone()))
            .await
            .unwrap();
        site.startup("b.example.net", PROVISION_MODE_COMPONENT).await;
        until(&p, "b provisioned twice and a's copy skipped", |p| {
            p.node("b.example.net").unwrap().is_some_and(|n| n.times_provisioned == 2)
                && p.stats().duplicate_startups >= 1
        })
        .await;
        p.stop().await.unwrap();
        drop(p); // releases the state store for the next provisioner

        let events = site.provisioned_events().await;
        let per_node = |id: &str| events.iter().filter(|e| e.subject == id).count();
        assert_eq!((per_node("a.example.net"), per_node("b.example.net"), per_node("late.example.net")), (1, 2, 1));
        let mut seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        seqs.sort();
        assert_eq!(seqs, vec![1, 2, 3, 4], "the provisioner numbers its events");

        let letters = site.backbone.stream_info(CHORUS_DEADLETTER).await.unwrap().messages;
        assert_eq!(letters, 1);

        // A restart (same state) provisions nothing again, even with the consumer replaying
        // the whole stream; its events continue the sequence.
        site.backbone.delete_consumer(CHORUS_LIFECYCLE, "provisioner").await.unwrap();
        let mut p = site.start().await;
        until(&p, "the replay read", |p| p.caught_up() && p.stats().provisioned_events >= 4).await;
        site.startup("c.example.net", PROVISION_MODE_COMPONENT).await;
        site.host("c.example.net").await;
        until(&p, "c provisioned", |p| status(p, "c.example.net") == Some(NodeStatus::Provisioned)).await;
        // The node's record is written before the attempt's counters: wait for them to settle.
        until(&p, "the attempt counted", |p| p.stats().in_flight == 0).await;
        let s = p.stats();
        assert_eq!(s.provisioned, 1, "only the new node: {s:?}");
        assert!(s.duplicate_startups >= 4, "{s:?}");
        p.stop().await.unwrap();
        let events = site.provisioned_events().await;
        assert_eq!(events.len(), 5);
        assert_eq!(events.iter().find(|e| e.subject == "c.example.net").unwrap().seq, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fresh_state_rebuilds_from_the_stream_and_provisions_nothing_twice() {
        let site = site().await;
        site.host("a.example.net").await;
        site.startup("a.example.net", PROVISION_MODE_COMPONENT).await;
        let mut p = site.start().await;
        until(&p, "a provisioned", |p| status(p, "a.example.net") == Some(NodeStatus::Provisioned)).await;
        p.stop().await.unwrap();
        drop(p); // releases the state store for the next provisioner
                 // State lost, consumer gone: the stream says a is provisioned.
        std::fs::remove_dir_all(site.dir.path().join("state")).unwrap();
        site.backbone.delete_consumer(CHORUS_LIFECYCLE, "provisioner").await.unwrap();
        let mut p = site.start().await;
        until(&p, "caught up", |p| p.caught_up() && p.stats().provisioned_events >= 1).await;
        assert_eq!(status(&p, "a.example.net"), Some(NodeStatus::Provisioned));
        assert_eq!(p.stats().provisioned, 0);
        p.stop().await.unwrap();
        assert_eq!(site.provisioned_events().await.len(), 1);
    }
}
