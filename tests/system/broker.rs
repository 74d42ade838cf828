//! Broker security against a real nats-server running the configuration `chorus broker
//! config` generates: tenants are isolated accounts (no stream, message or publish crosses
//! between them), component users cannot publish or subscribe outside their permissions,
//! passwords are checked against bcrypt hashes, mutual TLS refuses clients without a
//! certificate, and source addresses are limited by the listen address and by the generated
//! nftables rules.
//!
//! The source-address tests run nats-server (and load the nftables rules) inside a network
//! namespace created for the test with `unshare --net`; the host's firewall and interfaces
//! are never touched. They need root (CI and the developer machines run as root).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::jetstream::{JetStreamBackbone, NatsAuth, NatsConfig};
use chorus_backbone::{Backbone, BackboneError, Message};
use chorus_broker::BrokerConfig;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_producers::agent::{AgentConfig, NodeAgent};
use chorus_rpc::{NatsTransport, RequestOptions, RpcClient};
use chorus_runtime::{Service as _, Shutdown, TlsClientConfig};
use chorus_schemas::lifecycle::Alive;
use chorus_schemas::{AuditAction, AuditRecord, EventRecord};
use chorus_testkit::nats::{nats_server_binary, NatsServer};
use chorus_testkit::pki::Pki;
use chorus_testkit::{eventually, eventually_blocking};
use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::issuer::TestIssuer;

// ---------------------------------------------------------------------------------------
// PKI and the broker description
// ---------------------------------------------------------------------------------------

fn pki(dir: &Path) -> Pki {
    chorus_testkit::pki::generate(dir, "node1.example.net")
}

/// Every test user's password is `<user>-pw`.
fn pw(user: &str) -> String {
    format!("{user}-pw")
}

/// Two tenants, one user per component; passwords given in the clear, as a file and as a
/// bcrypt hash. `listen` and `jetstream.store_dir` are replaced by the harness.
fn broker_yaml(dir: &Path, pki: &Pki, verify_clients: bool) -> String {
    let pw_file = dir.join("globex-agent.password");
    std::fs::write(&pw_file, format!("{}\n", pw("globex-agent"))).unwrap();
    let aaa_hash = chorus_broker::hash_password(&pw("acme-aaa"), 4).unwrap();
    format!(
        r#"
server_name: chorus-broker-test
listen: 127.0.0.1:4222
tls:
  cert_file: {cert}
  key_file: {key}
  ca_file: {ca}
  verify_clients: {verify_clients}
jetstream: {{store_dir: {store}}}
bcrypt_cost: 4
system_account: {{user: sys, password: sys-pw}}
tenants:
  acme:
    collectives: [acme]
    users:
      - {{user: acme-admin, role: admin, password: acme-admin-pw}}
      - {{user: acme-agent, role: agent, password: acme-agent-pw}}
      - {{user: acme-client, role: client, password: acme-client-pw, callerid: up=alice}}
      - {{user: acme-aaa, role: aaa, password_hash: "{aaa_hash}"}}
      - {{user: acme-consumer, role: consumer, password: acme-consumer-pw}}
      - {{user: acme-reactor, role: reactor, password: acme-reactor-pw, callerid: up=reactor}}
      - {{user: acme-replicator, role: replicator, password: acme-replicator-pw}}
    node_buckets: [CHORUS_GOVERNORS, GOVERNOR_upgrades]
  globex:
    collectives: [globex]
    jetstream: {{max_file: 256MB, max_memory: 64MB}}
    users:
      - {{user: globex-admin, role: admin, password: globex-admin-pw}}
      - {{user: globex-agent, role: agent, password_file: {pw_file}}}
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca.display(),
        store = dir.join("unused-store").display(),
        pw_file = pw_file.display(),
    )
}

fn generate(yaml: &str) -> BrokerConfig {
    let config: BrokerConfig = serde_yaml::from_str(yaml).unwrap();
    config.validate().unwrap();
    config
}

/// A real nats-server running the generated configuration.
fn start_broker(dir: &Path, pki: &Pki, verify_clients: bool) -> NatsServer {
    let conf = generate(&broker_yaml(dir, pki, verify_clients)).render_nats_conf().unwrap();
    assert!(!conf.contains("-pw"), "no clear password in the generated file:\n{conf}");
    NatsServer::builder().base_config(&conf).start().unwrap()
}

