//! The identity threats of docs/SECURITY.md, each against a real nats-server running the
//! broker's generated configuration: the attack is refused and audited (by the node, the
//! broker or the client, as the table says) while the legitimate request in the same test
//! still succeeds.
//!
//! The fleet: tenant `acme` with broker users for a node agent, for alice and bob (client
//! users bound to their caller ids) and an administrator; one node agent, `node1.acme.net`,
//! with its own key and node credential, trusting one issuer; its policy lets alice run any
//! `rpcutil` action and bob `ping`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_consumers::inventory::Inventory;
use chorus_consumers::projection::{ProjectorOptions, Store};
use chorus_identity::{Credential, CredentialSpec, Identity};
use chorus_keys::{FileSigner, KeyConfig, Signer};
use chorus_platform::deadletter::DeadLetter;
use chorus_platform::{ensure_platform_streams, to_message, StreamLimits};
use chorus_producers::agent::{AgentConfig, NodeAgent};
use chorus_rpc::client::CallerSigner;
use chorus_rpc::transport::{node_subject, reply_inbox};
use chorus_rpc::{NatsTransport, ReplyEnvelope, RequestEnvelope, RequestOptions, RpcClient, Target};
use chorus_runtime::{Service as _, Shutdown};
use chorus_schemas::lifecycle::Alive;
use chorus_schemas::signature::Verifier;
use chorus_schemas::subject::{CHORUS_DEADLETTER, CHORUS_LIFECYCLE};
use chorus_schemas::{AuditAction, AuditRecord, EventRecord, RpcReply, RpcRequest, StatusCode};
use chorus_testkit::conformance::read_all;
use chorus_testkit::nats::NatsServer;
use chorus_testkit::{eventually, eventually_blocking};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::aaa::audit_records_of;
use crate::cli::chorus;
use crate::issuer::TestIssuer;
use crate::tenants::{as_user, broker};

const NODE: &str = "node1.acme.net";
const DAY: Duration = Duration::from_secs(86_400);

struct Fleet {
    server: NatsServer,
    _dir: tempfile::TempDir,
    issuer: TestIssuer,
    admin: Arc<dyn Backbone>,
    agent: NodeAgent,
    /// The node's key and credential files, as its configuration names them.
    node_key: KeyConfig,
    node_credential: std::path::PathBuf,
}

impl Fleet {
    async fn start() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let server = broker(
            &dir.path().join("unused"),
            r#"  acme:
    collectives: [acme]
    users:
      - {user: acme-admin, role: admin, password: acme-admin-pw}
      - {user: acme-agent, role: agent, password: acme-agent-pw}
      - {user: acme-alice, role: client, password: acme-alice-pw, callerid: up=alice}
      - {user: acme-bob, role: client, password: acme-bob-pw, callerid: up=bob}
"#,
        );
        let admin: Arc<dyn Backbone> =
            Arc::new(JetStreamBackbone::connect(&as_user(&server, "acme-admin")).await.unwrap());
        ensure_platform_streams(&*admin, &StreamLimits::default()).await.unwrap();

        let issuer = TestIssuer::new();
        let policies = dir.path().join("policy");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("rpcutil.policy"),
            "policy default deny\nallow\tup=alice\t*\t*\t*\nallow\tup=bob\tping\t*\t*\n",
        )
        .unwrap();
        let (node_key, node_credential) = issuer.node_files(dir.path(), NODE);
        let mut config = AgentConfig::new(NODE, dir.path().join("node1"));
        config.collective = "acme".into();
        config.site = Some("london".into());
        config.nats = Some(as_user(&server, "acme-agent"));
        config.policy_dir = Some(policies);
        config.security.issuers = vec![issuer.write_public(dir.path())];
        config.security.key = Some(node_key.clone());
        config.security.credential = Some(node_credential.clone());
        config.security.max_request_ttl = Duration::from_secs(300);
        let agent = NodeAgent::start(config, Shutdown::new()).await.unwrap();
        Fleet { server, _dir: dir, issuer, admin, agent, node_key, node_credential }
    }

    /// A raw connection of broker user `user`.
    async fn connect(&self, user: &str) -> async_nats::Client {
        as_user(&self.server, user).connect(None).await.unwrap()
    }

    /// An RPC client on broker user `user` signing with `identity`, believing only replies
    /// signed by nodes of the fleet's issuer.
    async fn client(&self, user: &str, identity: Identity) -> RpcClient {
        RpcClient::signed(Arc::new(NatsTransport::new(self.connect(user).await)), identity, "acme")
            .with_trust(self.issuer.issuers())
            .with_senderid("laptop.acme.net")
    }

    /// Alice as she is: her own key, a credential of the fleet's issuer, her broker user.
    async fn alice(&self) -> RpcClient {
        self.client("acme-alice", self.issuer.client("up=alice", &["rpcutil.*"])).await
    }

    /// The node's audit record of request `requestid`, once it has arrived.
    async fn audited(&self, requestid: &str) -> AuditRecord {
        eventually("the node's audit record of the request", Duration::from_secs(30), || {
            let admin = &*self.admin;
            async move {
                audit_records_of(admin, NODE)
                    .await
                    .into_iter()
                    .map(|(_, r)| r)
                    .find(|r| r.request.get("requestid").and_then(|v| v.as_str()) == Some(requestid))
                    .ok_or_else(|| format!("no audit record of {requestid} yet"))
            }
        })
        .await
    }

    async fn stop(mut self) {
        self.agent.stop().await.unwrap();
    }
}

