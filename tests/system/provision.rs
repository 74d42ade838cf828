//! The provisioner against a real nats-server: a startup storm of 1,000 simulated nodes in
//! provisioning mode, hosting RPC over one connection, ends with every node provisioned
//! exactly once: one successful request per node and step (counted from the RPC records the
//! nodes store in `CHORUS_RPC`) and one `provisioned` event per node in `CHORUS_LIFECYCLE`,
//! across a restart of the provisioner in the middle, a full replay of the stream, copies of
//! every startup event stored again, and 100 nodes that refuse the provisioner until they are
//! fixed.

use chorus_runtime::{Service as _, Shutdown};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, Message};
use chorus_consumers::provisioner::{NodeStatus, Provisioner, ProvisionerConfig, Step};
use chorus_platform::deadletter::DeadLetter;
use chorus_platform::BackboneSink;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_rpc::{agents, Agent, NatsTransport, NodeContext, RpcServer, ServerOptions, Transport};
use chorus_runtime::Backoff;
use chorus_schemas::lifecycle::{Alive, Lifecycle};
use chorus_schemas::{Event, EventRecord, StatusCode};
use chorus_testkit::conformance::read_all;
use chorus_testkit::eventually;
use chorus_testkit::nats::NatsServer;

const NODES: usize = 1000;
/// Nodes whose Action Policy refuses the provisioner until they are "fixed".
const BROKEN: Range<usize> = 900..1000;
const CALLERID: &str = "choria=provisioner";
const STARTUP_SUBJECT: &str = "choria.lifecycle.event.startup.provision_mode_server";

async fn site(server: &NatsServer) -> Arc<dyn Backbone> {
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    b
}

fn config(state_dir: std::path::PathBuf) -> ProvisionerConfig {
    let mut fact = serde_json::Map::new();
    fact.insert("fact".into(), "group".into());
    let mut c =
        ProvisionerConfig::new(vec![Step::new("rpcutil", "ping"), Step::new("rpcutil", "get_fact").with_data(fact)]);
    c.state_dir = state_dir;
    c.concurrency = 50;
    c.sweep_interval = Duration::from_millis(500);
    c.backoff = Backoff::doubling(Duration::from_millis(500), Duration::from_secs(2));
    c
}

/// Waits (bounded, so a hang fails instead of blocking CI) until `ok` holds.
async fn until<F: Fn(&Provisioner) -> bool>(p: &Provisioner, what: &str, ok: F) {
    eventually(what, Duration::from_secs(180), || {
        let result = if ok(p) {
            Ok(())
        } else {
            assert!(
                !chorus_runtime::Service::failed(p),
                "the provisioner stopped while waiting for {what}: {:?}",
                p.monitor().health()
            );
            Err(format!("{:?} {:?}", p.stats(), p.counts()))
        };
        async move { result }
    })
    .await
}

