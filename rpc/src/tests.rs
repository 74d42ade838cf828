//! End-to-end RPC tests: real servers and clients over [`LocalTransport`] (and one over a
//! real nats-server), with events recorded in memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chorus_schemas::rpc::{Filter, JsonObject};
use chorus_schemas::{Event, RpcReply, RpcRequest, StatusCode};
use serde_json::json;

use super::agents::{RpcUtil, Shell};
use super::*;
use chorus_platform::{Emitter, MemorySink};

/// The RPC records a memory sink holds.
trait Recorded {
    fn requests(&self) -> Vec<RpcRequest>;
    fn replies(&self) -> Vec<RpcReply>;
}

impl Recorded for MemorySink {
    fn requests(&self) -> Vec<RpcRequest> {
        self.records()
            .into_iter()
            .filter_map(|r| match r.data {
                Event::RpcRequest(q) => Some(q),
                _ => None,
            })
            .collect()
    }

    fn replies(&self) -> Vec<RpcReply> {
        self.records()
            .into_iter()
            .filter_map(|r| match r.data {
                Event::RpcReply(q) => Some(q),
                _ => None,
            })
            .collect()
    }
}

const COLLECTIVE: &str = "choria";
const CALLER: &str = "up=bob";

fn node(identity: &str, country: &str) -> NodeContext {
    let mut n = NodeContext::new(identity, COLLECTIVE);
    n.facts.insert("country".into(), json!(country));
    n.classes = vec!["base".into()];
    n
}

fn agents() -> Vec<Arc<dyn Agent>> {
    vec![Arc::new(RpcUtil), Arc::new(Shell)]
}

fn write_policy(dir: &Path, agent: &str, text: &str) {
    std::fs::write(dir.join(format!("{agent}.policy")), text).unwrap();
}

/// A server hosting n1 (uk), n2 (de) and n3.example.net (uk), all recording into one sink.
async fn fleet(
    transport: Arc<dyn Transport>,
    policy_dir: Option<&Path>,
    wildcard_directed: bool,
    sink: Arc<MemorySink>,
) -> RpcServer {
    let options = ServerOptions { wildcard_directed, ..Default::default() };
    let server = RpcServer::new(transport, agents(), policy_dir.map(Path::to_path_buf), options).unwrap();
    for (identity, country) in [("n1", "uk"), ("n2", "de"), ("n3.example.net", "uk")] {
        let emitter = Arc::new(Emitter::new(sink.clone(), 1, None));
        server.add_node(node(identity, country), emitter, None).await.unwrap();
    }
    server
}

fn client(transport: Arc<dyn Transport>) -> RpcClient {
    RpcClient::new(transport, CALLER, COLLECTIVE).with_senderid("client.example.net")
}

fn options(timeout_ms: u64) -> RequestOptions {
    RequestOptions { timeout: Duration::from_millis(timeout_ms), ..Default::default() }
}

fn allow_bob(dir: &Path) {
    write_policy(dir, "rpcutil", "policy default deny\nallow\tup=bob\t*\t*\t*\n");
}

fn identities(replies: &[RpcReply]) -> Vec<String> {
    let mut ids: Vec<String> = replies.iter().map(|r| r.identity.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn broadcast_reaches_every_hosted_node_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let server = fleet(transport.clone(), Some(dir.path()), true, sink.clone()).await;

    let results = client(transport)
        .call("rpcutil", "ping", JsonObject::new(), RequestOptions { expected: Some(3), ..options(5000) })
        .await
        .unwrap();
    assert_eq!(identities(&results.replies), ["n1", "n2", "n3.example.net"]);
    for reply in &results.replies {
        assert_eq!(reply.statuscode, StatusCode::Ok, "{reply:?}");
        assert!(reply.authorized);
        assert!(reply.data["pong"].as_i64().unwrap() > 0);
        assert!(reply.policy.as_deref().unwrap().contains("rpcutil.policy:2"), "{reply:?}");
    }
    let s = &results.summary;
    assert_eq!((s.replies, s.ok, s.denied, s.failed, s.no_response), (3, 3, 0, 0, Some(0)));
    assert!(s.elapsed < Duration::from_secs(5), "stopped once all expected replied");

    // Each node recorded the request it acted on and its reply.
    let requests = sink.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.requestid == results.request.requestid));
    assert_eq!(identities(&sink.replies()), ["n1", "n2", "n3.example.net"]);
    let stats = server.stats();
    assert_eq!((stats.total, stats.passed, stats.replies, stats.denied), (3, 3, 3, 0));
}