fn to_node(expected: usize) -> RequestOptions {
    RequestOptions {
        target: Target::Node(NODE.into()),
        expected: Some(expected),
        timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// The legitimate request: alice pings the node, which answers, signed, `Ok`.
async fn alice_pings(fleet: &Fleet) {
    let results = fleet.alice().await.call("rpcutil", "ping", Default::default(), to_node(1)).await.unwrap();
    assert_eq!(results.summary.ok, 1, "alice's own request: {:?} {:?}", results.summary, results.rejected);
    assert_eq!(results.summary.unverified, 0);
}

/// The node's one reply to a refused request, and the refusal's audit record; asserts the
/// refusal names `code` in both.
async fn refused(fleet: &Fleet, client: &RpcClient, action: &str, options: RequestOptions, code: &str) -> AuditRecord {
    let results = client.call("rpcutil", action, Default::default(), options).await.unwrap();
    assert_eq!(results.replies.len(), 1, "{:?} {:?}", results.summary, results.rejected);
    let reply = &results.replies[0];
    assert_eq!((reply.statuscode, reply.authorized), (StatusCode::Aborted, false), "{reply:?}");
    let policy = reply.policy.as_deref().unwrap_or_default();
    assert!(policy.starts_with(&format!("request refused ({code})")), "{policy}");
    let record = fleet.audited(&results.request.requestid).await;
    assert_eq!((record.action, record.code.as_deref()), (AuditAction::Deny, Some(code)), "{record:?}");
    assert_eq!(record.callerid, results.request.callerid);
    record
}

/// Someone with alice's broker password but not her key: claiming her caller id with a
/// credential of their own, or with none, is refused before the policy is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_caller_id_is_refused_and_audited() {
    let fleet = Fleet::start().await;
    let transport = Arc::new(NatsTransport::new(fleet.connect("acme-alice").await));
    let mallory = fleet.issuer.client("up=mallory", &["*"]);
    let claims_alice = RpcClient::new(transport.clone(), "up=alice", "acme")
        .with_request_signer(Arc::new(CallerSigner(mallory)))
        .with_trust(fleet.issuer.issuers());
    let record = refused(&fleet, &claims_alice, "ping", to_node(1), "caller_mismatch").await;
    assert!(record.reason.as_deref().unwrap().contains("up=mallory"), "{record:?}");

    let unsigned = RpcClient::new(transport, "up=alice", "acme").with_trust(fleet.issuer.issuers());
    refused(&fleet, &unsigned, "ping", to_node(1), "unsigned").await;

    alice_pings(&fleet).await;
    fleet.stop().await;
}

/// A credential for alice made by an issuer the node does not trust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_from_another_issuer_is_refused_and_audited() {
    let fleet = Fleet::start().await;
    let rogue = TestIssuer::new();
    let forged = fleet.client("acme-alice", rogue.client("up=alice", &["*"])).await;
    refused(&fleet, &forged, "ping", to_node(1), "unknown_issuer").await;
    alice_pings(&fleet).await;
    fleet.stop().await;
}

/// Alice's key with a credential the issuer gave it two days ago for one day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_credential_is_refused_and_audited() {
    let fleet = Fleet::start().await;
    let key = FileSigner::random(chorus_keys::Algorithm::Ed25519);
    let spec = CredentialSpec::client("up=alice", key.public_key().clone(), DAY);
    let issued = chrono::Utc::now().timestamp() - 2 * 86_400;
    let expired = Credential::issue(&fleet.issuer.key, &spec, issued).unwrap();
    let stale = fleet.client("acme-alice", Identity::new(Arc::new(key), expired).unwrap()).await;
    let record = refused(&fleet, &stale, "ping", to_node(1), "credential_expired").await;
    assert!(record.reason.as_deref().unwrap().contains("caller credential"), "{record:?}");
    alice_pings(&fleet).await;
    fleet.stop().await;
}