/// Stores every provisioning-mode startup event again under a new message id, as a replicator
/// or an outbox re-sending after the dedupe window would: the stream keeps both copies.
async fn store_startups_again(b: &dyn Backbone, tag: &str) -> usize {
    let copies: Vec<Message> = read_all(b, "CHORUS_LIFECYCLE")
        .await
        .into_iter()
        .filter(|m| m.subject == STARTUP_SUBJECT && !m.id.contains("-copy-"))
        .filter(|m| matches!(EventRecord::decode(&m.payload), Ok(r) if matches!(r.data, Event::Lifecycle(Lifecycle::Startup(_)))))
        .map(|m| Message::new(format!("{}-copy-{tag}", m.id), m.subject, m.payload))
        .collect();
    let n = copies.len();
    b.publish_batch(copies).await.unwrap();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_storm_of_1000_nodes_provisions_each_exactly_once() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let (allow, deny) = (dir.path().join("allow"), dir.path().join("deny"));
    std::fs::create_dir_all(&allow).unwrap();
    std::fs::create_dir_all(&deny).unwrap(); // no policy file: every request denied
    std::fs::write(
        allow.join("rpcutil.policy"),
        format!("policy default deny\nallow\t{CALLERID}\tping get_fact\t*\t*\n"),
    )
    .unwrap();

    let mut sim_config = SimConfig::new(NODES);
    sim_config.prefix = "new".into();
    sim_config.component = "provision_mode_server".into();
    let sim = Simulator::new(sim_config, Arc::new(BackboneSink(b.clone()))).unwrap();
    let identity = |i: usize| sim.nodes()[i].identity.to_string();
    let context = |i: usize| NodeContext::new(identity(i), "choria");

    // Every node answers RPC over one connection; the broken ones from a server that denies.
    let client = async_nats::connect(server.url()).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(NatsTransport::new(client));
    let good = sim.host_rpc(transport.clone(), "choria", Some(allow), None).await.unwrap();
    let rpcutil: Vec<Arc<dyn Agent>> = vec![Arc::new(agents::RpcUtil)];
    let options = ServerOptions { wildcard_directed: true, ..Default::default() };
    let broken = RpcServer::new(transport.clone(), rpcutil, Some(deny), options).unwrap();
    for i in BROKEN {
        assert!(good.remove_node("choria", &identity(i)));
        broken.add_node(context(i), sim.nodes()[i].emitter.clone(), None).await.unwrap();
    }

    // Two malformed messages where the provisioner reads, then the storm.
    b.publish(Message::new("junk-not-json", STARTUP_SUBJECT, &b"{not json"[..])).await.unwrap();
    let alive = EventRecord::new(Alive::new("odd.example.net", "provision_mode_server", "1.0", None), 1);
    b.publish(Message::new(alive.id.clone(), STARTUP_SUBJECT, alive.encode())).await.unwrap();
    let storm = sim.startup_storm().await.unwrap();
    assert_eq!(storm.events, NODES);

    // First provisioner, stopped in the middle of the work.
    let state = dir.path().join("state");
    let mut p1 =
        Provisioner::start(b.clone(), transport.clone(), config(state.clone()), Shutdown::new()).await.unwrap();
    until(&p1, "300 nodes provisioned", |p| p.stats().provisioned >= 300).await;
    let counters = p1.stats_handle();
    p1.stop().await.unwrap();
    drop(p1); // releases the state store for the next provisioner
    let first = counters.snapshot(); // including the attempts that finished while stopping
    assert_eq!(first.dead_lettered, 2, "{first:?}");

    // Every startup stored a second time, and the durable consumer removed: the restarted
    // provisioner replays the whole stream (originals, copies, the first one's events).
    assert_eq!(store_startups_again(&*b, "1").await, NODES);
    b.delete_consumer("CHORUS_LIFECYCLE", "provisioner").await.unwrap();
    let mut p2 =
        Provisioner::start(b.clone(), transport.clone(), config(state.clone()), Shutdown::new()).await.unwrap();
    until(&p2, "every broken node failed at least once", |p| {
        BROKEN
            .clone()
            .all(|i| p.node(&identity(i)).unwrap().is_some_and(|n| n.status == NodeStatus::Failed && n.attempts >= 1))
    })
    .await;
    let failed = p2.node(&identity(BROKEN.start)).unwrap().unwrap();
    assert!(failed.last_error.as_deref().unwrap_or("").contains("step 1 (rpcutil#ping): denied"), "{failed:?}");

    // The broken nodes are fixed: the sweep retries them.
    for i in BROKEN {
        assert!(broken.remove_node("choria", &identity(i)));
        good.add_node(context(i), sim.nodes()[i].emitter.clone(), None).await.unwrap();
    }
    until(&p2, "all nodes provisioned", |p| p.counts().unwrap().provisioned == NODES as u64).await;

    // Another copy of every startup while it runs: all recognised as duplicates.
    let before = p2.stats().duplicate_startups;
    assert_eq!(store_startups_again(&*b, "2").await, NODES);
    until(&p2, "the second copies read", |p| p.stats().duplicate_startups >= before + NODES as u64).await;
    let second = p2.stats();
    assert_eq!(second.in_flight, 0, "{second:?}");
    assert_eq!(first.provisioned + second.provisioned, NODES as u64, "{first:?} {second:?}");
    assert!(second.retries >= BROKEN.len() as u64, "{second:?}");
    assert_eq!(second.reprovisions, 0, "{second:?}");
    // It read every original startup, the first copies and the second copies, all duplicates.
    assert!(second.startups >= 3 * NODES as u64, "{second:?}");
    assert_eq!(second.duplicate_startups, second.startups, "{second:?}");
    p2.stop().await.unwrap();

    // Exactly one provisioned event per node, numbered 1..=1000 by the provisioner.
    let lifecycle: Vec<EventRecord> =
        read_all(&*b, "CHORUS_LIFECYCLE").await.iter().filter_map(|m| EventRecord::decode(&m.payload).ok()).collect();
    let provisioned: Vec<&EventRecord> =
        lifecycle.iter().filter(|r| matches!(r.data, Event::Lifecycle(Lifecycle::Provisioned(_)))).collect();
    assert_eq!(provisioned.len(), NODES);
    let identities: BTreeSet<String> = provisioned.iter().map(|r| r.subject.clone()).collect();
    assert_eq!(identities, (0..NODES).map(identity).collect::<BTreeSet<_>>(), "one per node");
    assert!(provisioned.iter().all(|r| matches!(&r.data, Event::Lifecycle(l) if l.component() == "provisioner")));
    let mut seqs: Vec<u64> = provisioned.iter().map(|r| r.seq).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=NODES as u64).collect::<Vec<_>>(), "one sequence across the restart, no gap");

    // What each node received, from the records the nodes themselves stored.
    let rpc: Vec<EventRecord> =
        read_all(&*b, "CHORUS_RPC").await.iter().filter_map(|m| EventRecord::decode(&m.payload).ok()).collect();
    let requests = rpc.iter().filter(|r| matches!(&r.data, Event::RpcRequest(q) if q.callerid == CALLERID)).count();
    let mut replies: BTreeMap<(String, String, bool), usize> = BTreeMap::new();
    for r in &rpc {
        if let Event::RpcReply(p) = &r.data {
            if p.callerid == CALLERID {
                let ok = p.authorized && p.statuscode == StatusCode::Ok;
                *replies.entry((p.identity.clone(), p.action.clone(), ok)).or_default() += 1;
            }
        }
    }
    let count =
        |i: usize, action: &str, ok: bool| replies.get(&(identity(i), action.to_string(), ok)).copied().unwrap_or(0);
    // On a failure, everything the node recorded, to tell a repeated request from a repeated
    // record of one request.
    let history = |i: usize| -> Vec<String> {
        rpc.iter()
            .filter(|r| r.subject == identity(i))
            .map(|r| match &r.data {
                Event::RpcReply(p) => format!(
                    "reply id={} seq={} time={} request={} {} ok={} {}",
                    r.id,
                    r.seq,
                    r.time,
                    p.requestid,
                    p.action,
                    p.authorized && p.statuscode == StatusCode::Ok,
                    p.statusmsg
                ),
                Event::RpcRequest(q) => {
                    format!("request id={} seq={} time={} request={} {}", r.id, r.seq, r.time, q.requestid, q.action)
                }
                _ => format!("other id={}", r.id),
            })
            .collect()
    };
    for i in 0..NODES {
        assert_eq!(
            (count(i, "ping", true), count(i, "get_fact", true)),
            (1, 1),
            "node {} ran each step once; it recorded:\n{}\nits provisioner record: {:?}",
            identity(i),
            history(i).join("\n"),
            lifecycle
                .iter()
                .filter(|r| r.subject == identity(i))
                .map(|r| (r.id.clone(), r.time, r.data.event_type()))
                .collect::<Vec<_>>()
        );
        assert_eq!(count(i, "get_fact", false), 0, "node {}", identity(i));
        if BROKEN.contains(&i) {
            assert!(count(i, "ping", false) >= 1, "node {} refused before it was fixed", identity(i));
        } else {
            assert_eq!(count(i, "ping", false), 0, "node {}", identity(i));
        }
    }
    let reply_records: usize = replies.values().sum();
    assert_eq!(requests, reply_records, "every request a node acted on was answered once");

    // The malformed messages were dead-lettered once each, with their reasons.
    let letters: Vec<DeadLetter> =
        read_all(&*b, "CHORUS_DEADLETTER").await.iter().map(|m| DeadLetter::from_message(m).unwrap()).collect();
    let codes: BTreeSet<(&str, &str)> = letters.iter().map(|l| (l.origin.as_str(), l.code.as_str())).collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(codes, BTreeSet::from([("provisioner", "not_json"), ("provisioner", "rejected")]));
}