#[tokio::test]
async fn without_policy_everything_is_denied_and_the_denials_recorded() {
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let server = fleet(transport.clone(), None, false, sink.clone()).await;

    let results = client(transport)
        .call("rpcutil", "ping", JsonObject::new(), RequestOptions { expected: Some(3), ..options(5000) })
        .await
        .unwrap();
    assert_eq!(results.replies.len(), 3);
    for reply in &results.replies {
        assert_eq!(reply.statuscode, StatusCode::Aborted);
        assert!(!reply.authorized);
        assert_eq!(reply.statusmsg, RpcReply::DENIED_MESSAGE);
        assert!(reply.policy.as_deref().unwrap().contains("no policy file for agent rpcutil"));
        assert!(reply.data.is_empty());
    }
    assert_eq!((results.summary.denied, results.summary.ok), (3, 0));

    assert_eq!(sink.requests().len(), 3);
    let recorded = sink.replies();
    assert_eq!(recorded.len(), 3);
    assert!(recorded.iter().all(|r| !r.authorized && r.policy.as_deref().unwrap().contains("no policy")));
    assert_eq!(server.stats().denied, 3);
}

#[tokio::test]
async fn shell_is_denied_unless_its_policy_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let _server = fleet(transport.clone(), Some(dir.path()), true, sink.clone()).await;
    let c = client(transport);
    let data = serde_json::from_value::<JsonObject>(json!({"command": "echo hi", "timeout_secs": 5})).unwrap();
    let opts = || RequestOptions { target: Target::Node("n1".into()), ..options(10_000) };

    let denied = c.call("shell", "run", data.clone(), opts()).await.unwrap();
    assert_eq!(denied.replies.len(), 1);
    assert!(!denied.replies[0].authorized);
    assert!(denied.replies[0].policy.as_deref().unwrap().starts_with("no policy file for agent shell"));

    write_policy(dir.path(), "shell", "allow\tup=bob\trun\tcountry=/^u/\tbase\n");
    // Policy files are re-read within a second of changing: asked again until it is.
    let reply = chorus_testkit::eventually("the new shell policy to apply", Duration::from_secs(10), || {
        let (c, data) = (&c, data.clone());
        async move {
            let ran = c.call("shell", "run", data, opts()).await.map_err(|e| e.to_string())?;
            let reply = ran.replies.into_iter().next().ok_or("no reply")?;
            if reply.authorized {
                Ok(reply)
            } else {
                Err(format!("still denied: {:?}", reply.policy))
            }
        }
    })
    .await;
    let reply = &reply;
    assert_eq!(reply.statuscode, StatusCode::Ok, "{reply:?}");
    assert_eq!(reply.data["stdout"], "hi\n");
    assert_eq!(reply.data["exitcode"], 0);
}

#[tokio::test]
async fn fact_filter_selects_matching_nodes_only() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let server = fleet(transport.clone(), Some(dir.path()), true, sink.clone()).await;

    let filter = Filter { fact: vec![parse_fact_filter("country=uk").unwrap()], ..Default::default() };
    let results = client(transport)
        .call("rpcutil", "ping", JsonObject::new(), RequestOptions { filter, ..options(300) })
        .await
        .unwrap();
    assert_eq!(identities(&results.replies), ["n1", "n3.example.net"]);
    assert_eq!(results.summary.no_response, None, "broadcast: nobody was expected");
    // The filtered node ignored it silently: no reply, no event.
    let n2 = server.node_stats(COLLECTIVE, "n2").unwrap();
    assert_eq!((n2.total, n2.filtered, n2.passed, n2.replies), (1, 1, 0, 0));
    assert_eq!(sink.requests().len(), 2);
}

#[tokio::test]
async fn directed_requests_reach_one_node() {
    for wildcard in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        allow_bob(dir.path());
        let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
        let sink = Arc::new(MemorySink::default());
        let server = fleet(transport.clone(), Some(dir.path()), wildcard, sink).await;
        let c = client(transport);

        let target = Target::Node("n3.example.net".into());
        let results =
            c.call("rpcutil", "ping", JsonObject::new(), RequestOptions { target, ..options(5000) }).await.unwrap();
        assert_eq!(identities(&results.replies), ["n3.example.net"], "wildcard {wildcard}");
        assert_eq!(results.summary.no_response, Some(0));
        assert_eq!(server.node_stats(COLLECTIVE, "n1").unwrap().total, 0);

        // Several nodes by name; one of them does not exist.
        let target = Target::Nodes(vec!["n1".into(), "n2".into(), "ghost".into()]);
        let results =
            c.call("rpcutil", "ping", JsonObject::new(), RequestOptions { target, ..options(300) }).await.unwrap();
        assert_eq!(identities(&results.replies), ["n1", "n2"]);
        assert_eq!(results.summary.no_response, Some(1));

        // A node removed no longer answers.
        assert!(server.remove_node(COLLECTIVE, "n1"));
        let target = Target::Node("n1".into());
        let results =
            c.call("rpcutil", "ping", JsonObject::new(), RequestOptions { target, ..options(200) }).await.unwrap();
        assert!(results.replies.is_empty());
        assert_eq!(server.node_count(), 2);
    }
}

/// Publishes `payload` as a broadcast with a reply inbox and returns what came back
/// within 300 ms (of paused time: the test runtime advances the clock only once every task
/// is idle, so this counts every reply the servers will ever send).
async fn raw_broadcast(transport: &Arc<dyn Transport>, payload: Vec<u8>) -> usize {
    use futures::StreamExt;
    let inbox = transport::reply_inbox(COLLECTIVE, CALLER);
    let mut sub = transport.subscribe(&inbox).await.unwrap();
    let subject = transport::broadcast_subject(COLLECTIVE, "rpcutil");
    transport.publish(&subject, Some(&inbox), Bytes::from(payload)).await.unwrap();
    let mut n = 0;
    while tokio::time::timeout(Duration::from_millis(300), sub.next()).await.ok().flatten().is_some() {
        n += 1;
    }
    n
}