/// Alice's signed request, captured on the wire and sent again within its TTL, exactly as it
/// was (same reply subject too): the node ran it once and refuses the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_replayed_within_its_ttl_runs_once() {
    let fleet = Fleet::start().await;
    let wire = fleet.connect("acme-admin").await;
    let mut tap = wire.subscribe(node_subject("acme", NODE)).await.unwrap();
    wire.flush().await.unwrap();

    let results = fleet.alice().await.call("rpcutil", "ping", Default::default(), to_node(1)).await.unwrap();
    assert_eq!(results.summary.ok, 1, "{:?}", results.summary);
    let captured = tap.next().await.unwrap();
    let reply_to = captured.reply.clone().expect("requests ask for replies");

    // The copy, from whoever captured it, with replies watched where the original's went.
    let mut replies = wire.subscribe(reply_to.clone()).await.unwrap();
    wire.publish_with_reply(captured.subject.clone(), reply_to, captured.payload.clone()).await.unwrap();
    wire.flush().await.unwrap();
    let answer = replies.next().await.unwrap();
    let envelope: ReplyEnvelope = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(envelope.reply.requestid, results.request.requestid);
    assert!(!envelope.reply.authorized, "{:?}", envelope.reply);
    assert!(
        envelope.reply.policy.as_deref().unwrap().starts_with("request refused (replayed)"),
        "{:?}",
        envelope.reply
    );

    let record = fleet.audited(&results.request.requestid).await;
    assert_eq!((record.action, record.code.as_deref()), (AuditAction::Deny, Some("replayed")));
    // Run once: the node counted one allowed ping and one refusal.
    let audit = audit_records_of(&*fleet.admin, NODE).await;
    assert_eq!(audit.len(), 1, "{audit:#?}");
    alice_pings(&fleet).await;
    fleet.stop().await;
}

/// A request asking to stay valid for an hour, past the node's five minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_above_the_maximum_is_refused_and_audited() {
    let fleet = Fleet::start().await;
    let long = RequestOptions { ttl: 3600, ..to_node(1) };
    let record = refused(&fleet, &fleet.alice().await, "ping", long, "ttl_too_long").await;
    assert!(record.reason.as_deref().unwrap().contains("300"), "{record:?}");
    alice_pings(&fleet).await;
    fleet.stop().await;
}

/// Alice's credential allows `rpcutil.ping` only; the node's policy would let her run any
/// `rpcutil` action, but the credential is checked first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_outside_the_credential_is_refused_and_audited() {
    let fleet = Fleet::start().await;
    let narrow = fleet.client("acme-alice", fleet.issuer.client("up=alice", &["rpcutil.ping"])).await;
    refused(&fleet, &narrow, "inventory", to_node(1), "agent_not_allowed").await;
    let results = narrow.call("rpcutil", "ping", Default::default(), to_node(1)).await.unwrap();
    assert_eq!(results.summary.ok, 1, "{:?}", results.summary);
    fleet.stop().await;
}