/// A provisioner started before its streams exist runs, says why it is not ready, and
/// reads the stream from its start once it appears: no event missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioner_started_before_its_streams_exist_waits_and_misses_nothing() {
    let server = NatsServer::start().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(NatsTransport::new(client));
    let mut provisioner =
        Provisioner::start(b.clone(), transport, config(dir.path().join("state")), Shutdown::new()).await.unwrap();
    let monitor = provisioner.monitor();
    eventually("the provisioner to say why it is not ready", Duration::from_secs(5), || {
        let health = monitor.health();
        let result = match (health.healthy, health.reason.as_deref()) {
            (false, Some(reason)) if reason.contains("`chorus streams create`") => Ok(()),
            other => Err(format!("{other:?}")),
        };
        async move { result }
    })
    .await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    let sim = Simulator::new(
        SimConfig { component: "provision_mode_server".into(), prefix: "late".into(), ..SimConfig::new(3) },
        Arc::new(BackboneSink(b.clone())),
    )
    .unwrap();
    sim.startup_storm().await.unwrap();
    until(&provisioner, "the three startups read", |p| p.nodes().map(|n| n.len() == 3).unwrap_or(false)).await;
    assert!(monitor.health().reason.is_none_or(|r| !r.contains("not reading")), "{:?}", monitor.health());
    provisioner.stop().await.unwrap();
}