#[tokio::test(start_paused = true)]
async fn expired_requests_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let server = fleet(transport.clone(), Some(dir.path()), true, sink.clone()).await;

    let mut old = RpcRequest::new(CALLER, "c", COLLECTIVE, "rpcutil", "ping", JsonObject::new());
    old.time -= 61;
    let mut future = old.clone();
    future.time += 61 + 61;
    for request in [old, future] {
        let payload = serde_json::to_vec(&RequestEnvelope::new(request)).unwrap();
        assert_eq!(raw_broadcast(&transport, payload).await, 0);
    }
    let stats = server.stats();
    assert_eq!((stats.total, stats.ttl_expired, stats.passed), (6, 6, 0));
    assert!(sink.records().is_empty());
}

#[tokio::test(start_paused = true)]
async fn malformed_requests_are_counted_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let server = fleet(transport.clone(), Some(dir.path()), true, sink).await;

    assert_eq!(raw_broadcast(&transport, b"{not json".to_vec()).await, 0);
    assert_eq!(raw_broadcast(&transport, br#"{"request": {"agent": 1}}"#.to_vec()).await, 0);
    // A valid request for another agent on the rpcutil subject.
    let wrong = RpcRequest::new(CALLER, "c", COLLECTIVE, "shell", "run", JsonObject::new());
    let payload = serde_json::to_vec(&RequestEnvelope::new(wrong)).unwrap();
    assert_eq!(raw_broadcast(&transport, payload).await, 0);
    assert_eq!(server.stats().malformed, 3);
    assert_eq!(server.stats().total, 0);

    let results = client(transport)
        .call("rpcutil", "ping", JsonObject::new(), RequestOptions { expected: Some(3), ..options(5000) })
        .await
        .unwrap();
    assert_eq!(results.summary.ok, 3);
}

#[tokio::test]
async fn rpcutil_actions_and_unknown_actions() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let _server = fleet(transport.clone(), Some(dir.path()), true, sink).await;
    let c = client(transport);
    let one = |action: &'static str, data: serde_json::Value| {
        let c = c.clone();
        async move {
            let data = serde_json::from_value::<JsonObject>(data).unwrap();
            let opts = RequestOptions { target: Target::Node("n1".into()), ..options(5000) };
            let mut r = c.call("rpcutil", action, data, opts).await.unwrap();
            assert_eq!(r.replies.len(), 1, "{action}");
            r.replies.remove(0)
        }
    };

    let inv = one("inventory", json!({})).await;
    assert_eq!(inv.data["agents"], json!(["rpcutil", "shell"]));
    assert_eq!(inv.data["facts"]["country"], "uk");
    assert_eq!(inv.data["main_collective"], COLLECTIVE);
    assert_eq!(inv.data["collectives"], json!([COLLECTIVE]));
    assert_eq!(inv.data["classes"], json!(["base"]));

    let fact = one("get_fact", json!({"fact": "country"})).await;
    assert_eq!((fact.data["fact"].clone(), fact.data["value"].clone()), (json!("country"), json!("uk")));
    assert_eq!(one("get_fact", json!({})).await.statuscode, StatusCode::MissingData);

    let agents = one("agent_inventory", json!({})).await;
    assert_eq!(agents.data["agents"][0]["agent"], "rpcutil");

    let stats = one("daemon_stats", json!({})).await;
    assert!(stats.data["total"].as_u64().unwrap() >= 4, "{stats:?}");
    assert_eq!(stats.data["ttlexpired"], 0);

    let unknown = one("reboot", json!({})).await;
    assert_eq!(unknown.statuscode, StatusCode::UnknownAction);
    assert!(!unknown.authorized);

    let results = c
        .call("nope", "x", JsonObject::new(), RequestOptions { target: Target::Node("n1".into()), ..options(5000) })
        .await
        .unwrap();
    assert_eq!(results.replies[0].statuscode, StatusCode::UnknownAction);
    assert_eq!(results.replies[0].statusmsg, "Unknown agent nope");
}

#[tokio::test]
async fn an_action_that_cannot_be_recorded_is_not_run() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), "shell", "allow\t*\t*\t*\t*\n");
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let marker = dir.path().join("ran");
    let failing = Arc::new(MemorySink::default());
    failing.set_down(true);
    let server = RpcServer::start(
        transport.clone(),
        node("n1", "uk"),
        agents(),
        Some(dir.path().into()),
        Arc::new(Emitter::new(failing, 1, None)),
    )
    .await
    .unwrap();
    let data = serde_json::from_value::<JsonObject>(json!({"command": format!("touch {}", marker.display())})).unwrap();
    let results = client(transport)
        .call("shell", "run", data, RequestOptions { expected: Some(1), ..options(5000) })
        .await
        .unwrap();
    let reply = &results.replies[0];
    assert_eq!(reply.statuscode, StatusCode::Aborted);
    assert!(reply.statusmsg.contains("could not be recorded"), "{reply:?}");
    assert!(!marker.exists());
    assert_eq!(server.stats().replies, 1);
}

