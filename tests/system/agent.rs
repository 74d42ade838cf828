//! The node agent against a real nats-server: lifecycle events arrive; a 60 s broker outage
//! loses no event and keeps per-node order; an autonomous agent's transitions arrive as
//! events; RPC is denied without a policy, allowed by one, and both are recorded.

use chorus_runtime::{Service as _, Shutdown};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_producers::agent::{AgentConfig, NodeAgent};
use chorus_rpc::{NatsTransport, RequestOptions, RpcClient, Target};
use chorus_schemas::lifecycle::Lifecycle;
use chorus_schemas::{Event, EventRecord};
use chorus_testkit::conformance::read_all;
use chorus_testkit::nats::NatsServer;
use chorus_testkit::{eventually, eventually_true};

use crate::issuer::TestIssuer;

pub(crate) async fn site(server: &NatsServer) -> Arc<dyn Backbone> {
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    b
}

fn agent_config(identity: &str, server: &NatsServer, dir: &std::path::Path) -> AgentConfig {
    let mut c = AgentConfig::new(identity, dir.join(identity));
    let mut nats = NatsConfig::new([server.url()]);
    nats.request_timeout = Duration::from_secs(2);
    nats.publish_retry_for = Duration::from_secs(5);
    c.nats = Some(nats);
    c.alive_interval = Duration::from_secs(1);
    c.alive_splay = Some(Duration::ZERO);
    c.version = "1.2.3".into();
    c
}

/// Authenticates the agent's callers with `issuer` and gives the node its own key and
/// credential.
fn secure(cfg: &mut AgentConfig, issuer: &TestIssuer, dir: &std::path::Path) {
    let (key, credential) = issuer.node_files(dir, &cfg.identity);
    cfg.security.issuers = vec![issuer.write_public(dir)];
    cfg.security.key = Some(key);
    cfg.security.credential = Some(credential);
}

/// Every event of `identity` in `streams`, decoded.
async fn events_of(b: &dyn Backbone, streams: &[&str], identity: &str) -> Vec<EventRecord> {
    let mut out = Vec::new();
    for s in streams {
        for m in read_all(b, s).await {
            let r = EventRecord::decode(&m.payload).expect("stored events decode");
            if r.subject == identity {
                out.push(r);
            }
        }
    }
    out
}

pub(crate) async fn wait_for<F: Fn(&[EventRecord]) -> bool>(
    b: &dyn Backbone,
    streams: &[&str],
    identity: &str,
    what: &str,
    ok: F,
) -> Vec<EventRecord> {
    eventually(what, Duration::from_secs(60), || {
        let ok = &ok;
        async move {
            let evs = events_of(b, streams, identity).await;
            if ok(&evs) {
                Ok(evs)
            } else {
                Err(format!("have {} events", evs.len()))
            }
        }
    })
    .await
}

/// The RPC records (requests and replies) of one request in `CHORUS_RPC`.
async fn rpc_records(b: &dyn Backbone, requestid: &str) -> Vec<EventRecord> {
    read_all(b, "CHORUS_RPC")
        .await
        .iter()
        .filter_map(|m| EventRecord::decode(&m.payload).ok())
        .filter(|r| match &r.data {
            Event::RpcRequest(q) => q.requestid == requestid,
            Event::RpcReply(p) => p.requestid == requestid,
            _ => false,
        })
        .collect()
}

pub(crate) fn lifecycle_type(r: &EventRecord) -> Option<&'static str> {
    match &r.data {
        Event::Lifecycle(l) => Some(l.lifecycle_type().as_str()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_arrive_with_component_and_version() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent =
        NodeAgent::start(agent_config("life.example.net", &server, dir.path()), Shutdown::new()).await.unwrap();
    let evs = wait_for(&*b, &["CHORUS_LIFECYCLE"], "life.example.net", "startup and two alive events", |e| {
        e.iter().filter(|r| lifecycle_type(r) == Some("alive")).count() >= 2
    })
    .await;
    assert_eq!(lifecycle_type(&evs[0]), Some("startup"), "startup comes first");
    for r in &evs {
        let Event::Lifecycle(l) = &r.data else { unreachable!() };
        assert_eq!(l.component(), "server");
        assert!(r.nats_subject().unwrap().starts_with("choria.lifecycle.event."));
    }
    if let Event::Lifecycle(Lifecycle::Startup(s)) = &evs[0].data {
        assert_eq!(s.version, "1.2.3");
    }
    agent.stop().await.unwrap();
    // Every stream the node writes to: its events are numbered across them (its
    // registration may come between two lifecycle events).
    let streams = ["CHORUS_LIFECYCLE", "CHORUS_REGISTRATION"];
    let mut evs = wait_for(&*b, &streams, "life.example.net", "shutdown event", |e| {
        e.iter().any(|r| lifecycle_type(r) == Some("shutdown"))
    })
    .await;
    evs.sort_by_key(|r| r.seq);
    assert_eq!(lifecycle_type(evs.last().unwrap()), Some("shutdown"));
    let seqs: Vec<u64> = evs.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "per-node sequence has no gap: {seqs:?}");
}