/// Two provisioners, one elected; the leader is killed with SIGKILL in the middle of a
/// startup storm. The standby, which read every event too, takes over and provisions the
/// rest: one `provisioned` event per node, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_provisioner_takes_over_from_a_killed_leader_without_provisioning_twice() {
    use chorus_platform::election::Candidate;
    const N: usize = 300;
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow");
    std::fs::create_dir_all(&allow).unwrap();
    std::fs::write(
        allow.join("rpcutil.policy"),
        format!("policy default deny\nallow\t{CALLERID}\tping get_fact\t*\t*\n"),
    )
    .unwrap();
    let mut sim_config = SimConfig::new(N);
    sim_config.prefix = "ha".into();
    sim_config.component = "provision_mode_server".into();
    let sim = Simulator::new(sim_config, Arc::new(BackboneSink(b.clone()))).unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(NatsTransport::new(client));
    let _nodes = sim.host_rpc(transport, "choria", Some(allow), None).await.unwrap();

    let ops: Vec<std::net::SocketAddr> =
        (0..2).map(|_| format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap()).collect();
    let spawn = |i: usize| {
        let config = dir.path().join(format!("provision{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "state_dir: {}\nconcurrency: 4\nsweep_interval: 500ms\nelection: {{ttl: 2s, candidate: p{i}}}\nsteps:\n  - {{agent: rpcutil, action: ping}}\n  - {{agent: rpcutil, action: get_fact, data: {{fact: group}}}}\n",
                dir.path().join(format!("state{i}")).display()
            ),
        )
        .unwrap();
        std::process::Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
            .args(["provision", "--nats", &server.url(), "--listen", &ops[i].to_string(), "--config"])
            .arg(&config)
            .spawn()
            .unwrap()
    };
    let mut instances = [spawn(0), spawn(1)];
    sim.startup_storm().await.unwrap();
    let provisioned = |b: Arc<dyn Backbone>| async move {
        read_all(&*b, "CHORUS_LIFECYCLE")
            .await
            .iter()
            .filter_map(|m| EventRecord::decode(&m.payload).ok())
            .filter(|r| matches!(r.data, Event::Lifecycle(Lifecycle::Provisioned(_))))
            .map(|r| r.subject)
            .collect::<Vec<String>>()
    };
    let at_least = |n: usize| {
        let b = b.clone();
        async move {
            eventually(&format!("{n} nodes provisioned"), Duration::from_secs(180), || {
                let b = b.clone();
                async move {
                    let got = provisioned(b).await.len();
                    if got >= n {
                        Ok(())
                    } else {
                        Err(format!("{got} provisioned"))
                    }
                }
            })
            .await
        }
    };
    at_least(60).await;
    let leader = Candidate::leader_of(&*b, "provisioner", Duration::from_secs(2)).await.unwrap().expect("a leader");
    let (dead, alive) = if instances[0].id() == leader.pid { (0, 1) } else { (1, 0) };
    assert_eq!(instances[dead].id(), leader.pid, "the leader is one of the two instances");
    instances[dead].kill().unwrap(); // SIGKILL
    instances[dead].wait().unwrap();
    let before = provisioned(b.clone()).await.len();
    assert!(before < N, "killed after the storm was provisioned: not a takeover");

    at_least(N).await;
    let now_leader = Candidate::leader_of(&*b, "provisioner", Duration::from_secs(2)).await.unwrap().expect("a leader");
    assert_eq!(now_leader.pid, instances[alive].id(), "the standby leads");
    // The standby has nothing left to do: every node provisioned in its state, nothing in
    // flight or queued, before it is stopped and the events are counted.
    let addr = ops[alive];
    eventually("the new leader idle with every node provisioned", Duration::from_secs(60), || async move {
        let metrics = crate::replicate::try_http_get(addr, "/metrics").await.map_err(|e| e.to_string())?;
        let done = [
            format!("chorus_provisioner_nodes{{status=\"provisioned\"}} {N}"),
            "chorus_provisioner_in_flight 0".to_string(),
            "chorus_provisioner_queued 0".to_string(),
        ];
        if done.iter().all(|d| metrics.lines().any(|l| l == d)) {
            Ok(())
        } else {
            Err(metrics.lines().filter(|l| l.starts_with("chorus_provisioner_")).collect::<Vec<_>>().join("; "))
        }
    })
    .await;
    instances[alive].kill().unwrap();
    instances[alive].wait().unwrap();
    let all = provisioned(b.clone()).await;
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), N, "every node provisioned");
    assert_eq!(all.len(), N, "no node provisioned twice");
}