#[tokio::test]
async fn rejects_bad_nodes_and_agents() {
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let server = RpcServer::new(transport.clone(), agents(), None, ServerOptions::default()).unwrap();
    let emitter = || Arc::new(Emitter::new(Arc::new(MemorySink::default()), 1, None));
    server.add_node(node("n1", "uk"), emitter(), None).await.unwrap();
    assert!(matches!(server.add_node(node("n1", "uk"), emitter(), None).await, Err(RpcError::DuplicateNode(_))));
    assert!(server.add_node(node("bad id", "uk"), emitter(), None).await.is_err());
    assert!(RpcServer::new(
        transport.clone(),
        vec![Arc::new(RpcUtil), Arc::new(RpcUtil)],
        None,
        ServerOptions::default()
    )
    .is_err());
}

/// Many simulated nodes on one server: every one answers one broadcast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_hosts_many_nodes() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let options_ = ServerOptions { wildcard_directed: true, ..Default::default() };
    let server = RpcServer::new(transport.clone(), agents(), Some(dir.path().into()), options_).unwrap();
    let sink = Arc::new(MemorySink::default());
    const N: usize = 2000;
    for i in 0..N {
        let emitter = Arc::new(Emitter::new(sink.clone(), 1, None));
        server.add_node(node(&format!("sim{i}.example.net"), "uk"), emitter, None).await.unwrap();
    }
    let results = client(transport.clone())
        .call("rpcutil", "ping", JsonObject::new(), RequestOptions { expected: Some(N), ..options(20_000) })
        .await
        .unwrap();
    assert_eq!(results.summary.ok, N);
    assert_eq!(sink.records().len(), 2 * N);
}

#[tokio::test]
async fn works_over_a_real_nats_server() {
    let nats = chorus_testkit::nats::NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let server_side: Arc<dyn Transport> = Arc::new(NatsTransport::connect(&nats.url()).await.unwrap());
    let client_side: Arc<dyn Transport> = Arc::new(NatsTransport::connect(&nats.url()).await.unwrap());
    for wildcard in [false, true] {
        let sink = Arc::new(MemorySink::default());
        let server = fleet(server_side.clone(), Some(dir.path()), wildcard, sink.clone()).await;
        let c = client(client_side.clone());

        let results = c
            .call("rpcutil", "ping", JsonObject::new(), RequestOptions { expected: Some(3), ..options(5000) })
            .await
            .unwrap();
        assert_eq!(identities(&results.replies), ["n1", "n2", "n3.example.net"]);
        assert_eq!(results.summary.ok, 3);

        let target = Target::Node("n3.example.net".into());
        let results =
            c.call("rpcutil", "ping", JsonObject::new(), RequestOptions { target, ..options(5000) }).await.unwrap();
        assert_eq!(identities(&results.replies), ["n3.example.net"]);
        assert_eq!(sink.requests().len(), 4);

        // Garbage over the wire is counted, not fatal.
        client_side
            .publish(&transport::broadcast_subject(COLLECTIVE, "rpcutil"), None, Bytes::from_static(b"\xff"))
            .await
            .unwrap();
        client_side.flush().await.unwrap();
        chorus_testkit::eventually_true("the garbage counted", Duration::from_secs(5), || server.stats().malformed > 0)
            .await;
        assert_eq!(server.stats().malformed, 1);
        drop(server);
    }
}

/// An issuer, and the keys and credentials it gives callers and nodes.
struct Issuer(chorus_keys::FileSigner);

impl Issuer {
    fn new() -> Self {
        Issuer(chorus_keys::FileSigner::random(chorus_keys::Algorithm::Ed25519))
    }

    fn issuers(&self) -> Arc<chorus_identity::Issuers> {
        use chorus_keys::Signer;
        Arc::new(chorus_identity::Issuers::new().with(self.0.public_key().clone()))
    }

    fn identity(
        &self,
        spec: impl FnOnce(chorus_keys::PublicKey) -> chorus_identity::CredentialSpec,
    ) -> chorus_identity::Identity {
        use chorus_keys::Signer;
        let key = chorus_keys::FileSigner::random(chorus_keys::Algorithm::Ed25519);
        let spec = spec(key.public_key().clone());
        let credential = chorus_identity::Credential::issue(&self.0, &spec, chrono::Utc::now().timestamp()).unwrap();
        chorus_identity::Identity::new(Arc::new(key), credential).unwrap()
    }

    /// A caller allowed rpcutil only.
    fn caller(&self, callerid: &str) -> chorus_identity::Identity {
        self.identity(|key| {
            let mut spec = chorus_identity::CredentialSpec::client(callerid, key, Duration::from_secs(3600));
            spec.agents = vec!["rpcutil.*".into()];
            spec
        })
    }