/// node1's key (and credential) signing an event that claims to be node2's: a verifying
/// view dead-letters it as `wrong_identity` and keeps node2 as node2's own key says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_key_cannot_sign_another_nodes_events() {
    let fleet = Fleet::start().await;
    let node1 =
        Identity::load(&fleet.node_key, &fleet.node_credential, chorus_identity::Role::Node, Some(NODE)).unwrap();
    let node2 = fleet.issuer.node("node2.acme.net");
    let alive = |identity: &Identity, claims: &str, version: &str, seq: u64| {
        EventRecord::new(Alive::new(claims, "server", version, Some(300)), seq)
            .signed(identity.signer().as_ref(), Some(identity.token()))
            .unwrap()
    };
    let genuine = alive(&node2, "node2.acme.net", "1.0.0", 1);
    let forged = alive(&node1, "node2.acme.net", "6.6.6", 2);
    // Published with the node agents' broker user, as a compromised node1 could.
    let agent_site: Arc<dyn Backbone> =
        Arc::new(JetStreamBackbone::connect(&as_user(&fleet.server, "acme-agent")).await.unwrap());
    agent_site.publish_batch(vec![to_message(&genuine).unwrap(), to_message(&forged).unwrap()]).await.unwrap();

    let store = Store::temporary().unwrap();
    let verifier = Arc::new(Verifier::new(fleet.issuer.issuers()));
    let options = ProjectorOptions { verifier: Some(verifier), ..Default::default() };
    let projector =
        tokio::sync::Mutex::new(Inventory::projector(fleet.admin.clone(), &store).unwrap().with_options(options));
    let inventory = Inventory::open(&store, Default::default()).unwrap();
    // The agent's own signed events (startup, ...) apply as well.
    eventually("node1's own events and both of node2's processed", Duration::from_secs(30), || {
        let (projector, inventory, admin) = (&projector, &inventory, &*fleet.admin);
        async move {
            projector.lock().await.catch_up().await.map_err(|e| e.to_string())?;
            let now = chrono::Utc::now();
            let node1 = inventory.get(NODE, now).map_err(|e| e.to_string())?;
            let letters = read_all(admin, CHORUS_DEADLETTER).await.len();
            if node1.is_some() && letters >= 1 {
                Ok(())
            } else {
                Err(format!("node1 seen: {}, dead letters: {letters}", node1.is_some()))
            }
        }
    })
    .await;
    let node2 = inventory.get("node2.acme.net", chrono::Utc::now()).unwrap().expect("node2's own event applies");
    assert_eq!(node2.node.version.as_deref(), Some("1.0.0"), "the forged event changed node2");
    let letters: Vec<DeadLetter> =
        read_all(&*fleet.admin, CHORUS_DEADLETTER).await.iter().map(|m| DeadLetter::from_message(m).unwrap()).collect();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!((letters[0].code.as_str(), letters[0].stream.as_str()), ("wrong_identity", CHORUS_LIFECYCLE));
    assert!(letters[0].reason.contains("node2.acme.net"), "{}", letters[0].reason);
    alice_pings(&fleet).await;
    fleet.stop().await;
}

/// Bob, a client of the same tenant, can neither subscribe to alice's replies (the broker
/// refuses it) nor have the node send his request's replies to her subject (the node refuses
/// and audits it); each of them still gets their own replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_replies_cannot_be_read_or_redirected() {
    let fleet = Fleet::start().await;
    let (tx, mut violations) = mpsc::unbounded_channel();
    let bob_wire = async_nats::ConnectOptions::with_user_and_password("acme-bob".into(), "acme-bob-pw".into())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    tx.send(e.to_string()).ok();
                }
            }
        })
        .connect(fleet.server.url())
        .await
        .unwrap();
    let alices = format!("acme.reply.{}.>", chorus_identity::reply_token("up=alice"));
    let _eavesdrop = bob_wire.subscribe(alices.clone()).await.unwrap();
    bob_wire.flush().await.unwrap();
    let wanted = format!("permissions violation for subscription to \"{alices}\"").to_lowercase();
    let violation = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = violations.recv().await {
            if e.to_lowercase().contains(&wanted) {
                return e;
            }
        }
        panic!("connection closed without a violation")
    })
    .await
    .expect("the broker refused bob's subscription to alice's replies");
    assert!(violation.to_lowercase().contains("permissions violation"), "{violation}");

    // Bob signs his own request but asks for the replies on alice's subject.
    let bob = fleet.issuer.client("up=bob", &["rpcutil.*"]);
    let request = RpcRequest::new("up=bob", "bobs-laptop.acme.net", "acme", "rpcutil", "ping", Default::default());
    let envelope = RequestEnvelope::signed(request.clone(), &bob).unwrap();
    bob_wire
        .publish_with_reply(
            node_subject("acme", NODE),
            reply_inbox("acme", "up=alice"),
            Bytes::from(serde_json::to_vec(&envelope).unwrap()),
        )
        .await
        .unwrap();
    bob_wire.flush().await.unwrap();
    let record = fleet.audited(&request.requestid).await;
    assert_eq!((record.action, record.code.as_deref()), (AuditAction::Deny, Some("reply_subject_not_bound")));

    alice_pings(&fleet).await;
    let bobs_own = fleet.client("acme-bob", bob).await;
    let results = bobs_own.call("rpcutil", "ping", Default::default(), to_node(1)).await.unwrap();
    assert_eq!(results.summary.ok, 1, "bob's own request: {:?}", results.summary);
    fleet.stop().await;
}