fn nats_config(server: &NatsServer, user: &str, pki: &Pki) -> NatsConfig {
    let mut c = NatsConfig::new([server.url()]);
    c.auth = NatsAuth::UserPassword { user: user.into(), password: pw(user) };
    c.tls = Some(TlsClientConfig::with_ca(pki.ca.clone()));
    c.request_timeout = Duration::from_secs(5);
    c.publish_retry_for = Duration::from_secs(5);
    c
}

async fn backbone(server: &NatsServer, user: &str, pki: &Pki) -> Arc<dyn Backbone> {
    Arc::new(JetStreamBackbone::connect(&nats_config(server, user, pki)).await.unwrap())
}

/// A raw connection whose server errors (permission violations) arrive on the channel.
async fn watched(server: &NatsServer, user: &str, pki: &Pki) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), pw(user))
        .add_root_certificates(pki.ca.clone())
        .require_tls(true)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    tx.send(e.to_string()).ok();
                }
            }
        })
        .connect(server.url())
        .await
        .unwrap();
    (client, rx)
}

/// Waits for the server's permissions violation naming `subject` (the server sends it while
/// processing the operation; the wait only bounds a broken test).
async fn expect_violation(rx: &mut mpsc::UnboundedReceiver<String>, kind: &str, subject: &str) {
    let wanted = format!("permissions violation for {kind} to \"{subject}\"");
    let wait = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = rx.recv().await {
            if e.to_lowercase().contains(&wanted.to_lowercase()) {
                return e;
            }
        }
        panic!("connection closed before the violation for {subject}");
    });
    wait.await.unwrap_or_else(|_| panic!("no {wanted:?} from the server"));
}

fn alive(identity: &str, seq: u64) -> Message {
    let r = EventRecord::new(Alive::new(identity, "server", "1.0.0", Some(1800)), seq);
    Message::new(r.id.clone(), r.nats_subject().unwrap(), r.encode())
}