    fn node(&self, identity: &str) -> chorus_identity::Identity {
        self.identity(|key| chorus_identity::CredentialSpec::node(identity, key, Duration::from_secs(3600)))
    }
}

/// Signs with one identity's key but presents another's credential, or changes the request
/// after signing: what an attacker would try.
enum Forger {
    Tamper(chorus_identity::Identity),
    Delegate(chorus_identity::Identity),
}

#[async_trait]
impl RequestSigner for Forger {
    async fn sign(&self, request: RpcRequest) -> Result<RequestEnvelope, RpcError> {
        match self {
            Forger::Tamper(identity) => {
                let mut envelope = RequestEnvelope::signed(request, identity).unwrap();
                envelope.request.action = "daemon_stats".into();
                Ok(envelope)
            }
            Forger::Delegate(identity) => Ok(RequestEnvelope::delegated(request, identity).unwrap()),
        }
    }
}

/// The audit records a memory sink holds: (caller, code).
fn audits(sink: &MemorySink) -> Vec<(String, String)> {
    sink.records()
        .into_iter()
        .filter_map(|r| match r.data {
            Event::Audit(a) => Some((a.callerid, a.code.unwrap_or_default())),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_secure_server_runs_only_requests_proven_to_come_from_their_caller() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let issuer = Issuer::new();
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let security = Arc::new(RequestSecurity::new(issuer.issuers()));
    let server_options = ServerOptions { security: Some(security), ..Default::default() };
    let server = RpcServer::new(transport.clone(), agents(), Some(dir.path().into()), server_options).unwrap();
    let emitter = Arc::new(Emitter::new(sink.clone(), 1, None));
    server.add_node(node("n1", "uk"), emitter, Some(issuer.node("n1"))).await.unwrap();
    let bob = issuer.caller(CALLER);
    let call = |client: RpcClient, agent: &'static str, ttl: u64| async move {
        let options = RequestOptions { expected: Some(1), ttl, ..options(10_000) };
        let results = client.call(agent, "ping", JsonObject::new(), options).await.unwrap();
        assert_eq!(results.replies.len(), 1, "{results:?}");
        results.replies.into_iter().next().unwrap()
    };
    let refused = |reply: RpcReply, code: &str| {
        assert_eq!((reply.statuscode, reply.authorized), (StatusCode::Aborted, false), "{reply:?}");
        let policy = reply.policy.unwrap_or_default();
        assert!(policy.contains(&format!("refused ({code})")), "wanted {code}: {policy}");
    };
    let signed = || RpcClient::signed(transport.clone(), bob.clone(), COLLECTIVE).with_trust(issuer.issuers());

    // The caller's own signed request runs, and its reply is signed by the node.
    let ok = signed()
        .call("rpcutil", "ping", JsonObject::new(), RequestOptions { expected: Some(1), ..options(10_000) })
        .await
        .unwrap();
    assert_eq!((ok.summary.ok, ok.summary.unverified), (1, 0), "{ok:?}");

    refused(call(client(transport.clone()), "rpcutil", 60).await, "unsigned");
    // bob's key and credential, claiming to be someone else.
    let forged = RpcClient::new(transport.clone(), "up=admin", COLLECTIVE)
        .with_request_signer(Arc::new(CallerSigner(bob.clone())));
    refused(call(forged, "rpcutil", 60).await, "caller_mismatch");
    let stranger = Issuer::new().caller(CALLER);
    refused(call(RpcClient::signed(transport.clone(), stranger, COLLECTIVE), "rpcutil", 60).await, "unknown_issuer");
    let tampered = client(transport.clone()).with_request_signer(Arc::new(Forger::Tamper(bob.clone())));
    refused(call(tampered, "rpcutil", 60).await, "bad_signature");
    refused(call(signed(), "shell", 60).await, "agent_not_allowed");
    refused(call(signed(), "rpcutil", 3600).await, "ttl_too_long");
    // A caller signing for another without the delegator right.
    let mallory = issuer.caller("up=mallory");
    let posing = client(transport.clone()).with_request_signer(Arc::new(Forger::Delegate(mallory)));
    refused(call(posing, "rpcutil", 60).await, "not_delegator");
    // A real delegator may sign for bob.
    let aaa = issuer.identity(|key| {
        let mut spec = chorus_identity::CredentialSpec::client("aaa=aaa1", key, Duration::from_secs(3600));
        spec.delegator = true;
        spec
    });
    let delegated = client(transport.clone()).with_request_signer(Arc::new(Forger::Delegate(aaa)));
    assert_eq!(call(delegated, "rpcutil", 60).await.statuscode, StatusCode::Ok);

    // Every refusal is recorded and audited with its code.
    let codes: Vec<String> = audits(&sink).into_iter().map(|(_, code)| code).collect();
    assert_eq!(
        codes,
        [
            "unsigned",
            "caller_mismatch",
            "unknown_issuer",
            "bad_signature",
            "agent_not_allowed",
            "ttl_too_long",
            "not_delegator"
        ]
    );
    assert_eq!(server.stats().denied, 7);
    assert_eq!(sink.requests().len(), 9);
}

#[tokio::test(start_paused = true)]
async fn a_signed_request_runs_once_per_node_and_answers_only_its_caller() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let issuer = Issuer::new();
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let options_ = ServerOptions {
        security: Some(Arc::new(RequestSecurity::new(issuer.issuers()))),
        wildcard_directed: true,
        ..Default::default()
    };
    let server = RpcServer::new(transport.clone(), agents(), Some(dir.path().into()), options_).unwrap();
    for id in ["n1", "n2"] {
        let emitter = Arc::new(Emitter::new(sink.clone(), 1, None));
        server.add_node(node(id, "uk"), emitter, Some(issuer.node(id))).await.unwrap();
    }
    let bob = issuer.caller(CALLER);
    let request = RpcRequest::new(CALLER, "c", COLLECTIVE, "rpcutil", "ping", JsonObject::new());
    let payload = serde_json::to_vec(&RequestEnvelope::signed(request, &bob).unwrap()).unwrap();
    // First delivery: both nodes run it. The same bytes again, broadcast or directed: refused.
    assert_eq!(raw_broadcast(&transport, payload.clone()).await, 2);
    assert_eq!(raw_broadcast(&transport, payload.clone()).await, 2);
    let inbox = transport::reply_inbox(COLLECTIVE, CALLER);
    let mut sub = transport.subscribe(&inbox).await.unwrap();
    transport
        .publish(&transport::node_subject(COLLECTIVE, "n1"), Some(&inbox), Bytes::from(payload.clone()))
        .await
        .unwrap();
    let replay = tokio::time::timeout(Duration::from_secs(1), sub.next()).await.unwrap().unwrap();
    let replay: ReplyEnvelope = serde_json::from_slice(&replay.payload).unwrap();
    assert!(replay.reply.policy.unwrap().contains("refused (replayed)"));
    assert_eq!(server.stats().passed, 5);
    let ran = sink.replies().into_iter().filter(|r| r.statuscode == StatusCode::Ok).count();
    assert_eq!(ran, 2, "each node ran it once");

    // A fresh signed request with its replies pointed at another caller's inbox.
    let request = RpcRequest::new(CALLER, "c", COLLECTIVE, "rpcutil", "ping", JsonObject::new());
    let requestid = request.requestid.clone();
    let payload = serde_json::to_vec(&RequestEnvelope::signed(request, &bob).unwrap()).unwrap();
    let elsewhere = transport::reply_inbox(COLLECTIVE, "up=mallory");
    let mut stolen = transport.subscribe(&elsewhere).await.unwrap();
    transport
        .publish(&transport::broadcast_subject(COLLECTIVE, "rpcutil"), Some(&elsewhere), Bytes::from(payload))
        .await
        .unwrap();
    // Each node records its refusal (the reply record comes just before the reply would be
    // sent, in the same poll of the node's task on this single-threaded runtime)...
    let refusals = loop {
        let refusals: Vec<RpcReply> = sink.replies().into_iter().filter(|r| r.requestid == requestid).collect();
        if refusals.len() == 2 {
            break refusals;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(refusals.iter().all(|r| r.policy.as_deref().unwrap().contains("refused (reply_subject_not_bound)")));
    // ...and sends it nowhere: that inbox is another caller's.
    assert!(futures::FutureExt::now_or_never(stolen.next()).is_none(), "a refusal reached another caller's inbox");
    let codes: Vec<String> = audits(&sink).into_iter().map(|(_, c)| c).collect();
    assert_eq!(codes, ["replayed", "replayed", "replayed", "reply_subject_not_bound", "reply_subject_not_bound"]);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_trusts_issuers_accepts_only_replies_signed_by_their_node() {
    use futures::StreamExt;
    let issuer = Issuer::new();
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let sink = Arc::new(MemorySink::default());
    let server =
        RpcServer::new(transport.clone(), agents(), Some(dir.path().into()), ServerOptions::default()).unwrap();
    let emitter = || Arc::new(Emitter::new(sink.clone(), 1, None));
    server.add_node(node("n1", "uk"), emitter(), Some(issuer.node("n1"))).await.unwrap();
    // n2 has no key: its replies are unsigned.
    server.add_node(node("n2", "uk"), emitter(), None).await.unwrap();
    // A node credential for n3 cannot be used by n1's server for another identity.
    assert!(server.add_node(node("n1b", "uk"), emitter(), Some(issuer.node("n3"))).await.is_err());

    // An impostor answers every broadcast as n3, signing with its own n4 credential.
    let impostor = issuer.node("n4");
    let mut requests = transport.subscribe(&transport::broadcast_subject(COLLECTIVE, "rpcutil")).await.unwrap();
    let fake = transport.clone();
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let envelope: RequestEnvelope = serde_json::from_slice(&message.payload).unwrap();
            let reply = RpcReply::new(&envelope.request, "n3", StatusCode::Ok, JsonObject::new());
            let signed = ReplyEnvelope::signed(reply, &impostor).unwrap();
            fake.publish(message.reply.as_deref().unwrap(), None, Bytes::from(serde_json::to_vec(&signed).unwrap()))
                .await
                .unwrap();
        }
    });

    let results = client(transport.clone())
        .with_trust(issuer.issuers())
        .call("rpcutil", "ping", JsonObject::new(), RequestOptions { expected: Some(3), ..options(10_000) })
        .await
        .unwrap();
    assert_eq!(identities(&results.replies), ["n1"]);
    assert_eq!((results.summary.ok, results.summary.unverified, results.summary.no_response), (1, 2, Some(2)));
    let mut rejected: Vec<(String, String)> =
        results.rejected.iter().map(|r| (r.identity.clone(), r.reason.clone())).collect();
    rejected.sort();
    assert_eq!(rejected[0].0, "n2");
    assert_eq!(rejected[0].1, "unsigned reply");
    assert_eq!(rejected[1].0, "n3");
    assert!(rejected[1].1.contains("credential of \"n4\""), "{}", rejected[1].1);
}