const CYCLE_MACHINE: &str = r#"
name: cycle
version: "1.0.0"
initial_state: "off"
transitions:
  - {name: turn_on, from: ["off"], destination: "on"}
  - {name: turn_off, from: ["on"], destination: "off"}
watchers:
  - name: check
    type: exec
    state_match: ["off"]
    success_transition: turn_on
    interval: 1s
    properties: {command: "true"}
  - name: hold
    type: timer
    state_match: ["on"]
    fail_transition: turn_off
    properties: {timer: 1s}
"#;

/// The broker is stopped for 60 s while the node keeps producing (alive events every second,
/// a machine cycling states); after the restart every event arrives, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_60s_loses_no_event_and_keeps_order() {
    let mut server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines");
    std::fs::create_dir_all(machines.join("cycle")).unwrap();
    std::fs::write(machines.join("cycle/machine.yaml"), CYCLE_MACHINE).unwrap();
    let mut cfg = agent_config("outage.example.net", &server, dir.path());
    cfg.machines_dir = Some(machines);
    cfg.shutdown_drain = Duration::from_secs(60);
    let mut agent = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();
    // Every stream the node writes to: its events are numbered across them.
    let streams = ["CHORUS_LIFECYCLE", "CHORUS_MACHINE", "CHORUS_REGISTRATION"];
    wait_for(&*b, &streams, "outage.example.net", "a transition before the outage", |e| {
        e.iter().any(|r| matches!(r.data, Event::Transition(_)))
    })
    .await;

    server.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let backlog = agent.outbox().stats().backlog();
    assert!(backlog >= 60, "the node kept producing into its outbox during the outage: {backlog}");
    server.restart().unwrap();

    eventually("the outbox to drain", Duration::from_secs(90), || {
        let backlog = agent.outbox().stats().backlog();
        let result = if backlog > 0 { Err(format!("outbox did not drain: {backlog}")) } else { Ok(()) };
        async move { result }
    })
    .await;
    agent.stop().await.unwrap();
    let b = site(&server).await;
    let evs = wait_for(&*b, &streams, "outage.example.net", "the shutdown event", |e| {
        e.iter().any(|r| lifecycle_type(r) == Some("shutdown"))
    })
    .await;

    let ids: BTreeSet<&str> = evs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), evs.len(), "no event stored twice");
    let mut seqs: Vec<u64> = evs.iter().map(|r| r.seq).collect();
    seqs.sort();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "every event of the node arrived (sequences 1..=n, no gap)");
    for s in streams {
        let in_stream: Vec<u64> = events_of(&*b, &[s], "outage.example.net").await.iter().map(|r| r.seq).collect();
        assert!(in_stream.windows(2).all(|w| w[0] < w[1]), "{s}: per-node order kept");
    }
    let transitions = evs.iter().filter(|r| matches!(r.data, Event::Transition(_))).count();
    let watcher_states = evs.iter().filter(|r| matches!(r.data, Event::Watcher(_))).count();
    let alive = evs.iter().filter(|r| lifecycle_type(r) == Some("alive")).count();
    assert!(transitions >= 10, "the machine kept cycling through the outage: {transitions} transitions");
    assert!(watcher_states >= 20, "watcher states recorded: {watcher_states}");
    assert!(alive >= 55, "alive events recorded through the outage: {alive}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_is_denied_without_policy_allowed_with_one_and_recorded() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new();
    let mut cfg = agent_config("nopolicy.example.net", &server, dir.path());
    secure(&mut cfg, &issuer, dir.path());
    let mut open = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("rpcutil.policy"), "policy default deny\nallow\tchoria=tester\tping\t*\t*\n").unwrap();
    let mut cfg = agent_config("policy.example.net", &server, dir.path());
    cfg.policy_dir = Some(policies);
    secure(&mut cfg, &issuer, dir.path());
    let mut guarded = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();

    let client = async_nats::connect(server.url()).await.unwrap();
    let rpc = RpcClient::signed(
        Arc::new(NatsTransport::new(client)),
        issuer.client("choria=tester", &["rpcutil.*"]),
        "choria",
    )
    .with_trust(issuer.issuers())
    .with_senderid("client.example.net");
    let options = RequestOptions {
        expected: Some(2),
        timeout: Duration::from_secs(10),
        target: Target::Broadcast,
        ..Default::default()
    };
    let results = rpc.call("rpcutil", "ping", Default::default(), options).await.unwrap();
    assert_eq!(results.summary.replies, 2, "{:?}", results.summary);
    assert_eq!(results.summary.ok, 1);
    assert_eq!(results.summary.denied, 1);
    let denied = results.replies.iter().find(|r| !r.authorized).unwrap();
    assert_eq!(denied.identity, "nopolicy.example.net");
    let allowed = results.replies.iter().find(|r| r.authorized).unwrap();
    assert_eq!(allowed.identity, "policy.example.net");

    // Both decisions are recorded by the nodes: the request and the reply, in CHORUS_RPC.
    let replies = eventually("both requests and replies in CHORUS_RPC", Duration::from_secs(30), || {
        let (b, requestid) = (&*b, &results.request.requestid);
        async move {
            let records = rpc_records(b, requestid).await;
            let replies: Vec<(String, bool)> = records
                .iter()
                .filter_map(|r| match &r.data {
                    Event::RpcReply(p) => Some((p.identity.clone(), p.authorized)),
                    _ => None,
                })
                .collect();
            let requests = records.iter().filter(|r| matches!(r.data, Event::RpcRequest(_))).count();
            if requests == 2 && replies.len() == 2 {
                Ok(replies)
            } else {
                Err(format!("RPC records missing: {requests} requests, {replies:?}"))
            }
        }
    })
    .await;
    assert!(replies.contains(&("nopolicy.example.net".into(), false)), "{replies:?}");
    assert!(replies.contains(&("policy.example.net".into(), true)), "{replies:?}");
    open.stop().await.unwrap();
    guarded.stop().await.unwrap();
}