// ---------------------------------------------------------------------------------------
// Tenant isolation and component permissions
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_cannot_read_or_write_each_others_streams() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_broker(dir.path(), &pki, false);

    // Tenant B (globex) provisions its streams and stores three events.
    let globex = backbone(&server, "globex-admin", &pki).await;
    ensure_platform_streams(&*globex, &StreamLimits::default()).await.unwrap();
    let globex_agent = backbone(&server, "globex-agent", &pki).await;
    globex_agent.publish_batch((1..=3).map(|i| alive("web1.globex.net", i)).collect()).await.unwrap();
    assert_eq!(globex.stream_info("CHORUS_LIFECYCLE").await.unwrap().messages, 3);

    // Tenant A (acme), even as its admin, does not see B's streams at all.
    let acme = backbone(&server, "acme-admin", &pki).await;
    match acme.stream_info("CHORUS_LIFECYCLE").await {
        Err(BackboneError::NotFound { .. }) => {}
        other => panic!("acme sees globex's stream: {other:?}"),
    }
    let (acme_raw, _) = watched(&server, "acme-admin", &pki).await;
    let js = async_nats::jetstream::new(acme_raw.clone());
    let names: Vec<String> = futures::TryStreamExt::try_collect(js.stream_names()).await.unwrap();
    assert!(names.is_empty(), "acme lists streams of another tenant: {names:?}");

    // A's streams of the same names are A's own: empty, and A's publishes land only there.
    ensure_platform_streams(&*acme, &StreamLimits::default()).await.unwrap();
    assert_eq!(acme.stream_info("CHORUS_LIFECYCLE").await.unwrap().messages, 0);
    let mut watch_acme = acme_raw.subscribe("choria.lifecycle.>").await.unwrap();
    acme_raw.flush().await.unwrap();

    // B publishes (stored by B's stream, so fully routed) before A does: if B's message
    // could reach A's subscriber it would arrive first on A's connection.
    globex_agent.publish(alive("web2.globex.net", 4)).await.unwrap();
    let acme_agent = backbone(&server, "acme-agent", &pki).await;
    let ack = acme_agent.publish(alive("web1.acme.net", 1)).await.unwrap();
    assert_eq!(ack.stream, "CHORUS_LIFECYCLE");

    let first = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut watch_acme))
        .await
        .expect("acme's own event reaches acme's subscriber")
        .unwrap();
    let seen = EventRecord::decode(&first.payload).unwrap();
    assert_eq!(seen.subject, "web1.acme.net", "acme received another tenant's event first");

    assert_eq!(acme.stream_info("CHORUS_LIFECYCLE").await.unwrap().messages, 1);
    assert_eq!(
        globex.stream_info("CHORUS_LIFECYCLE").await.unwrap().messages,
        4,
        "acme's publish never lands in globex's stream"
    );
    let stored = chorus_testkit::conformance::read_all(&*acme, "CHORUS_LIFECYCLE").await;
    let identities: Vec<String> = stored.iter().map(|m| EventRecord::decode(&m.payload).unwrap().subject).collect();
    assert_eq!(identities, ["web1.acme.net"]);

    // Each account has its own JetStream; globex's limits are its own.
    let jsz = server.monitor_json("/jsz?accounts=true").unwrap();
    let accounts: Vec<&str> =
        jsz["account_details"].as_array().unwrap().iter().filter_map(|a| a["name"].as_str()).collect();
    assert!(accounts.contains(&"acme") && accounts.contains(&"globex"), "{jsz}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_cannot_act_outside_their_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_broker(dir.path(), &pki, false);
    let admin = backbone(&server, "acme-admin", &pki).await;
    ensure_platform_streams(&*admin, &StreamLimits::default()).await.unwrap();

    // An agent sends no RPC requests, writes no audit records, reads nobody's events,
    // deletes no streams and cannot reach another tenant's collective.
    let (agent, mut agent_errors) = watched(&server, "acme-agent", &pki).await;
    for subject in [
        "acme.broadcast.agent.rpcutil",
        "chorus.audit.allow.london",
        "$JS.API.STREAM.DELETE.CHORUS_LIFECYCLE",
        "chorus.deadletter.tally",
    ] {
        agent.publish(subject, "x".into()).await.unwrap();
        agent.flush().await.unwrap();
        expect_violation(&mut agent_errors, "publish", subject).await;
    }
    for subject in ["choria.lifecycle.>", "chorus.audit.>", "globex.broadcast.agent.>", ">"] {
        let _sub = agent.subscribe(subject).await.unwrap();
        agent.flush().await.unwrap();
        expect_violation(&mut agent_errors, "subscription", subject).await;
    }
    assert_eq!(admin.stream_info("CHORUS_LIFECYCLE").await.unwrap().messages, 0, "stream still there");

    // An RPC client cannot forge events or answer for nodes.
    let (client, mut client_errors) = watched(&server, "acme-client", &pki).await;
    for subject in
        ["choria.lifecycle.event.startup.server", "chorus.rpc.reply.acme.rpcutil", "chorus.audit.allow.london"]
    {
        client.publish(subject, "forged".into()).await.unwrap();
        client.flush().await.unwrap();
        expect_violation(&mut client_errors, "publish", subject).await;
    }

    // The AAA service writes audit records and nothing else.
    let (aaa, mut aaa_errors) = watched(&server, "acme-aaa", &pki).await;
    aaa.publish("choria.lifecycle.event.alive.server", "x".into()).await.unwrap();
    aaa.flush().await.unwrap();
    expect_violation(&mut aaa_errors, "publish", "choria.lifecycle.event.alive.server").await;
    let aaa_backbone = backbone(&server, "acme-aaa", &pki).await;
    let record = EventRecord::new(
        AuditRecord::new("aaa1.acme.net", "london", "up=alice", AuditAction::Deny, Default::default()),
        1,
    );
    aaa_backbone
        .publish(Message::new(record.id.clone(), record.nats_subject().unwrap(), record.encode()))
        .await
        .unwrap();
    assert_eq!(admin.stream_info("CHORUS_AUDIT").await.unwrap().messages, 1);

    // A consumer reads streams but cannot delete them or publish events.
    let (consumer, mut consumer_errors) = watched(&server, "acme-consumer", &pki).await;
    for subject in
        ["$JS.API.STREAM.DELETE.CHORUS_AUDIT", "$JS.API.STREAM.PURGE.CHORUS_AUDIT", "chorus.audit.allow.london"]
    {
        consumer.publish(subject, "x".into()).await.unwrap();
        consumer.flush().await.unwrap();
        expect_violation(&mut consumer_errors, "publish", subject).await;
    }
    let reader = backbone(&server, "acme-consumer", &pki).await;
    assert_eq!(chorus_testkit::conformance::read_all(&*reader, "CHORUS_AUDIT").await.len(), 1);

    // Wrong password: refused.
    let mut wrong = nats_config(&server, "acme-agent", &pki);
    wrong.auth = NatsAuth::UserPassword { user: "acme-agent".into(), password: "guess".into() };
    assert!(wrong.connect(None).await.is_err());
}