/// A policy line Chorus cannot use is audited (`policy_line_unusable`, naming file and
/// line) once per version of the file: again after the file changes, not on every request.
/// The valid lines still decide.
#[tokio::test]
async fn unusable_policy_lines_are_audited_once_per_change_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let broken = concat!(
        "policy default deny\n",
        "allow\tup=bob\tping\t*\t*\n",
        "allow\tup=bob\tstatus\t(puppet().enabled=false and environment=production) or environment=development\t*\n",
    );
    write_policy(dir.path(), "rpcutil", broken);
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let _server = fleet(transport.clone(), Some(dir.path()), true, sink.clone()).await;
    let ping = || async {
        let options = RequestOptions { expected: Some(3), ..options(5000) };
        client(transport.clone()).call("rpcutil", "ping", JsonObject::new(), options).await.unwrap()
    };
    let unusable = || -> Vec<String> {
        sink.records()
            .into_iter()
            .filter_map(|r| match r.data {
                Event::Audit(a) if a.code.as_deref() == Some("policy_line_unusable") => a.reason,
                _ => None,
            })
            .collect()
    };
    assert_eq!(ping().await.summary.ok, 3, "the valid line still allows bob");
    assert_eq!(ping().await.summary.ok, 3);
    let reasons = unusable();
    assert_eq!(reasons.len(), 1, "reported once, not per request or node: {reasons:?}");
    assert!(reasons[0].contains("rpcutil.policy") && reasons[0].contains(":3"), "{reasons:?}");

    // The file changes (the broken line now line 4): reported again, once.
    std::fs::write(dir.path().join("rpcutil.policy"), format!("# edited\n{broken}")).unwrap();
    let edited = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options().write(true).open(dir.path().join("rpcutil.policy")).unwrap().set_modified(edited).unwrap();
    assert_eq!(ping().await.summary.ok, 3);
    assert_eq!(ping().await.summary.ok, 3);
    let reasons = unusable();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[1].contains(":4"), "{reasons:?}");
}