/// Replies claiming to come from a node, sent by whoever can publish on reply subjects (here
/// a node agents' broker account): unsigned, signed by a real node key for another identity,
/// and signed under an untrusted issuer. The client counts each as unverified, never as a
/// reply; the real node's reply in the same call is ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reply_is_counted_unverified_never_ok() {
    let fleet = Fleet::start().await;
    const GHOST: &str = "ghost.acme.net";
    let forger = fleet.connect("acme-agent").await;
    let mut requests = forger.subscribe(node_subject("acme", GHOST)).await.unwrap();
    forger.flush().await.unwrap();
    let node1 =
        Identity::load(&fleet.node_key, &fleet.node_credential, chorus_identity::Role::Node, Some(NODE)).unwrap();
    let rogue = TestIssuer::new().node(GHOST);
    let forging = tokio::spawn(async move {
        let message = requests.next().await.unwrap();
        let envelope: RequestEnvelope = serde_json::from_slice(&message.payload).unwrap();
        let reply = RpcReply::new(&envelope.request, GHOST, StatusCode::Ok, Default::default());
        let to = message.reply.unwrap();
        let forgeries = [
            serde_json::to_vec(&reply).unwrap(),
            serde_json::to_vec(&ReplyEnvelope::signed(reply.clone(), &node1).unwrap()).unwrap(),
            serde_json::to_vec(&ReplyEnvelope::signed(reply.clone(), &rogue).unwrap()).unwrap(),
        ];
        for payload in forgeries {
            forger.publish(to.clone(), Bytes::from(payload)).await.unwrap();
        }
        forger.flush().await.unwrap();
    });

    // Both nodes asked; the call lasts until its timeout, as the ghost never verifiably answers.
    let options = RequestOptions {
        target: Target::Nodes(vec![NODE.into(), GHOST.into()]),
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let results = fleet.alice().await.call("rpcutil", "ping", Default::default(), options).await.unwrap();
    forging.await.unwrap();
    assert_eq!(results.summary.ok, 1, "{:?}", results.summary);
    assert_eq!(results.replies.len(), 1);
    assert_eq!(results.replies[0].identity, NODE);
    assert_eq!(results.summary.unverified, 3, "{:?} {:?}", results.summary, results.rejected);
    assert!(results.rejected.iter().all(|r| r.identity == GHOST), "{:?}", results.rejected);
    let reasons: Vec<&str> = results.rejected.iter().map(|r| r.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("unsigned") || r.contains("not signed")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains(NODE)), "the node1-signed forgery names node1: {reasons:?}");
    fleet.stop().await;
}