/// The permissions are enough for the real thing: a node agent (user `agent`) publishes its
/// events and answers an RPC request sent by an RPC client (user `client`), over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_client_work_within_their_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_broker(dir.path(), &pki, false);
    let admin = backbone(&server, "acme-admin", &pki).await;
    ensure_platform_streams(&*admin, &StreamLimits::default()).await.unwrap();

    let policies = dir.path().join("policy");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("rpcutil.policy"), "policy default deny\nallow\tup=alice\tping\t*\t*\n").unwrap();
    let mut cfg = AgentConfig::new("node1.acme.net", dir.path().join("node1"));
    cfg.collective = "acme".into();
    cfg.nats = Some(nats_config(&server, "acme-agent", &pki));
    cfg.policy_dir = Some(policies);
    let issuer = TestIssuer::new();
    let (key, credential) = issuer.node_files(dir.path(), "node1.acme.net");
    cfg.security.issuers = vec![issuer.write_public(dir.path())];
    cfg.security.key = Some(key);
    cfg.security.credential = Some(credential);
    let mut agent = NodeAgent::start(cfg, Shutdown::new()).await.unwrap();

    let client = nats_config(&server, "acme-client", &pki).connect(None).await.unwrap();
    let rpc = RpcClient::signed(Arc::new(NatsTransport::new(client)), issuer.client("up=alice", &["*"]), "acme")
        .with_trust(issuer.issuers())
        .with_senderid("laptop.acme.net");
    let options = RequestOptions { expected: Some(1), timeout: Duration::from_secs(30), ..Default::default() };
    let results = rpc.call("rpcutil", "ping", Default::default(), options).await.unwrap();
    assert_eq!(results.summary.ok, 1, "{:?}", results.summary);

    // The agent's startup event and RPC records reached the tenant's streams.
    eventually("the agent's events in the tenant's streams", Duration::from_secs(60), || {
        let admin = &*admin;
        async move {
            let lifecycle = admin.stream_info("CHORUS_LIFECYCLE").await.unwrap().messages;
            let rpc_records = admin.stream_info("CHORUS_RPC").await.unwrap().messages;
            if lifecycle >= 1 && rpc_records >= 2 {
                Ok(())
            } else {
                Err(format!("agent events not forwarded: lifecycle {lifecycle}, rpc {rpc_records}"))
            }
        }
    })
    .await;
    agent.stop().await.unwrap();
}