/// A caller credential limited to a tenant or to collectives is refused by nodes of another
/// tenant (`wrong_tenant`) and in other collectives (`collective_not_allowed`), audited; the
/// same caller within its limits runs.
#[tokio::test]
async fn credentials_limited_to_a_tenant_or_collectives_are_refused_outside_them() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let issuer = Issuer::new();
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let security = RequestSecurity::new(issuer.issuers()).with_tenant(Some("acme".into()));
    let server_options = ServerOptions { security: Some(Arc::new(security)), ..Default::default() };
    let server = RpcServer::new(transport.clone(), agents(), Some(dir.path().into()), server_options).unwrap();
    server
        .add_node(node("n1", "uk"), Arc::new(Emitter::new(sink.clone(), 1, None)), Some(issuer.node("n1")))
        .await
        .unwrap();
    let limited = |tenant: &str, collectives: &[&str]| {
        let (tenant, collectives) = (tenant.to_string(), collectives.iter().map(|c| c.to_string()).collect());
        issuer.identity(move |key| {
            let mut spec = chorus_identity::CredentialSpec::client(CALLER, key, Duration::from_secs(3600));
            spec.tenant = Some(tenant);
            spec.collectives = collectives;
            spec
        })
    };
    let ping = |identity: chorus_identity::Identity| {
        let client = RpcClient::signed(transport.clone(), identity, COLLECTIVE).with_trust(issuer.issuers());
        async move {
            let options = RequestOptions { expected: Some(1), ..options(10_000) };
            let results = client.call("rpcutil", "ping", JsonObject::new(), options).await.unwrap();
            assert_eq!(results.replies.len(), 1, "{results:?}");
            results.replies.into_iter().next().unwrap()
        }
    };
    let refused = |reply: RpcReply, code: &str| {
        assert_eq!((reply.statuscode, reply.authorized), (StatusCode::Aborted, false), "{reply:?}");
        assert!(reply.policy.unwrap_or_default().contains(&format!("refused ({code})")), "wanted {code}");
    };
    refused(ping(limited("globex", &[COLLECTIVE])).await, "wrong_tenant");
    refused(ping(limited("acme", &["elsewhere"])).await, "collective_not_allowed");
    assert_eq!(ping(limited("acme", &[COLLECTIVE])).await.statuscode, StatusCode::Ok);
    let codes: Vec<String> = audits(&sink).into_iter().map(|(_, code)| code).collect();
    assert_eq!(codes, ["wrong_tenant", "collective_not_allowed"]);
}