/// The operator's path of docs/SECURITY.md, with the `chorus` binary only: an issuer key, a
/// node key (P-256) and its node credential, a caller's key and a credential for `ping`
/// only, a `chorus agent` that checks callers, and `chorus rpc`: the signed ping succeeds and
/// is verified; the same caller id unsigned, and an action outside the credential, are
/// refused with their codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_path_keys_credentials_agent_and_rpc_on_the_command_line() {
    let server = NatsServer::start().unwrap();
    let site: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    ensure_platform_streams(&*site, &StreamLimits::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).display().to_string();
    std::fs::create_dir_all(dir.path().join("issuers")).unwrap();
    std::fs::create_dir_all(dir.path().join("policy")).unwrap();
    let run = |args: &[&str]| {
        let (ok, out) = chorus(args);
        assert!(ok, "chorus {args:?}:\n{out}");
        out
    };
    run(&["keys", "new", "--key", &d("issuer.key"), "--public-out", &d("issuers/issuer.pem")]);
    run(&["keys", "new", "--key", &d("node.key"), "--algorithm", "p256", "--public-out", &d("node.pub")]);
    let issue = |role: &str, who: &str, public: &str, out: &str, more: &[&str]| {
        let (issuer, public, out) = (d("issuer.key"), d(public), d(out));
        let mut args = vec!["credential", "issue", "--issuer-key", &issuer, role, who];
        args.extend(["--public-key", &public, "--out", &out]);
        args.extend(more);
        run(&args);
    };
    issue("--node", "web1.example.net", "node.pub", "node.cred", &[]);
    run(&["keys", "new", "--key", &d("alice.key"), "--public-out", &d("alice.pub")]);
    issue("--client", "up=alice", "alice.pub", "alice.cred", &["--agents", "rpcutil.ping"]);
    let shown =
        run(&["credential", "verify", "--issuer", &d("issuers/issuer.pem"), "--role", "client", &d("alice.cred")]);
    assert!(shown.contains("up=alice"), "{shown}");

    std::fs::write(dir.path().join("policy/rpcutil.policy"), "policy default deny\nallow\tup=alice\t*\t*\t*\n")
        .unwrap();
    std::fs::write(
        dir.path().join("agent.yaml"),
        format!(
            "identity: web1.example.net\nstate_dir: {state}\npolicy_dir: {policy}\nnats: {{servers: [{url}]}}\n\
             security: {{issuers: [{issuers}], key: {{key_file: {key}}}, credential: {cred}}}\n",
            state = d("state"),
            policy = d("policy"),
            url = server.url(),
            issuers = d("issuers"),
            key = d("node.key"),
            cred = d("node.cred"),
        ),
    )
    .unwrap();
    let mut agent = std::process::Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
        .args(["agent", "--config", &d("agent.yaml")])
        .env("CHORUS_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();

    let url = server.url();
    let rpc = |action: &str, signed: bool| {
        let mut args = vec!["rpc", "rpcutil", action, "-I", "web1.example.net", "--nats", &url, "--json"];
        let (key, cred, issuers) = (d("alice.key"), d("alice.cred"), d("issuers"));
        if signed {
            args.extend(["--key", &key, "--credential", &cred]);
        } else {
            args.extend(["--callerid", "up=alice"]);
        }
        args.extend(["--issuer", &issuers, "--timeout", "5s"]);
        chorus(&args)
    };
    // Until the agent has subscribed, nobody answers.
    let out =
        eventually_blocking("the agent answering a signed ping", Duration::from_secs(60), || match rpc("ping", true) {
            (true, out) => Ok(out),
            (false, out) => Err(out),
        });
    assert!(out.contains("1 replies: 1 ok"), "{out}");
    let (ok, out) = rpc("ping", false);
    assert!(!ok && out.contains("request refused (unsigned)"), "{out}");
    let (ok, out) = rpc("inventory", true);
    assert!(!ok && out.contains("request refused (agent_not_allowed)"), "{out}");
    // Targeting by compound expression: a node that matches answers; a malformed expression
    // is an error before anything is sent.
    let (key, cred, issuers) = (d("alice.key"), d("alice.cred"), d("issuers"));
    let signed = ["--nats", &url, "--key", &key, "--credential", &cred, "--issuer", &issuers, "--timeout", "5s"];
    let select = |expression: &str| {
        let mut args = vec!["rpc", "rpcutil", "ping", "-S", expression, "--expect", "1"];
        args.extend(signed);
        chorus(&args)
    };
    let (ok, out) = select(r#"with("rpcutil") and not with("/^nginx/")"#);
    assert!(ok && out.contains("1 replies: 1 ok"), "{out}");
    let (ok, out) = select(r#"with("rpcutil") and"#);
    assert!(!ok && out.contains("compound filter") && out.contains("nothing was sent"), "{out}");
    // Replies shown as the action's DDL says (rpcutil: always), or as --display says.
    let shown = |display: Option<&str>| {
        let mut args = vec!["rpc", "rpcutil", "ping", "-I", "web1.example.net"];
        args.extend(signed);
        if let Some(display) = display {
            args.extend(["--display", display]);
        }
        let (ok, out) = chorus(&args);
        assert!(ok, "{out}");
        out
    };
    assert!(shown(None).contains("\"pong\""), "rpcutil's DDL displays every reply");
    assert!(!shown(Some("none")).contains("\"pong\""), "--display none shows the summary only");
    assert!(!shown(Some("failed")).contains("\"pong\""));
    // Chaining: the JSON replies of one request name the nodes of the next.
    let mut args = vec!["rpc", "rpcutil", "ping", "-I", "web1.example.net", "--json"];
    args.extend(signed);
    let (ok, out) = chorus(&args);
    assert!(ok, "{out}");
    let replies: String = out.lines().filter(|l| l.starts_with('{')).map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.path().join("answered.jsonl"), replies).unwrap();
    let answered = d("answered.jsonl");
    let mut args = vec!["rpc", "rpcutil", "ping", "--nodes", &answered];
    args.extend(signed);
    let (ok, out) = chorus(&args);
    assert!(ok && out.contains("1 replies: 1 ok"), "{out}");
    // Inputs are checked against the agent's DDL before anything is sent.
    let mut args = vec!["rpc", "rpcutil", "get_fact", "facts=country"];
    args.extend(signed);
    let (ok, out) = chorus(&args);
    assert!(!ok && out.contains("invalid input") && out.contains("has not been declared"), "{out}");
    agent.kill().ok();
    agent.wait().ok();
}