/// 1,000 simulated nodes in one process answer one broadcast over a single connection, and
/// each records the request and reply with its own sequence after its startup event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_nodes_answer_rpc_and_record_it() {
    use chorus_platform::BackboneSink;
    use chorus_producers::simulator::{SimConfig, Simulator};
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rpcutil.policy"), "policy default deny\nallow\t*\tping\t*\t*\n").unwrap();
    let sim = Simulator::new(SimConfig::new(1000), Arc::new(BackboneSink(b.clone()))).unwrap();
    sim.startup_storm().await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let _rpc = sim
        .host_rpc(Arc::new(NatsTransport::new(client.clone())), "choria", Some(dir.path().to_path_buf()), None)
        .await
        .unwrap();
    let rpc = RpcClient::new(Arc::new(NatsTransport::new(client)), "choria=tester", "choria");
    let options = RequestOptions { expected: Some(1000), timeout: Duration::from_secs(30), ..Default::default() };
    let results = rpc.call("rpcutil", "ping", Default::default(), options).await.unwrap();
    assert_eq!((results.summary.replies, results.summary.ok), (1000, 1000), "{:?}", results.summary);
    let node = sim.nodes()[7].identity.to_string();
    // The reply record carries the node's identity; the request record the sender's (as in
    // Choria's audit), so the node's own records are startup (1), request (2), reply (3).
    let evs =
        wait_for(&*b, &["CHORUS_LIFECYCLE", "CHORUS_RPC"], &node, "the node's reply record", |e| e.len() >= 2).await;
    let seqs: Vec<u64> = evs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 3], "startup then reply, one per-node sequence");
    eventually("all 2000 RPC records stored", Duration::from_secs(30), || {
        let (b, requestid) = (&*b, &results.request.requestid);
        async move {
            let n = rpc_records(b, requestid).await.len();
            if n == 2000 {
                Ok(())
            } else {
                Err(format!("{n} of 2000 RPC records stored"))
            }
        }
    })
    .await;
}