/// A filter nodes cannot use (a bad regex, a bad fact operator, a compound expression) is an
/// error on the client, and no node receives anything.
#[tokio::test]
async fn a_filter_nodes_cannot_use_is_an_error_and_nothing_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let server = fleet(transport.clone(), Some(dir.path()), true, sink.clone()).await;
    let bad = [
        chorus_schemas::rpc::Filter { identity: vec!["/n[1/".into()], ..Default::default() },
        chorus_schemas::rpc::Filter { cf_class: vec!["/(/".into()], ..Default::default() },
        chorus_schemas::rpc::Filter {
            fact: vec![chorus_schemas::rpc::FactFilter {
                fact: "country".into(),
                operator: "~~".into(),
                value: "uk".into(),
            }],
            ..Default::default()
        },
        chorus_schemas::rpc::Filter { compound: vec![vec![JsonObject::new()]], ..Default::default() },
        chorus_schemas::rpc::Filter {
            compound: vec![vec![serde_json::json!({"expr": "with(\"uk\" and"}).as_object().unwrap().clone()]],
            ..Default::default()
        },
    ];
    for filter in bad {
        let options = RequestOptions { filter: filter.clone(), ..options(1000) };
        let error = client(transport.clone()).call("rpcutil", "ping", JsonObject::new(), options).await.unwrap_err();
        assert!(error.to_string().contains("nothing was sent"), "{filter:?}: {error}");
    }
    assert_eq!(server.stats().total, 0, "a node received a request");
    assert!(sink.requests().is_empty());
    // A compound filter selects by expression (n1 and n3 are in the uk).
    let filter = chorus_schemas::rpc::Filter {
        compound: vec![vec![serde_json::json!({"expr": "with(\"country=uk\") && fact(\"country\") != \"de\""})
            .as_object()
            .unwrap()
            .clone()]],
        ..Default::default()
    };
    let by_expression = RequestOptions { filter, expected: Some(2), ..options(5000) };
    let results = client(transport.clone()).call("rpcutil", "ping", JsonObject::new(), by_expression).await.unwrap();
    assert_eq!(identities(&results.replies), ["n1", "n3.example.net"]);
    // A regex identity filter that compiles selects by pattern.
    let filter = chorus_schemas::rpc::Filter { identity: vec!["/^n[12]$/".into()], ..Default::default() };
    let options = RequestOptions { filter, expected: Some(2), ..options(5000) };
    let results = client(transport).call("rpcutil", "ping", JsonObject::new(), options).await.unwrap();
    assert_eq!(identities(&results.replies), ["n1", "n2"]);
}

/// Nodes check inputs against the agent's DDL before it runs: a missing required input is
/// `MissingData`, a wrong one `InvalidData`, both `Validation failed: …`; valid input runs.
#[tokio::test]
async fn nodes_check_inputs_against_the_agents_ddl_before_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    allow_bob(dir.path());
    write_policy(dir.path(), "shell", "policy default deny\nallow\tup=bob\t*\t*\t*\n");
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let sink = Arc::new(MemorySink::default());
    let _server = fleet(transport.clone(), Some(dir.path()), true, sink.clone()).await;
    let call = |agent: &'static str, action: &'static str, data: serde_json::Value| {
        let transport = transport.clone();
        async move {
            let options = RequestOptions { target: Target::Node("n1".into()), ..options(5000) };
            let data = data.as_object().unwrap().clone();
            let results = client(transport).call(agent, action, data, options).await.unwrap();
            results.replies.into_iter().next().unwrap()
        }
    };
    let missing = call("rpcutil", "get_fact", json!({})).await;
    assert_eq!(missing.statuscode, StatusCode::MissingData, "{missing:?}");
    assert!(missing.statusmsg.starts_with("Validation failed: "), "{}", missing.statusmsg);
    let wrong = call("shell", "run", json!({"command": 5})).await;
    assert_eq!(wrong.statuscode, StatusCode::InvalidData, "{wrong:?}");
    assert!(wrong.statusmsg.contains("is not a string"), "{}", wrong.statusmsg);
    let undeclared = call("rpcutil", "ping", json!({"extra": 1})).await;
    assert_eq!(undeclared.statuscode, StatusCode::InvalidData, "{undeclared:?}");
    let ok = call("rpcutil", "get_fact", json!({"fact": "country"})).await;
    assert_eq!((ok.statuscode, &ok.data["value"]), (StatusCode::Ok, &json!("uk")));
    // The built-in DDLs describe every action the agents have.
    for agent in [&RpcUtil as &dyn Agent, &Shell] {
        let ddl = agent.ddl().unwrap();
        let mut described: Vec<String> = ddl.actions.iter().map(|a| a.action.clone()).collect();
        described.sort();
        let mut actions = agent.actions();
        actions.sort();
        assert_eq!(described, actions, "{}", agent.name());
    }
}
