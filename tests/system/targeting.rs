//! Targeting at scale: 1,000 simulated nodes with varied facts, classes and agents; every
//! filter kind selects exactly the nodes a brute-force oracle selects, whether the nodes are
//! found by broadcast or by inventory discovery over their registrations.

use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::Backbone;
use chorus_consumers::inventory::Inventory;
use chorus_consumers::projection::Store;
use chorus_platform::{ensure_platform_streams, BackboneSink, Emitter, MemorySink, StreamLimits};
use chorus_rpc::agents::{RpcUtil, Service, Shell};
use chorus_rpc::{
    check_filter, parse_fact_filter, Agent, CompiledFilter, LocalTransport, NodeContext, RequestOptions, RpcClient,
    RpcServer, ServerOptions, Target, Transport,
};
use chorus_schemas::registration::Registration;
use chorus_schemas::rpc::{FactFilter, Filter, JsonObject};
use chorus_schemas::{RpcReply, StatusCode};
use serde_json::json;

const COLLECTIVE: &str = "choria";

/// What the oracle knows of a node: the metadata it was given, in plain Rust.
struct Meta {
    identity: String,
    country: &'static str,
    cpus: i64,
    family: &'static str,
    load: f64,
    tags: Vec<&'static str>,
    classes: Vec<String>,
    agents: Vec<&'static str>,
}

fn identities(replies: &[RpcReply]) -> Vec<String> {
    let mut ids: Vec<String> = replies.iter().map(|r| r.identity.clone()).collect();
    ids.sort();
    ids
}

/// Registers every node hosted by `servers` and brings an inventory up to date with them.
async fn project(backbone: &Arc<dyn Backbone>, store: &Store, servers: &[RpcServer], metas: &[Meta]) {
    let emitter = Emitter::new(Arc::new(BackboneSink(backbone.clone())), 1, None);
    for (i, meta) in metas.iter().enumerate() {
        let content = servers[(i / 3) % 3].registration(COLLECTIVE, &meta.identity).expect("hosted");
        emitter.emit(Registration::new(content)).await.unwrap();
    }
    let mut projector = Inventory::registration_projector(backbone.clone(), store).unwrap();
    let stats = projector.catch_up().await.unwrap();
    assert_eq!(stats.dead_lettered, 0);
}