/// An external agent written in Python (Choria's external-agent protocol) answers through
/// `chorus rpc`: inputs typed and defaulted by its DDL on the client, run with the node's
/// facts, outputs returned; input its DDL rejects never reaches the node; a request that
/// skips the client's check is refused by the node before the program runs; a program that
/// fails says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_python_agent_answers_through_chorus_rpc() {
    let server = NatsServer::start().unwrap();
    let _site = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents");
    std::fs::create_dir_all(&agents).unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("system/data/parrot");
    for file in ["parrot", "parrot.json"] {
        std::fs::copy(data.join(file), agents.join(file)).unwrap();
    }
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("parrot.policy"), "policy default allow\n").unwrap();
    let mut cfg = agent_config("parrot.example.net", &server, dir.path());
    cfg.agents_dir = Some(agents.clone());
    cfg.policy_dir = Some(policies);
    cfg.facts.insert("country".into(), "uk".into());
    let mut agent = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();

    let url = server.url();
    let ddl = agents.join("parrot.json").display().to_string();
    let rpc = |action: &str, inputs: &[&str]| {
        let mut args = vec!["rpc", "parrot", action, "-I", "parrot.example.net", "--nats", &url, "--ddl", &ddl];
        args.extend(inputs);
        args.extend(["--timeout", "20s", "--json"]);
        crate::cli::chorus(&args)
    };
    let (ok, out) = rpc("echo", &["message=hi", "repeat=3"]);
    assert!(ok, "{out}");
    let reply: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(reply["data"], serde_json::json!({"message": "hi hi hi", "length": 8, "country": "uk"}), "{out}");
    // The DDL's default fills in repeat on the client.
    let (ok, out) = rpc("echo", &["message=123"]);
    assert!(ok && out.contains(r#""message":"123""#), "a string input stays a string: {out}");

    let (ok, out) = rpc("echo", &["message=a;b"]);
    assert!(!ok && out.contains("may not contain ';'") && out.contains("nothing was sent"), "{out}");

    // A client that does not check: the node does, before the program runs.
    let client = async_nats::connect(server.url()).await.unwrap();
    let unchecked = RpcClient::new(Arc::new(NatsTransport::new(client)), "choria=tester", "choria");
    let options = RequestOptions {
        target: Target::Node("parrot.example.net".into()),
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let data = serde_json::json!({"message": 5}).as_object().unwrap().clone();
    let results = unchecked.call("parrot", "echo", data, options.clone()).await.unwrap();
    let refused = &results.replies[0];
    assert_eq!(refused.statuscode, chorus_schemas::StatusCode::InvalidData, "{refused:?}");
    assert!(refused.statusmsg.contains("Validation failed") && refused.statusmsg.contains("is not a string"));

    let results = unchecked.call("parrot", "fail", Default::default(), options).await.unwrap();
    let failed = &results.replies[0];
    assert_eq!(failed.statuscode, chorus_schemas::StatusCode::Aborted, "{failed:?}");
    assert!(
        failed.statusmsg.contains("Could not call external agent parrot#fail")
            && failed.statusmsg.contains("exit status 3")
    );
    agent.stop().await.unwrap();
}

/// A node registers its facts (inline, from a file and from a command), classes and agents
/// after its splay, and again as soon as its fact file changes, when its RPC server already
/// filters on the new facts; a fact file it cannot read turns its health failing with the
/// reason until it can, and the last good facts stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_registers_its_facts_and_again_when_they_change() {
    use chorus_producers::registration::RegistrationConfig;
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let facts = dir.path().join("facts.yaml");
    std::fs::write(&facts, "country: uk\nrole: web\n").unwrap();
    let identity = "facts.example.net";
    let mut cfg = agent_config(identity, &server, dir.path());
    cfg.facts.insert("rack".into(), "r1".into());
    cfg.facts.insert("country".into(), "overridden".into());
    cfg.facts_file = Some(facts.clone());
    cfg.facts_command = Some(vec!["sh".into(), "-c".into(), r#"echo '{"cpus": 8}'"#.into()]);
    cfg.classes = vec!["role::web".into()];
    cfg.registration = RegistrationConfig {
        enabled: true,
        interval: Duration::from_secs(3600),
        splay: Duration::ZERO,
        check_interval: Duration::from_millis(200),
    };
    let mut agent = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();
    let registrations = |evs: &[EventRecord]| -> Vec<chorus_schemas::Registration> {
        evs.iter()
            .filter_map(|r| match &r.data {
                Event::Registration(g) => Some(g.clone()),
                _ => None,
            })
            .collect()
    };
    let streams = ["CHORUS_REGISTRATION"];
    let evs = wait_for(&*b, &streams, identity, "a registration", |e| !registrations(e).is_empty()).await;
    let first = &registrations(&evs)[0].content;
    assert_eq!(first.facts["country"], "uk", "the file's facts win over inline ones");
    assert_eq!((&first.facts["rack"], &first.facts["cpus"]), (&"r1".into(), &8.into()));
    assert_eq!(first.classes, ["role::web"]);
    assert_eq!(first.collectives, ["choria"]);
    assert_eq!(first.build_info.version, "1.2.3");
    assert!(first.agents.iter().any(|a| a.name == "rpcutil" && !a.version.is_empty()), "{:?}", first.agents);

    std::fs::write(&facts, "country: ie\nrole: web\n").unwrap();
    wait_for(&*b, &streams, identity, "a registration with the new facts", |e| {
        registrations(e).iter().any(|r| r.content.facts["country"] == "ie")
    })
    .await;
    let ctx = agent.rpc().unwrap().node("choria", identity).unwrap();
    assert_eq!(ctx.facts["country"], "ie", "requests filter on the facts the node registered");

    std::fs::write(&facts, "[this is not an object").unwrap();
    eventually("health to show the unreadable fact file", Duration::from_secs(30), || {
        let health = agent.health();
        let result = match &health.reason {
            Some(reason) if !health.healthy && reason.contains("fact file") => Ok(()),
            _ => Err(format!("{health:?}")),
        };
        async move { result }
    })
    .await;
    assert_eq!(agent.rpc().unwrap().node("choria", identity).unwrap().facts["country"], "ie", "last good facts kept");
    std::fs::write(&facts, "country: ie\n").unwrap();
    eventually("health to recover", Duration::from_secs(30), || {
        let health = agent.health();
        let result = if health.healthy { Ok(()) } else { Err(format!("{health:?}")) };
        async move { result }
    })
    .await;
    agent.stop().await.unwrap();
}

/// External agents follow their directory while the node runs: one copied in answers
/// (and the node registers again with it), one removed is an unknown agent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_agents_are_loaded_and_unloaded_while_the_node_runs() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let agents = dir.path().join("agents");
    std::fs::create_dir_all(&agents).unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("parrot.policy"), "policy default allow\n").unwrap();
    let identity = "reload.example.net";
    let mut cfg = agent_config(identity, &server, dir.path());
    cfg.agents_dir = Some(agents.clone());
    cfg.agents_reload_interval = Duration::from_millis(200);
    cfg.policy_dir = Some(policies);
    cfg.registration.splay = Duration::ZERO;
    cfg.registration.check_interval = Duration::from_millis(200);
    let mut agent = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();
    assert!(!agent.rpc().unwrap().agents().contains(&"parrot".to_string()));

    let client = async_nats::connect(server.url()).await.unwrap();
    let rpc = RpcClient::new(Arc::new(NatsTransport::new(client)), "choria=tester", "choria");
    let echo = || {
        let rpc = rpc.clone();
        async move {
            let options = RequestOptions {
                target: Target::Node(identity.into()),
                timeout: Duration::from_secs(20),
                ..Default::default()
            };
            let data = serde_json::json!({"message": "hi", "repeat": 1}).as_object().unwrap().clone();
            rpc.call("parrot", "echo", data, options).await.unwrap().replies.into_iter().next().unwrap()
        }
    };
    let before = echo().await;
    assert_eq!(before.statuscode, chorus_schemas::StatusCode::UnknownAction, "{before:?}");

    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("system/data/parrot");
    for file in ["parrot", "parrot.json"] {
        std::fs::copy(data.join(file), agents.join(file)).unwrap();
    }
    eventually("the parrot agent to answer", Duration::from_secs(30), || {
        let echo = echo();
        async move {
            let reply = echo.await;
            if reply.statuscode == chorus_schemas::StatusCode::Ok {
                Ok(())
            } else {
                Err(format!("{reply:?}"))
            }
        }
    })
    .await;
    wait_for(&*b, &["CHORUS_REGISTRATION"], identity, "a registration naming parrot", |evs| {
        evs.iter().any(|r| match &r.data {
            Event::Registration(g) => g.content.agents.iter().any(|a| a.name == "parrot"),
            _ => false,
        })
    })
    .await;

    std::fs::remove_file(agents.join("parrot.json")).unwrap();
    eventually("the parrot agent to be gone", Duration::from_secs(30), || {
        let echo = echo();
        async move {
            let reply = echo.await;
            if reply.statusmsg.contains("Unknown agent parrot") {
                Ok(())
            } else {
                Err(format!("{reply:?}"))
            }
        }
    })
    .await;
    agent.stop().await.unwrap();
}

/// An agent started while its broker is down, stopped with SIGTERM at once, exits cleanly
/// with its startup and shutdown events kept in its outbox; started again once the broker is
/// back, it delivers them first, in order, before its new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_with_its_broker_down_stops_on_sigterm_and_delivers_later() {
    use std::process::{Command, Stdio};
    let mut server = NatsServer::start().unwrap();
    let b = site(&server).await;
    tokio::task::block_in_place(|| server.stop()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "identity: down1.example.net\nstate_dir: {}\nnats: {{servers: [{}], request_timeout: 2s}}\n\
             alive_interval: 1h\nshutdown_drain: 2s\n",
            dir.path().join("state").display(),
            server.url()
        ),
    )
    .unwrap();
    let run_agent = || {
        Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
            .args(["agent", "--config", config.to_str().unwrap()])
            .env("CHORUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let stop = |mut agent: std::process::Child| {
        let (lines, _reader) = chorus_testkit::child::whole_lines(agent.stderr.take().unwrap());
        // Up to "running" (or at once: a signal before it must stop the agent as cleanly).
        lines.recv_timeout(Duration::from_secs(30)).ok();
        assert!(Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap().success());
        let exit =
            chorus_testkit::eventually_blocking("the agent to stop after SIGTERM", Duration::from_secs(30), || {
                agent.try_wait().unwrap().ok_or_else(|| "still running".to_string())
            });
        assert!(exit.success(), "the agent exited with {exit}");
    };
    stop(run_agent());

    tokio::task::block_in_place(|| server.restart()).unwrap();
    let agent = run_agent();
    let events = wait_for(&*b, &["CHORUS_LIFECYCLE"], "down1.example.net", "both runs' startups", |evs| {
        evs.iter().filter(|e| lifecycle_type(e) == Some("startup")).count() == 2
    })
    .await;
    stop(agent);
    let events = wait_for(&*b, &["CHORUS_LIFECYCLE"], "down1.example.net", "the second shutdown", |evs| {
        evs.len() > events.len() && evs.iter().filter(|e| lifecycle_type(e) == Some("shutdown")).count() == 2
    })
    .await;
    let kinds: Vec<_> = events.iter().filter_map(lifecycle_type).collect();
    assert_eq!(kinds, vec!["startup", "shutdown", "startup", "shutdown"], "in order, each once");
    // The node's own sequence has no gap (its registrations are numbered with the rest).
    let mut seqs: Vec<u64> = events_of(&*b, &["CHORUS_LIFECYCLE", "CHORUS_REGISTRATION"], "down1.example.net")
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap in the node's sequence");
}