/// Enrolment of a startup storm of 1,000 simulated nodes: each proves it holds its key, gets
/// a credential it verifies itself against the issuer of its image, the configuration and
/// policies a helper script decided for it, and restarts as `server`; once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_1000_nodes_in_provisioning_mode_is_enrolled_once_each() {
    use chorus_identity::{Issuers, Role};
    use chorus_keys::{Algorithm, FileSigner, Signer};
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let issuer_file = dir.path().join("issuer.key");
    let issuer = FileSigner::generate(&issuer_file, Algorithm::Ed25519).unwrap();
    let mut issuers = Issuers::new();
    issuers.trust(issuer.public_key().clone());
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("chorus_provision.policy"),
        format!("policy default deny\nallow\t{CALLERID}\tkey configure restart\t*\t*\n"),
    )
    .unwrap();
    // The helper: any program reading the node on stdin and answering its configuration.
    let helper = dir.path().join("helper.sh");
    std::fs::write(
        &helper,
        "#!/bin/sh\ninput=$(cat)\nid=$(printf '%s' \"$input\" | sed 's/.*\"identity\":\"\\([^\"]*\\)\".*/\\1/')\nprintf '{\"configuration\":{\"identity\":\"%s\",\"plugin.choria.middleware_hosts\":\"nats://broker:4222\"},\"action_policies\":{\"rpcutil\":\"policy default allow\\\\n\"}}' \"$id\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let mut sim_config = SimConfig::new(NODES);
    sim_config.prefix = "enrol".into();
    sim_config.component = "provision_mode_server".into();
    let sim = Simulator::new(sim_config, Arc::new(BackboneSink(b.clone()))).unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(NatsTransport::new(client));
    let (_nodes, enrollee) = sim.host_enrolment(transport.clone(), "choria", Some(policies), issuers).await.unwrap();

    let config = ProvisionerConfig::from_yaml(&format!(
        "state_dir: {}\nconcurrency: 50\nsweep_interval: 1s\nenrol:\n  issuer: {{key_file: {}}}\n  helper: [{}]\n",
        dir.path().join("state").display(),
        issuer_file.display(),
        helper.display()
    ))
    .unwrap();
    let started = std::time::Instant::now();
    sim.startup_storm().await.unwrap();
    let mut p = Provisioner::start(b.clone(), transport, config, Shutdown::new()).await.unwrap();
    until(&p, "1000 nodes enrolled", |p| p.counts().unwrap().provisioned == NODES as u64).await;
    let took = started.elapsed();
    eprintln!(
        "enrolled {NODES} nodes in {took:.1?} ({:.0} nodes per minute)",
        NODES as f64 * 60.0 / took.as_secs_f64()
    );
    p.stop().await.unwrap();

    // Every node holds a credential for its own key, from the trusted issuer, and the
    // configuration and policies the helper decided for it.
    let mut trusted = Issuers::new();
    trusted.trust(issuer.public_key().clone());
    for node in sim.nodes() {
        let identity = node.identity.to_string();
        let enrolment = enrollee.enrolment(&identity).unwrap_or_else(|| panic!("{identity} not enrolled"));
        let credential = trusted.verify(&enrolment.credential, Role::Node, chrono::Utc::now().timestamp()).unwrap();
        assert_eq!(credential.claims().sub, identity);
        assert_eq!(enrolment.configuration["identity"], identity.as_str(), "the helper's decision for this node");
        assert_eq!(enrolment.action_policies["rpcutil"], "policy default allow\n");
    }
    assert_eq!(enrollee.enrolled(), NODES);
    // Counted once every node's restart (its startup as `server`, after the reply) is stored.
    let b2 = b.clone();
    eventually("every node restarted as server", Duration::from_secs(30), move || {
        let b = b2.clone();
        async move {
            let n =
                lifecycle_counts(&*b, &|l| matches!(l, Lifecycle::Startup(_)) && l.component() == "server").await.len();
            if n == NODES {
                Ok(())
            } else {
                Err(format!("{n} restarted"))
            }
        }
    })
    .await;
    let provisioned = lifecycle_counts(&*b, &|l| matches!(l, Lifecycle::Provisioned(_))).await;
    let restarted = lifecycle_counts(&*b, &|l| matches!(l, Lifecycle::Startup(_)) && l.component() == "server").await;
    assert_eq!(provisioned.len(), NODES);
    assert!(provisioned.values().all(|n| *n == 1), "a node provisioned twice");
    assert!(restarted.values().all(|n| *n == 1), "a node restarted twice");
}