/// The users of [11]'s components get what they use and no more: an agent runs a governed
/// command (governor leases are key-value writes), a consumer (the provisioner) and the
/// replicator campaign in elections, and a reactor user runs a reactor in an election that
/// records its firings in `CHORUS_REACTOR`; a consumer still cannot record reactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactor_governor_and_election_users_work_within_their_permissions() {
    use chorus_consumers::reactor::{Reactor, ReactorConfig};
    use chorus_platform::election::{Candidate, ElectionConfig};
    use chorus_platform::governor::{Governor, GovernorSpec};
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_broker(dir.path(), &pki, false);
    let admin = backbone(&server, "acme-admin", &pki).await;
    ensure_platform_streams(&*admin, &StreamLimits::default()).await.unwrap();
    let spec = GovernorSpec { capacity: 1, expires: Duration::from_secs(30) };
    Governor::add(&*admin, "upgrades", spec).await.unwrap();

    let agent = backbone(&server, "acme-agent", &pki).await;
    let governor = Governor::open(&*agent, "upgrades").await.unwrap();
    let lease = governor.claim("node1", Duration::from_secs(10), &Shutdown::new()).await.unwrap().expect("a lease");
    lease.release().await.unwrap();
    // Buckets not listed for nodes are out of an agent's reach (elections, checkpoints).
    let (raw_agent, mut violations) = watched(&server, "acme-agent", &pki).await;
    raw_agent.publish("$KV.ELECTION_guard.leader", "me".into()).await.unwrap();
    raw_agent.flush().await.unwrap();
    expect_violation(&mut violations, "publish", "$KV.ELECTION_guard.leader").await;

    for user in ["acme-consumer", "acme-replicator"] {
        let b = backbone(&server, user, &pki).await;
        let config = ElectionConfig { name: None, ttl: Duration::from_secs(5), candidate: Some(user.into()) };
        // The election's bucket is made by an admin (the consumer makes no streams).
        Candidate::join(&*admin, &format!("{user}-election"), &config).await.unwrap();
        let candidate = Candidate::join(&*b, &format!("{user}-election"), &config).await.unwrap();
        let shutdown = Shutdown::new();
        let (leadership, campaign) = candidate.campaign(shutdown.clone());
        eventually(&format!("{user} leads"), Duration::from_secs(30), || {
            let leading = leadership.is_leader();
            async move {
                if leading {
                    Ok(())
                } else {
                    Err("not leading".to_string())
                }
            }
        })
        .await;
        shutdown.request();
        campaign.await.unwrap();
    }

    let state = tempfile::tempdir().unwrap();
    let election = ElectionConfig { name: None, ttl: Duration::from_secs(5), candidate: None };
    Candidate::join(&*admin, "guard", &election).await.unwrap();
    let config = ReactorConfig::from_yaml(&format!(
        "name: guard\nstate_dir: {}\nstart: first\nelection: {{ttl: 5s, candidate: one}}\nrules:\n  - name: every\n    match: {{stream: CHORUS_LIFECYCLE}}\n",
        state.path().display()
    ))
    .unwrap();
    admin.publish(alive("node1.acme.net", 1)).await.unwrap();
    let reactor_backbone = backbone(&server, "acme-reactor", &pki).await;
    let mut reactor = Reactor::start(reactor_backbone, None, config, false, Shutdown::new()).await.unwrap();
    eventually("the reactor's firing recorded", Duration::from_secs(60), || {
        let admin = &*admin;
        async move {
            match admin.stream_info("CHORUS_REACTOR").await {
                Ok(info) if info.messages >= 1 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(!reactor.failed(), "{:?}", reactor.health());
    reactor.stop().await.unwrap();

    let (consumer, mut violations) = watched(&server, "acme-consumer", &pki).await;
    consumer.publish("chorus.reactor.fired.every", "forged".into()).await.unwrap();
    consumer.flush().await.unwrap();
    expect_violation(&mut violations, "publish", "chorus.reactor.fired.every").await;
    // No role but admin and replicator makes streams: one on a reply subject would read it.
    consumer.publish("$JS.API.STREAM.CREATE.SNOOP", "{}".into()).await.unwrap();
    consumer.flush().await.unwrap();
    expect_violation(&mut violations, "publish", "$JS.API.STREAM.CREATE.SNOOP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = start_broker(dir.path(), &pki, true);
    let mut without = nats_config(&server, "acme-agent", &pki);
    without.request_timeout = Duration::from_secs(5);
    assert!(without.connect(None).await.is_err(), "no client certificate, yet connected");

    let mut with = nats_config(&server, "acme-agent", &pki);
    with.tls = Some(TlsClientConfig {
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
        ..TlsClientConfig::with_ca(pki.ca.clone())
    });
    let client = with.connect(None).await.unwrap();
    client.flush().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Source addresses: listen address and nftables, inside a network namespace of our own
// ---------------------------------------------------------------------------------------

/// nats-server started through `unshare --net`, so it lives in a fresh network namespace
/// (only its own loopback interface); optionally with nftables rules loaded in that namespace.
struct NamespacedServer {
    child: Child,
    ns: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NamespacedServer {
    fn start(conf: &str, nftables: Option<&str>) -> Self {
        Self::start_with(conf, nftables, None, "")
    }

    /// As [`NamespacedServer::start`], with shell `setup` run first in the namespace (e.g.
    /// more addresses on `lo`) and, with `edge`, a second nats-server beside the first. Both
    /// run in a PID namespace of their own too, so they die together with the test.
    fn start_with(conf: &str, nftables: Option<&str>, edge: Option<&str>, setup: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf_path = dir.path().join("nats-server.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let edge_path = dir.path().join("edge.conf");
        if let Some(edge) = edge {
            std::fs::write(&edge_path, edge).unwrap();
        }
        let nft_path = dir.path().join("rules.nft");
        if let Some(rules) = nftables {
            std::fs::write(&nft_path, rules).unwrap();
        }
        let log = dir.path().join("log");
        let out = std::fs::File::create(&log).unwrap();
        let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
        // Refuses to go on unless it really is in a namespace other than the host's, so
        // nothing below can touch the host's interfaces or firewall.
        let script = r#"set -e
[ "$(readlink /proc/self/ns/net)" != "$HOST_NS" ] || { echo "not in a new network namespace" >&2; exit 97; }
ip link set lo up
eval "$SETUP"
if [ -n "$NFT_RULES" ]; then nft -f "$NFT_RULES"; fi
if [ -n "$EDGE_CONF" ]; then "$NATS_SERVER" -c "$EDGE_CONF" & fi
"$NATS_SERVER" -c "$NATS_CONF""#;
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "--pid", "--fork", "--kill-child", "--", "sh", "-c", script])
            .env("HOST_NS", &host_ns)
            .env("SETUP", setup)
            .env("EDGE_CONF", if edge.is_some() { edge_path.as_os_str() } else { std::ffi::OsStr::new("") })
            .env("NFT_RULES", if nftables.is_some() { nft_path.as_os_str() } else { std::ffi::OsStr::new("") })
            .env("NATS_SERVER", nats_server_binary().unwrap())
            .env("NATS_CONF", &conf_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // SAFETY: prctl only, async-signal-safe; the server dies with the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("unshare (util-linux) runs");
        let ns = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let mut server = NamespacedServer { child, ns, log, _dir: dir };
        // Until unshare(2) has run, the child's namespace is still the host's.
        eventually_blocking("the server in a new network namespace", Duration::from_secs(30), || {
            if std::fs::read_link(&server.ns).is_ok_and(|ns| ns != host_ns) {
                return Ok(());
            }
            server.assert_running();
            Err(format!("no new network namespace: {}", server.log_text()))
        });
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("namespaced nats-server exited ({status}):\n{}", self.log_text());
        }
    }

    /// Runs `work` on a thread of its own inside the namespace (sockets it opens are the
    /// namespace's), on a runtime of that thread.
    fn run<T: Send + 'static, F: std::future::Future<Output = std::io::Result<T>>>(
        &self,
        work: impl FnOnce() -> F + Send + 'static,
    ) -> std::io::Result<T> {
        let ns = self.ns.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&ns)?;
            // SAFETY: setns on this thread only, into the server's namespace, which we created.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(work())
        })
        .join()
        .unwrap()
    }

    /// Connects from `from` to `to` inside the namespace and returns the server's first line
    /// (its INFO), or the connection error.
    fn connect(&self, from: IpAddr, to: SocketAddr, read_info: bool) -> std::io::Result<String> {
        self.run(move || async move {
            let socket = match from {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(from, 0))?;
            let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
            if !read_info {
                return Ok(String::new());
            }
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok(line)
        })
    }

    /// Waits until a client from `from` gets the server's INFO on `to`.
    fn wait_ready(&mut self, from: IpAddr, to: SocketAddr) {
        let what = format!("the server's INFO on {to} for a client from {from}");
        eventually_blocking(&what, Duration::from_secs(30), || {
            self.assert_running();
            match self.connect(from, to, true) {
                Ok(info) if info.starts_with("INFO ") => Ok(()),
                other => Err(format!("not ready: {other:?}\n{}", self.log_text())),
            }
        })
    }
}

impl Drop for NamespacedServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn plain_broker(store: &Path, listen: &str, extra: &str) -> BrokerConfig {
    generate(&format!(
        r#"
listen: "{listen}"
jetstream: {{store_dir: {store}}}
bcrypt_cost: 4
{extra}
tenants:
  acme:
    collectives: [acme]
    users: [{{user: acme-agent, role: agent, password: acme-agent-pw}}]
"#,
        store = store.display()
    ))
}

fn refused(result: std::io::Result<String>) -> bool {
    matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// nats-server has no per-user source-address list; binding the listener to one address
/// keeps the port off every other address of the host.
#[test]
fn a_broker_listening_on_one_address_refuses_the_others() {
    let store = tempfile::tempdir().unwrap();
    let conf = plain_broker(store.path(), "127.0.0.2:4222", "").render_nats_conf().unwrap();
    let mut server = NamespacedServer::start(&conf, None);
    let lo1: IpAddr = "127.0.0.1".parse().unwrap();
    let lo2: IpAddr = "127.0.0.2".parse().unwrap();
    server.wait_ready(lo2, "127.0.0.2:4222".parse().unwrap());
    let on_other = server.connect(lo1, "127.0.0.1:4222".parse().unwrap(), true);
    assert!(refused(on_other), "connected on an address the broker does not listen on");
    let from_other = server.connect(lo1, "127.0.0.2:4222".parse().unwrap(), true).unwrap();
    assert!(from_other.starts_with("INFO "), "the listen address alone does not filter sources: {from_other}");
}

/// The generated nftables rules let only the configured networks reach the client and
/// monitoring ports; other sources get a TCP reset.
#[test]
fn generated_nftables_rules_admit_only_the_configured_networks() {
    let store = tempfile::tempdir().unwrap();
    let config = plain_broker(
        store.path(),
        "0.0.0.0:4222",
        "monitor: 127.0.0.1:8222\nfirewall: {allowed_clients: [127.0.0.2/32, 127.0.1.0/24], allowed_monitor: [127.0.0.1]}",
    );
    let rendered = config.render().unwrap();
    let mut server = NamespacedServer::start(&rendered.nats_conf, Some(rendered.nftables.as_deref().unwrap()));
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let client_port: SocketAddr = "127.0.0.1:4222".parse().unwrap();
    let monitor_port: SocketAddr = "127.0.0.1:8222".parse().unwrap();
    server.wait_ready(ip("127.0.0.2"), client_port);

    assert!(
        server.connect(ip("127.0.1.77"), client_port, true).unwrap().starts_with("INFO "),
        "a source in 127.0.1.0/24 is allowed"
    );
    for source in ["127.0.0.1", "127.0.0.3", "127.0.2.1"] {
        assert!(refused(server.connect(ip(source), client_port, true)), "{source} reached the client port");
    }
    server.connect(ip("127.0.0.1"), monitor_port, false).expect("the monitoring port admits 127.0.0.1");
    assert!(refused(server.connect(ip("127.0.0.2"), monitor_port, false)), "127.0.0.2 reached the monitoring port");
}

/// Choria's client networks: the same client user connecting from a client network gets its
/// permissions (the main server); from anywhere else it lands on the edge server with
/// node-only permissions: it cannot send requests or read replies (refused by the broker and
/// logged as permissions violations) while an agent connecting from there still answers
/// requests and stores events through the edge's leafnode link.
#[test]
fn connections_from_outside_the_client_networks_get_node_only_permissions() {
    let store = tempfile::tempdir().unwrap();
    let config = generate(&format!(
        r#"
server_name: hq
listen: "0.0.0.0:4222"
jetstream: {{store_dir: {store}}}
bcrypt_cost: 4
client_networks: {{networks: [10.1.0.0/16], internal_port: 4223, leafnode_port: 7422}}
tenants:
  acme:
    collectives: [acme]
    users:
      - {{user: acme-agent, role: agent, password: acme-agent-pw}}
      - {{user: acme-client, role: client, password: acme-client-pw, callerid: up=alice}}
      - {{user: acme-admin, role: admin, password: acme-admin-pw}}
"#,
        store = store.path().display()
    ));
    let rendered = config.render().unwrap();
    let mut server = NamespacedServer::start_with(
        &rendered.nats_conf,
        rendered.nftables.as_deref(),
        rendered.edge_conf.as_deref(),
        "ip addr add 10.1.0.1/32 dev lo; ip addr add 10.9.0.1/32 dev lo",
    );
    let (inside, outside): (IpAddr, IpAddr) = ("10.1.0.1".parse().unwrap(), "10.9.0.1".parse().unwrap());
    let port = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    server.wait_ready(inside, port(inside, 4222));
    server.wait_ready(outside, port(outside, 4222));
    let info = |from: IpAddr| server.connect(from, port(from, 4222), true).unwrap();
    assert!(info(inside).contains(r#""server_name":"hq""#), "a client network reaches the main server");
    assert!(info(outside).contains(r#""server_name":"hq-edge""#), "other sources reach the edge server");
    assert!(refused(server.connect(outside, port(outside, 4223), true)), "the internal port is the client networks'");

    let violations = server
        .run(move || async move {
            let connect = |ip: IpAddr, user: &str| {
                let (tx, rx) = mpsc::unbounded_channel();
                let options = async_nats::ConnectOptions::with_user_and_password(user.into(), pw(user)).event_callback(
                    move |event| {
                        let tx = tx.clone();
                        async move {
                            if let async_nats::Event::ServerError(e) = event {
                                tx.send(e.to_string()).ok();
                            }
                        }
                    },
                );
                async move {
                    let client = options.connect(format!("nats://{ip}:4222")).await.map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>((client, rx))
                }
            };
            fn io(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> std::io::Error {
                std::io::Error::other(e)
            }
            let (admin, _) = connect(inside, "acme-admin").await?;
            let (alice, _) = connect(inside, "acme-client").await?;
            let (agent, _) = connect(outside, "acme-agent").await?;
            let (stranger, mut errors) = connect(outside, "acme-client").await?;

            // The agent outside answers a request the client inside sends.
            let mut requests = agent.subscribe("acme.broadcast.agent.rpcutil").await.map_err(io)?;
            agent.flush().await.map_err(io)?;
            let answering = agent.clone();
            tokio::spawn(async move {
                while let Some(request) = requests.next().await {
                    if let Some(reply) = request.reply {
                        answering.publish(reply, "pong".into()).await.ok();
                    }
                }
            });
            let inbox = format!("acme.reply.{}.test", chorus_identity::reply_token("up=alice"));
            let mut replies = alice.subscribe(inbox.clone()).await.map_err(io)?;
            let answered = tokio::time::timeout(Duration::from_secs(30), async {
                // Until the leafnode link carries the agent's interest, requests find nobody.
                loop {
                    alice.publish_with_reply("acme.broadcast.agent.rpcutil", inbox.clone(), "ping".into()).await.ok();
                    alice.flush().await.ok();
                    // (A "no responders" status comes back while nobody listens.)
                    if let Ok(Some(reply)) = tokio::time::timeout(Duration::from_millis(500), replies.next()).await {
                        if reply.status.is_none() {
                            return reply;
                        }
                    }
                }
            })
            .await
            .map_err(|_| io("no answer from the agent outside"))?;
            assert_eq!(&answered.payload[..], b"pong");

            // The agent outside stores an event in the main server's JetStream.
            let js = async_nats::jetstream::new(admin);
            js.create_stream(async_nats::jetstream::stream::Config {
                name: "CHORUS_LIFECYCLE".into(),
                subjects: vec!["choria.lifecycle.>".into()],
                ..Default::default()
            })
            .await
            .map_err(io)?;
            let agent_js = async_nats::jetstream::new(agent);
            // The stream's subjects reach the edge over the leafnode a moment after the stream
            // is made; until then a publish there has no responder (StreamNotFound): polled.
            let ack = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match agent_js.publish("choria.lifecycle.event.alive.server", "{}".into()).await?.await {
                        Err(e) if e.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        other => break other,
                    }
                }
            })
            .await
            .map_err(|_| io("no JetStream acknowledgement through the edge"))?
            .map_err(io)?;
            assert_eq!(ack.stream, "CHORUS_LIFECYCLE");

            // The same client user from outside: no requests, no replies.
            stranger.publish("acme.broadcast.agent.rpcutil", "ping".into()).await.map_err(io)?;
            stranger.publish("acme.node.web1.acme.net", "ping".into()).await.map_err(io)?;
            let _eavesdrop =
                stranger.subscribe(format!("acme.reply.{}.>", chorus_identity::reply_token("up=alice"))).await;
            stranger.flush().await.map_err(io)?;
            let mut seen = Vec::new();
            tokio::time::timeout(Duration::from_secs(30), async {
                while seen.len() < 3 {
                    match errors.recv().await {
                        Some(e) if e.to_lowercase().contains("permissions violation") => seen.push(e),
                        Some(_) => {}
                        None => break,
                    }
                }
            })
            .await
            .map_err(|_| io(format!("violations seen: {seen:?}")))?;
            Ok(seen)
        })
        .unwrap();
    let joined = violations.join("\n").to_lowercase();
    assert!(joined.contains(r#"publish to "acme.broadcast.agent.rpcutil""#), "{joined}");
    assert!(joined.contains(r#"publish to "acme.node.web1.acme.net""#), "{joined}");
    assert!(joined.contains("subscription to"), "{joined}");
    // The broker's log records each refusal.
    eventually_blocking("the edge server's log of the violations", Duration::from_secs(30), || {
        let log = server.log_text();
        if log.matches("Violation").count() >= 3 {
            Ok(())
        } else {
            Err(log)
        }
    });
}