/// The disk under a running agent's state directory fills up: its events are refused (never
/// acknowledged unstored) and its health says why; once the disk is freed the very next event
/// is stored, without a restart, and every event from then on reaches the site once, in
/// order. Twice: a healed store heals again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_and_freed_under_a_running_agent_heals_without_a_restart() {
    use std::sync::atomic::Ordering;
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let disk = chorus_testkit::disk::SmallDisk::mount(32 << 20).expect("a tmpfs for the agent's state");
    let mut agent =
        NodeAgent::start(agent_config("full.example.net", &server, disk.path()), Shutdown::new()).await.unwrap();
    let streams = ["CHORUS_LIFECYCLE", "CHORUS_REGISTRATION"];
    wait_for(&*b, &streams, "full.example.net", "the startup", |e| {
        e.iter().any(|r| lifecycle_type(r) == Some("startup"))
    })
    .await;
    let lifecycle = agent.lifecycle().clone();
    let mut markers = Vec::new();
    for fault in ["first", "second"] {
        let filler = tokio::task::block_in_place(|| disk.fill()).unwrap();
        // Events go on being stored while the store's files have room already allocated;
        // the first that needs a new block is refused, not claimed stored.
        let mut produced = 0;
        while lifecycle.alive(Duration::from_secs(1)).await.is_ok() {
            produced += 1;
            assert!(produced < 100_000, "{fault}: the full disk never refused an event");
        }
        eprintln!("{fault} fault: {produced} events stored on the full disk before one was refused");
        let health = agent.health();
        assert!(
            !health.healthy && health.reason.as_deref().is_some_and(|r| r.contains("cannot store events")),
            "{fault}: {health:?}"
        );
        assert!(lifecycle.alive(Duration::from_secs(1)).await.is_err(), "{fault}: an event claimed stored");
        assert!(agent.outbox().stats().refused_by_storage.load(Ordering::Relaxed) > 0);

        disk.free(&filler).unwrap();
        // The first event after the repair is stored: no restart, no waiting for a retry.
        let marker = lifecycle.alive(Duration::from_secs(1)).await.expect("stored once the disk is repaired");
        markers.push(marker.seq);
        eventually_true("health to recover", Duration::from_secs(30), || agent.health().healthy).await;
    }
    // A few more events on the healed store, then the shutdown event.
    let last = markers[1];
    wait_for(&*b, &streams, "full.example.net", "events after the repair", |e| e.iter().any(|r| r.seq > last + 2))
        .await;
    agent.stop().await.unwrap();
    let events = wait_for(&*b, &streams, "full.example.net", "the shutdown", |e| {
        e.iter().any(|r| lifecycle_type(r) == Some("shutdown"))
    })
    .await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "an event reached the site twice");
    let newest = *unique.last().unwrap();
    let missing: Vec<u64> = (markers[1]..=newest).filter(|s| !unique.contains(s)).collect();
    assert!(missing.is_empty(), "events produced after the repair lost: {missing:?}");
    // What is missing was refused to its producer (an event refused mid-write may still have
    // reached the disk and be delivered: refused never means stored-and-claimed-lost).
    let refused = agent.outbox().stats().refused_by_storage.load(Ordering::Relaxed);
    let lost = (1..=newest).filter(|s| !unique.contains(s)).count() as u64;
    assert!(lost <= refused, "{lost} events lost but only {refused} refused");
    assert_eq!(agent.outbox().storage_faults(), 2);
}