/// Lifecycle events per node, of those `f` selects.
async fn lifecycle_counts(b: &dyn Backbone, f: &dyn Fn(&Lifecycle) -> bool) -> BTreeMap<String, usize> {
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for m in read_all(b, "CHORUS_LIFECYCLE").await {
        if let Ok(EventRecord { data: Event::Lifecycle(l), subject, .. }) = EventRecord::decode(&m.payload) {
            if f(&l) {
                *per.entry(subject).or_default() += 1;
            }
        }
    }
    per
}

/// A real node agent in provisioning mode is enrolled: it proves its key, verifies and
/// writes the credential, writes the configuration it is given over its own file, and
/// restarts as `server`, signing its events with the new credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_in_provisioning_mode_enrols_and_restarts_as_server() {
    use chorus_identity::{Issuers, Role};
    use chorus_keys::{Algorithm, FileSigner, Signer};
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let issuer_key = d.join("issuer.key");
    let issuer = FileSigner::generate(&issuer_key, Algorithm::Ed25519).unwrap();
    std::fs::write(d.join("issuer.pub"), issuer.public_key().to_pem()).unwrap();
    let policies = d.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("chorus_provision.policy"),
        format!("policy default deny\nallow\t{CALLERID}\tkey configure restart\t*\t*\n"),
    )
    .unwrap();
    let identity = "new1.example.net";
    let url = server.url();
    let config = d.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "identity: {identity}\ncomponent: provision_mode_server\nstate_dir: {d}/state\nnats: {{servers: [\"{url}\"]}}\npolicy_dir: {d}/policies\nalive_interval: 1h\nsecurity: {{insecure: true}}\nprovisioning:\n  issuers: [{d}/issuer.pub]\n  key_file: {d}/node.key\n  credential: {d}/node.cred\n  config: {d}/agent.yaml\n  policy_dir: {d}/policies\n",
            d = d.display()
        ),
    )
    .unwrap();
    let mut agent = std::process::Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
        .args(["agent", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();

    // What the node becomes: its normal configuration, with the key and credential enrolment gives it.
    let provisioner = ProvisionerConfig::from_yaml(&format!(
        "state_dir: {d}/provisioner\nsweep_interval: 500ms\nenrol:\n  issuer: {{key_file: {key}}}\n  configuration:\n    identity: {identity}\n    component: server\n    state_dir: {d}/state\n    nats: {{servers: [\"{url}\"]}}\n    alive_interval: 1h\n    security:\n      issuers: [{d}/issuer.pub]\n      key: {{key_file: {d}/node.key}}\n      credential: {d}/node.cred\n",
        d = d.display(),
        key = issuer_key.display(),
    ))
    .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(NatsTransport::new(client));
    let mut p = Provisioner::start(b.clone(), transport, provisioner, Shutdown::new()).await.unwrap();
    until(&p, "the node provisioned", |p| p.counts().unwrap().provisioned == 1).await;
    p.stop().await.unwrap();

    let b2 = b.clone();
    let restarted = eventually("the node back as server, signing its events", Duration::from_secs(60), move || {
        let b = b2.clone();
        async move {
            let found = read_all(&*b, "CHORUS_LIFECYCLE").await.into_iter().find_map(|m| {
                let r = EventRecord::decode(&m.payload).ok()?;
                matches!(&r.data, Event::Lifecycle(Lifecycle::Startup(s)) if s.component == "server").then_some(r)
            });
            found.ok_or_else(|| "no startup as server yet".to_string())
        }
    })
    .await;
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert_eq!(restarted.subject, identity);
    assert!(restarted.signature.is_some(), "signed with the enrolled key");
    let mut issuers = Issuers::new();
    issuers.trust(issuer.public_key().clone());
    let token = std::fs::read_to_string(d.join("node.cred")).unwrap();
    let credential = issuers.verify(&token, Role::Node, chrono::Utc::now().timestamp()).unwrap();
    assert_eq!(credential.claims().sub, identity);
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("component: server") && !written.contains("provisioning"), "{written}");
}