/// 1,000 nodes with varied facts, classes and agents (three servers, each with its own
/// agent set). Every filter kind and a set of compound expressions select exactly the nodes
/// a brute-force oracle over the same metadata selects: the nodes that act on a broadcast,
/// and the nodes that act when inventory discovery selects them from their registrations
/// and the request goes to each directly. A node whose facts changed since it registered
/// is still selected by the inventory but refuses the request (the filter travels with
/// it), and drops out once it registers again.
#[tokio::test]
async fn every_filter_kind_selects_exactly_the_nodes_an_oracle_selects_by_broadcast_and_by_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for agent in ["rpcutil", "shell", "service"] {
        std::fs::write(policies.join(format!("{agent}.policy")), "policy default deny\nallow\tup=bob\t*\t*\t*\n")
            .unwrap();
    }
    let backbone: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("streams")).unwrap());
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let store = Store::open(dir.path().join("views")).unwrap();

    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let agent_sets: [Vec<Arc<dyn Agent>>; 3] =
        [vec![Arc::new(RpcUtil)], vec![Arc::new(RpcUtil), Arc::new(Shell)], vec![Arc::new(RpcUtil), Arc::new(Service)]];
    let names: [Vec<&'static str>; 3] = [vec!["rpcutil"], vec!["rpcutil", "shell"], vec!["rpcutil", "service"]];
    let mut servers = Vec::new();
    for set in agent_sets {
        let options = ServerOptions { wildcard_directed: true, ..Default::default() };
        servers.push(RpcServer::new(transport.clone(), set, Some(policies.clone()), options).unwrap());
    }
    let mut metas = Vec::new();
    for i in 0..1000usize {
        let meta = Meta {
            identity: format!("node{i:04}.{}.example.net", ["lon", "nyc", "sfo"][i % 3]),
            country: ["uk", "us", "de", "fr"][i % 4],
            cpus: [2, 4, 8, 16, 32][i % 5],
            family: ["debian", "redhat"][(i / 7) % 2],
            load: (i % 10) as f64 / 2.0,
            tags: [vec!["blue"], vec!["green", "blue"], vec![]][i % 3].clone(),
            classes: [
                vec!["base".to_string(), "role::web".to_string()],
                vec!["base".into(), "role::db".into()],
                vec!["Base".into()],
            ][i % 3]
                .clone(),
            agents: names[(i / 3) % 3].clone(),
        };
        let mut node = NodeContext::new(meta.identity.clone(), COLLECTIVE);
        node.facts = json!({
            "country": meta.country, "cpus": meta.cpus, "os": {"family": meta.family}, "load": meta.load,
            "tags": meta.tags,
        })
        .as_object()
        .unwrap()
        .clone();
        node.classes = meta.classes.clone();
        servers[(i / 3) % 3].add_node(node, Arc::new(Emitter::new(sink.clone(), 1, None)), None).await.unwrap();
        metas.push(meta);
    }
    project(&backbone, &store, &servers, &metas).await;
    let inventory = Inventory::open(&store, Default::default()).unwrap();
    // From here on no store I/O: paused time lets every call run to its timeout at once,
    // which it reaches only once every node has processed the request.
    tokio::time::pause();
    let client = RpcClient::new(transport.clone(), "up=bob", COLLECTIVE).with_senderid("client.example.net");
    let call = |filter: Filter, target: Target| {
        let client = &client;
        async move {
            let options = RequestOptions { filter, target, timeout: Duration::from_secs(10), ..Default::default() };
            // No expected count: the call ends at its timeout.
            let options = RequestOptions { expected: None, ..options };
            client.call("rpcutil", "ping", JsonObject::new(), options).await.unwrap()
        }
    };
    let inventory_discovery = |filter: &Filter| {
        let compiled = CompiledFilter::new(filter).unwrap();
        inventory.discover(&compiled, COLLECTIVE, chrono::Utc::now()).unwrap()
    };

    let fact = |t: &str| parse_fact_filter(t).unwrap();
    let texts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let compound = |e: &str| vec![json!({ "expr": e }).as_object().unwrap().clone()];
    type Oracle = Box<dyn Fn(&Meta) -> bool>;
    let cases: Vec<(&str, Filter, Oracle)> = vec![
        (
            "country=uk",
            Filter { fact: vec![fact("country=uk")], ..Default::default() },
            Box::new(|m| m.country == "uk"),
        ),
        ("cpus>=8", Filter { fact: vec![fact("cpus>=8")], ..Default::default() }, Box::new(|m| m.cpus >= 8)),
        ("cpus<4", Filter { fact: vec![fact("cpus<4")], ..Default::default() }, Box::new(|m| m.cpus < 4)),
        (
            "os.family!=debian",
            Filter { fact: vec![fact("os.family!=debian")], ..Default::default() },
            Box::new(|m| m.family != "debian"),
        ),
        // Choria compares a float fact with `>` as `>=` (facts.rs keeps the quirk).
        ("load>2.5", Filter { fact: vec![fact("load>2.5")], ..Default::default() }, Box::new(|m| m.load >= 2.5)),
        ("load<=1.5", Filter { fact: vec![fact("load<=1.5")], ..Default::default() }, Box::new(|m| m.load <= 1.5)),
        (
            "country=~^u + cpus<=16",
            Filter { fact: vec![fact("country=~^u"), fact("cpus<=16")], ..Default::default() },
            Box::new(|m| m.country.starts_with('u') && m.cpus <= 16),
        ),
        (
            "class role::web",
            Filter { cf_class: texts(&["role::web"]), ..Default::default() },
            Box::new(|m| m.classes.iter().any(|c| c == "role::web")),
        ),
        (
            "class /^role::/",
            Filter { cf_class: texts(&["/^role::/"]), ..Default::default() },
            Box::new(|m| m.classes.iter().any(|c| c.starts_with("role::"))),
        ),
        (
            "agent shell",
            Filter { agent: texts(&["shell"]), ..Default::default() },
            Box::new(|m| m.agents.contains(&"shell")),
        ),
        (
            "agent /^serv/",
            Filter { agent: texts(&["/^serv/"]), ..Default::default() },
            Box::new(|m| m.agents.iter().any(|a| a.starts_with("serv"))),
        ),
        (
            "identity /\\.lon\\./",
            Filter { identity: texts(&["/\\.lon\\./"]), ..Default::default() },
            Box::new(|m| m.identity.contains(".lon.")),
        ),
        (
            "identity exact",
            Filter { identity: texts(&["node0003.lon.example.net", "node0004.nyc.example.net"]), ..Default::default() },
            Box::new(|m| m.identity == "node0003.lon.example.net" || m.identity == "node0004.nyc.example.net"),
        ),
        (
            "fact + class + agent",
            Filter {
                fact: vec![fact("country=uk")],
                cf_class: texts(&["role::db"]),
                agent: texts(&["shell"]),
                ..Default::default()
            },
            Box::new(|m| m.country == "uk" && m.classes.iter().any(|c| c == "role::db") && m.agents.contains(&"shell")),
        ),
        (
            "compound or/and/not",
            Filter {
                compound: vec![compound(r#"with("country=uk") or (with("cpus>=16") and not with("role::web"))"#)],
                ..Default::default()
            },
            Box::new(|m| m.country == "uk" || (m.cpus >= 16 && !m.classes.iter().any(|c| c == "role::web"))),
        ),
        (
            "compound fact/include/agents",
            Filter {
                compound: vec![compound(
                    r#"fact("cpus") >= 8 && include(fact("tags"), "blue") && "service" in agents"#,
                )],
                ..Default::default()
            },
            Box::new(|m| m.cpus >= 8 && m.tags.contains(&"blue") && m.agents.contains(&"service")),
        ),
        (
            "compound nested and regex",
            Filter {
                compound: vec![compound(r#"fact("os.family") matches "^red" and fact("load") < 1.5"#)],
                ..Default::default()
            },
            Box::new(|m| m.family.starts_with("red") && m.load < 1.5),
        ),
        (
            "compound missing fact",
            Filter { compound: vec![compound(r#"with("missing=1")"#)], ..Default::default() },
            Box::new(|_| false),
        ),
    ];
    assert_eq!(inventory_discovery(&Filter::default()).registered, 1000);
    for (name, filter, oracle) in cases {
        let mut wanted: Vec<String> = metas.iter().filter(|m| oracle(m)).map(|m| m.identity.clone()).collect();
        wanted.sort();
        let check = |how: &str, results: &chorus_rpc::RpcResults| {
            let got = identities(&results.replies);
            let extra: Vec<&String> = got.iter().filter(|i| !wanted.contains(i)).take(5).collect();
            let missing: Vec<&String> = wanted.iter().filter(|i| !got.contains(i)).take(5).collect();
            assert!(
                got == wanted,
                "{name} by {how}: {} acted, oracle {}; extra {extra:?}, missing {missing:?}",
                got.len(),
                wanted.len()
            );
            assert!(results.replies.iter().all(|r| r.statuscode == StatusCode::Ok), "{name} by {how}");
        };
        check("broadcast", &call(filter.clone(), Target::Broadcast).await);

        let found = inventory_discovery(&filter);
        let mut discovered = found.nodes.clone();
        discovered.sort();
        assert_eq!(discovered, wanted, "{name}: inventory discovery");
        if !found.nodes.is_empty() {
            check("inventory", &call(filter.clone(), Target::Nodes(found.nodes)).await);
        }
    }

    // A node whose facts changed after it registered: the inventory still selects it, the
    // node itself refuses, so only nodes that match act.
    let uk = Filter { fact: vec![parse_fact_filter("country=uk").unwrap()], ..Default::default() };
    let moved = metas.iter().position(|m| m.country == "uk").unwrap();
    let server = &servers[(moved / 3) % 3];
    let mut ctx = server.node(COLLECTIVE, &metas[moved].identity).unwrap();
    ctx.facts.insert("country".into(), json!("ie"));
    server.update_node(ctx).unwrap();
    let stale = inventory_discovery(&uk);
    assert!(stale.nodes.contains(&metas[moved].identity), "the inventory has not heard of the change yet");
    let acted = identities(&call(uk.clone(), Target::Nodes(stale.nodes.clone())).await.replies);
    assert_eq!(acted.len(), stale.nodes.len() - 1);
    assert!(!acted.contains(&metas[moved].identity), "a node that no longer matches does not act");

    // Once it registers again, the inventory agrees with it.
    tokio::time::resume();
    let emitter = Emitter::new(Arc::new(BackboneSink(backbone.clone())), 10_000, None);
    emitter.emit(Registration::new(server.registration(COLLECTIVE, &metas[moved].identity).unwrap())).await.unwrap();
    Inventory::registration_projector(backbone.clone(), &store).unwrap().catch_up().await.unwrap();
    let fresh = inventory_discovery(&uk);
    assert_eq!(fresh.nodes.len(), stale.nodes.len() - 1);
    assert!(!fresh.nodes.contains(&metas[moved].identity));
    assert_eq!(inventory.metadata(&metas[moved].identity).unwrap().unwrap().facts["country"], "ie");

    // A filter nodes cannot use is refused before anything is sent or discovered (the
    // command line refuses it even earlier, when it parses it).
    assert!(parse_fact_filter("name=~/(/").is_err());
    for bad in [
        Filter {
            fact: vec![FactFilter { fact: "name".into(), operator: "=~".into(), value: "/(/".into() }],
            ..Default::default()
        },
        Filter { identity: vec!["/(/".into()], ..Default::default() },
        Filter { compound: vec![vec![json!({"expr": "with("}).as_object().unwrap().clone()]], ..Default::default() },
    ] {
        assert!(check_filter(&bad).is_err(), "{bad:?}");
    }
}

/// The operator's command line against a real nats-server: 300 simulated nodes register,
/// the inventory API serves their registrations, and `chorus discover`, `chorus facts` and
/// `chorus rpc` select by inventory and by broadcast alike; batches, limits and reply
/// filters act on the discovered nodes; malformed input is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_facts_and_rpc_on_the_command_line_by_inventory_and_broadcast() {
    use crate::cli::chorus;
    use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
    use chorus_consumers::dashboard::{Views, ViewsOptions};
    use chorus_producers::simulator::{SimConfig, Simulator};
    use chorus_rpc::NatsTransport;
    use chorus_runtime::{Service as _, Shutdown};

    let server = chorus_testkit::nats::NatsServer::start().unwrap();
    let nats = server.url();
    let backbone: Arc<dyn Backbone> =
        Arc::new(JetStreamBackbone::connect(&NatsConfig::new([nats.clone()])).await.unwrap());
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rpcutil.policy"), "policy default deny\nallow\tchoria=cli\t*\t*\t*\n").unwrap();
    let sim = Simulator::new(SimConfig::new(300), Arc::new(BackboneSink(backbone.clone()))).unwrap();
    let client = async_nats::connect(&nats).await.unwrap();
    let rpc = sim
        .host_rpc(Arc::new(NatsTransport::new(client)), COLLECTIVE, Some(dir.path().to_path_buf()), None)
        .await
        .unwrap();
    assert_eq!(sim.register(&rpc, COLLECTIVE).await.unwrap(), 300);
    let options = ViewsOptions {
        state: dir.path().join("views"),
        listen: "127.0.0.1:0".parse().unwrap(),
        rebuild: false,
        policy: Default::default(),
        streams: Default::default(),
    };
    let mut views = Views::start(backbone.clone(), &options, None, Shutdown::new()).await.unwrap();
    let url = views.url().trim_end_matches('/').to_string();
    // The simulator's facts: country is uk for every fourth node.
    let uk: Vec<String> = (0..300).filter(|i| i % 4 == 0).map(|i| sim.config().identity(i)).collect();
    chorus_testkit::eventually("every registration in the inventory", Duration::from_secs(30), || {
        let inventory = views.inventory().clone();
        async move {
            let found =
                inventory.discover(&CompiledFilter::new(&Filter::default()).unwrap(), COLLECTIVE, chrono::Utc::now());
            match found {
                Ok(d) if d.registered == 300 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // discover: by inventory (no traffic to the nodes) and by broadcast, the same nodes.
    let (ok, out) = chorus(&["discover", "--nats", &nats, "--inventory", &url, "-F", "country=uk", "--json"]);
    assert!(ok, "{out}");
    let json_start = out.find('[').unwrap();
    let listed: Vec<String> =
        serde_json::Deserializer::from_str(&out[json_start..]).into_iter().next().unwrap().unwrap();
    assert_eq!(sorted(listed), sorted(uk.clone()));
    assert!(out.contains("inventory: 75 of 300 registered nodes selected"), "{out}");
    let (ok, out) = chorus(&["discover", "--nats", &nats, "--dm", "broadcast", "-F", "country=uk"]);
    assert!(ok && out.contains("Discovered 75 nodes"), "{out}");

    // facts: each value with its count.
    let (ok, out) = chorus(&["facts", "country", "--nats", &nats, "--inventory", &url]);
    assert!(ok, "{out}");
    for country in ["uk", "us", "de", "fr"] {
        assert!(out.contains(&format!("{country}  found 75 times")), "{out}");
    }

    // rpc: inventory discovery, half of the nodes at random (the same half for a seed), in
    // batches of 10; every chosen node answers, as JSON lines.
    let half = [
        "rpc",
        "rpcutil",
        "ping",
        "--nats",
        &nats,
        "--inventory",
        &url,
        "-F",
        "country=uk",
        "--limit",
        "50%",
        "--limit-seed",
        "7",
        "--batch",
        "10",
        "--json",
    ];
    let (ok, out) = chorus(&half);
    assert!(ok, "{out}");
    let answered = |out: &str| -> Vec<String> {
        sorted(
            out.lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["identity"].as_str().unwrap().to_string()
                })
                .collect(),
        )
    };
    let first = answered(&out);
    assert_eq!(first.len(), 38, "{out}");
    assert!(first.iter().all(|n| uk.contains(n)));
    assert_eq!(answered(&chorus(&half).1), first, "the same seed chooses the same nodes");

    // Chaining: the JSON lines of one request are the nodes of the next; a reply filter
    // keeps some replies for display and JSON, counting all.
    let chained = dir.path().join("chained.jsonl");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with('{')).collect();
    std::fs::write(&chained, lines.join("\n")).unwrap();
    let kept = format!(r#"ok() && sender() == "{}""#, first[0]);
    let (ok, out) = chorus(&[
        "rpc",
        "rpcutil",
        "ping",
        "--nats",
        &nats,
        "--nodes",
        chained.to_str().unwrap(),
        "--filter-replies",
        &kept,
        "--json",
    ]);
    assert!(ok, "{out}");
    assert_eq!(answered(&out), [first[0].clone()]);
    assert!(out.contains("38 replies: 38 ok"), "{out}");

    // Summaries from the DDL and the table of outputs.
    let (ok, out) =
        chorus(&["rpc", "rpcutil", "collective_info", "--nats", &nats, "--inventory", &url, "-I", &uk[0], "--table"]);
    assert!(ok, "{out}");
    assert!(out.contains("Summary of All Collectives:"), "{out}");
    assert!(out.contains("MAIN_COLLECTIVE"), "{out}");
    assert!(out.contains("1 replies: 1 ok"), "-I alone addresses its node directly, inventory or not: {out}");

    // Malformed input: refused before anything is sent.
    let before = rpc.stats().total;
    for bad in [
        vec!["-F", "name=~/(/"],
        vec!["-S", "with("],
        vec!["--filter-replies", "ok("],
        vec!["--limit", "0"],
        vec!["--limit", "abc"],
        vec!["-I", "/(/"],
    ] {
        let mut args = vec!["rpc", "rpcutil", "ping", "--nats", &nats, "--inventory", &url];
        args.extend(bad.iter().copied());
        let (ok, out) = chorus(&args);
        assert!(!ok, "{bad:?} was accepted: {out}");
    }
    assert_eq!(rpc.stats().total, before, "a refused command sent nothing");
    views.stop().await.unwrap();
}