/// An agent started on a broker without the platform streams runs, its health says within
/// 5 s what to run, and once the streams exist it is healthy and its startup event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_its_streams_exist_says_what_to_run_then_delivers() {
    let server = NatsServer::start().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut agent =
        NodeAgent::start(agent_config("early.example.net", &server, dir.path()), Shutdown::new()).await.unwrap();
    eventually("health to say the streams are missing", Duration::from_secs(5), || {
        let health = agent.health();
        let result = match &health.reason {
            Some(r) if !health.healthy && r.contains("chorus streams create") => Ok(()),
            _ => Err(format!("{health:?}")),
        };
        async move { result }
    })
    .await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    wait_for(&*b, &["CHORUS_LIFECYCLE"], "early.example.net", "the startup", |e| {
        e.iter().any(|r| lifecycle_type(r) == Some("startup"))
    })
    .await;
    eventually_true("health to recover", Duration::from_secs(30), || agent.health().healthy).await;
    agent.stop().await.unwrap();
}

/// Scout on a node agent: a `nagios` check machine as Choria writes it runs its plugin and
/// moves to CRITICAL; the `scout` agent puts it in maintenance, where a forced check is
/// refused, and resumes it; every answer comes over RPC, as `chorus scout` sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scout_checks_run_on_the_node_and_answer_the_scout_agent() {
    let server = NatsServer::start().unwrap();
    let _b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new();
    let machine = dir.path().join("machines").join("check_disk");
    std::fs::create_dir_all(&machine).unwrap();
    std::fs::write(
        machine.join("machine.yaml"),
        "name: check_disk\nversion: 1.0.0\ninitial_state: UNKNOWN\ntransitions:\n  - {name: OK, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: OK}\n  - {name: WARNING, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: WARNING}\n  - {name: CRITICAL, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: CRITICAL}\n  - {name: UNKNOWN, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: UNKNOWN}\n  - {name: FORCE_CHECK, from: [UNKNOWN, OK, WARNING, CRITICAL], destination: FORCE_CHECK}\n  - {name: MAINTENANCE, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: MAINTENANCE}\n  - {name: RESUME, from: [MAINTENANCE], destination: UNKNOWN}\nwatchers:\n  - name: check\n    type: nagios\n    state_match: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK]\n    interval: 1h\n    properties: {plugin: \"sh -c 'echo DISK CRITICAL; exit 2'\"}\n",
    )
    .unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("scout.policy"), "policy default deny\nallow\tchoria=ops\t*\t*\t*\n").unwrap();
    let mut cfg = agent_config("scout.example.net", &server, dir.path());
    cfg.machines_dir = Some(dir.path().join("machines"));
    cfg.policy_dir = Some(policies);
    secure(&mut cfg, &issuer, dir.path());
    let mut agent = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();
    let a = &agent;
    eventually("the check CRITICAL", Duration::from_secs(30), || async move {
        let s = a.machines()[0].state();
        if s == "CRITICAL" {
            Ok(())
        } else {
            Err(s)
        }
    })
    .await;

    let client = async_nats::connect(server.url()).await.unwrap();
    let rpc =
        RpcClient::signed(Arc::new(NatsTransport::new(client)), issuer.client("choria=ops", &["scout.*"]), "choria")
            .with_trust(issuer.issuers());
    let call = |action: &'static str, data: serde_json::Value| {
        let rpc = rpc.clone();
        async move {
            let options = RequestOptions {
                target: Target::Node("scout.example.net".into()),
                timeout: Duration::from_secs(10),
                ..Default::default()
            };
            let results =
                rpc.call("scout", action, data.as_object().cloned().unwrap_or_default(), options).await.unwrap();
            assert_eq!(results.replies.len(), 1, "{results:?}");
            results.replies[0].data.clone()
        }
    };
    let status = call("checks", serde_json::json!({})).await;
    assert_eq!(status["checks"][0]["state"], "CRITICAL");
    let r = call("maintenance", serde_json::json!({"checks": ["check_disk"]})).await;
    assert_eq!(r["transitioned"], serde_json::json!(["check_disk"]));
    let r = call("trigger", serde_json::json!({})).await;
    assert_eq!(r["failed"], serde_json::json!(["check_disk"]), "no forced check in maintenance");
    let r = call("resume", serde_json::json!({})).await;
    assert_eq!(r["transitioned"], serde_json::json!(["check_disk"]));
    // Back from maintenance the check runs again: CRITICAL.
    eventually("the check CRITICAL again", Duration::from_secs(30), || async move {
        let s = a.machines()[0].state();
        if s == "CRITICAL" {
            Ok(())
        } else {
            Err(s)
        }
    })
    .await;
    agent.stop().await.unwrap();
}

/// The exec watcher's `governor:` on two nodes: their commands never run at once under a
/// governor of capacity 1, and each run is an `enter` and an `exit` governor event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_watchers_under_a_governor_take_turns_across_nodes() {
    use chorus_platform::governor::{Governor, GovernorSpec};
    use chorus_schemas::lifecycle::GovernorEventType;
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    Governor::add(&*b, "upgrades", GovernorSpec { capacity: 1, expires: Duration::from_secs(30) }).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("held.log");
    let mut agents = Vec::new();
    for node in ["g1.example.net", "g2.example.net"] {
        let machine = dir.path().join(node).join("machines").join("upgrade");
        std::fs::create_dir_all(&machine).unwrap();
        std::fs::write(
            machine.join("machine.yaml"),
            format!(
                "name: upgrade\nversion: 1.0.0\ninitial_state: run\ntransitions:\n  - {{name: again, from: [run], destination: run}}\nwatchers:\n  - name: upgrade\n    type: exec\n    state_match: [run]\n    interval: 500ms\n    properties:\n      command: \"echo + {node} >> {log}; sleep 0.1; echo - {node} >> {log}\"\n      governor: upgrades\n      governor_timeout: 1m\n",
                log = log.display()
            ),
        )
        .unwrap();
        let mut cfg = agent_config(node, &server, dir.path());
        cfg.machines_dir = Some(dir.path().join(node).join("machines"));
        agents.push(NodeAgent::start(cfg, Shutdown::new()).await.unwrap());
    }
    let l = &log;
    eventually("both nodes ran the command three times", Duration::from_secs(60), || async move {
        let text = std::fs::read_to_string(l).unwrap_or_default();
        let done = |n: &str| text.lines().filter(|x| x.starts_with('-') && x.ends_with(n)).count();
        if done("g1.example.net") >= 3 && done("g2.example.net") >= 3 {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    for a in &mut agents {
        a.stop().await.unwrap();
    }
    let (mut held, mut most) = (0i32, 0i32);
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        held += if line.starts_with('+') { 1 } else { -1 };
        most = most.max(held);
    }
    assert_eq!(most, 1, "the two nodes ran the command at once under a governor of capacity 1");
    let events = events_of(&*b, &["CHORUS_LIFECYCLE"], "g1.example.net").await;
    let kinds: Vec<GovernorEventType> = events
        .iter()
        .filter_map(|r| match &r.data {
            Event::Lifecycle(Lifecycle::Governor(g)) => Some(g.event_type),
            _ => None,
        })
        .collect();
    assert!(kinds.contains(&GovernorEventType::Enter) && kinds.contains(&GovernorEventType::Exit), "{kinds:?}");
}
