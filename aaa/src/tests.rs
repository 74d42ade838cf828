//! The AAA service on the embedded backbone: decisions, their audit records, the HTTP API
//! and the RPC client integration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::{Backbone, ReplayOptions};
use chorus_keys::{Ed25519FileSigner, Signer};
use chorus_platform::{ensure_platform_streams, BackboneSink, Emitter, StreamLimits};
use chorus_rpc::signed::verify_signed_request;
use chorus_rpc::{LocalTransport, RequestEnvelope, RequestOptions, RpcClient, Transport};
use chorus_schemas::signature::Verifier;
use chorus_schemas::{AuditAction, AuditRecord, Event, EventRecord, RpcRequest};
use futures::StreamExt;

use super::*;

struct Fixture {
    service: Arc<AaaService>,
    backbone: Arc<dyn Backbone>,
    request_key: Arc<Ed25519FileSigner>,
    _dir: tempfile::TempDir,
}

fn user(name: &str, tenant: &str, agents: &[&str]) -> User {
    User {
        username: name.into(),
        // Cheap bcrypt (cost 4) keeps the unit tests fast; argon2 is covered in users.rs.
        password_hash: bcrypt::hash(format!("{name}-pw"), 4).unwrap(),
        callerid: format!("up={name}"),
        tenant: tenant.into(),
        collectives: vec![],
        agents: agents.iter().map(|s| s.to_string()).collect(),
        properties: Default::default(),
    }
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backbone: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("store")).unwrap());
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let emitter = Arc::new(Emitter::new(Arc::new(BackboneSink(backbone.clone())), 1, Some("london".into())));
    let users = Users::new(UsersFile {
        users: vec![user("alice", "acme", &["rpcutil.*", "puppet.status"]), user("gina", "globex", &["*"])],
    })
    .unwrap();
    let tenants: BTreeMap<String, Vec<String>> =
        [("acme".to_string(), vec!["acme".to_string()]), ("globex".to_string(), vec!["globex".to_string()])].into();
    let tokens = TokenAuthority::new(
        Arc::new(Ed25519FileSigner::random()),
        "chorus-aaa",
        Duration::from_secs(3600),
        Duration::from_secs(86400),
        Duration::ZERO,
    );
    let request_key = Arc::new(Ed25519FileSigner::random());
    let service = Arc::new(
        AaaService::new("aaa1.example.net", "london", users, tenants, tokens, request_key.clone(), emitter).unwrap(),
    );
    Fixture { service, backbone, request_key, _dir: dir }
}

async fn audit_records(b: &dyn Backbone) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    let mut stream = b.replay("CHORUS_AUDIT", ReplayOptions::default()).await.unwrap();
    while let Some(m) = stream.next().await {
        let r = EventRecord::decode(&m.unwrap().payload).unwrap();
        let Event::Audit(a) = r.data else { panic!("not an audit record") };
        out.push(a);
    }
    out
}

fn request(callerid: &str, collective: &str, agent: &str, action: &str) -> RpcRequest {
    RpcRequest::new(callerid, "laptop.example.net", collective, agent, action, Default::default())
}

async fn token(f: &Fixture, name: &str) -> String {
    match f.service.login(name, &format!("{name}-pw")).await.unwrap() {
        Decision::Allow(g) => g.token,
        Decision::Deny { denial, .. } => panic!("login refused: {denial}"),
    }
}

fn denial<T: std::fmt::Debug>(d: Decision<T>) -> Denial {
    match d {
        Decision::Deny { denial, audited } => {
            assert!(audited, "denial not audited");
            denial
        }
        Decision::Allow(x) => panic!("allowed: {x:?}"),
    }
}

#[tokio::test]
async fn every_decision_is_audited_with_its_reason() {
    let f = fixture().await;
    assert!(matches!(
        f.service.login("alice", "wrong").await.unwrap(),
        Decision::Deny { denial: Denial::BadCredentials, .. }
    ));
    assert!(matches!(
        f.service.login("mallory", "mallory-pw").await.unwrap(),
        Decision::Deny { denial: Denial::BadCredentials, .. }
    ));
    let t = token(&f, "alice").await;

    let signed = match f
        .service
        .sign(&t, serde_json::to_value(request("up=alice", "acme", "rpcutil", "ping")).unwrap())
        .await
        .unwrap()
    {
        Decision::Allow(s) => s,
        Decision::Deny { denial, .. } => panic!("{denial}"),
    };
    let sign = |r: RpcRequest| {
        let service = f.service.clone();
        let t = t.clone();
        async move { service.sign(&t, serde_json::to_value(r).unwrap()).await.unwrap() }
    };
    assert!(matches!(denial(sign(request("up=bob", "acme", "rpcutil", "ping")).await), Denial::CallerMismatch { .. }));
    assert!(matches!(denial(sign(request("up=alice", "globex", "rpcutil", "ping")).await), Denial::WrongTenant { .. }));
    assert!(matches!(
        denial(sign(request("up=alice", "nowhere", "rpcutil", "ping")).await),
        Denial::WrongTenant { .. }
    ));
    assert!(matches!(denial(sign(request("up=alice", "acme", "puppet", "run")).await), Denial::AgentNotAllowed { .. }));
    let mut stale = request("up=alice", "acme", "puppet", "status");
    stale.time -= 3600;
    assert!(matches!(denial(sign(stale).await), Denial::Stale { .. }));
    assert!(matches!(
        denial(f.service.sign("garbage", serde_json::json!({"callerid": "up=alice"})).await.unwrap()),
        Denial::Token(_)
    ));
    assert!(matches!(
        denial(f.service.sign(&t, serde_json::json!({"callerid": "up=alice"})).await.unwrap()),
        Denial::Malformed(_)
    ));

    // The signature verifies with the request key, and not once the request is changed.
    let verifier = Verifier::new().with_key(&f.request_key.public_key()).unwrap();
    let mut envelope = signed.clone().into_envelope(Some(t.clone()));
    assert_eq!(verify_signed_request(&envelope, &verifier).unwrap(), f.request_key.key_id());
    envelope.request.action = "run".into();
    assert!(verify_signed_request(&envelope, &verifier).is_err());

    let records = audit_records(&*f.backbone).await;
    let summary: Vec<(AuditAction, Option<String>)> = records.iter().map(|r| (r.action, r.reason.clone())).collect();
    assert_eq!(records.len(), 11, "{summary:#?}");
    assert_eq!(records.iter().filter(|r| r.action == AuditAction::Allow).count(), 2, "login and one signature");
    assert!(records.iter().all(|r| r.signer == "aaa1.example.net" && r.site == "london"));
    let reasons: Vec<&str> = records.iter().filter_map(|r| r.reason.as_deref()).collect();
    for wanted in [
        "bad username or password",
        "does not match the token",
        "wrong tenant",
        "belongs to no tenant",
        "agent not allowed",
        "expired or from the future",
        "token invalid",
        "malformed request",
    ] {
        assert!(reasons.iter().any(|r| r.contains(wanted)), "no {wanted:?} in {reasons:#?}");
    }
    assert_eq!(records[1].callerid, "unknown=mallory");
    assert!(!serde_json::to_string(&records).unwrap().contains("alice-pw"), "a password reached the audit trail");
    let jti = f.service.tokens().verify(&t).unwrap().jti;
    assert_eq!(
        records.iter().filter(|r| r.jti.as_deref() == Some(jti.as_str())).count(),
        8,
        "login, allow and six denials carry the token id"
    );
}

/// The HTTP API end to end, and an RPC client that holds no key getting its requests
/// signed: the node side verifies the signature with the AAA service's published key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_client_gets_requests_signed_over_http() {
    let f = fixture().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http::serve(listener, None, f.service.clone(), chorus_runtime::Ops::new(), async move {
        stopped.wait_for(|s| *s).await.ok();
    }));

    let aaa = AaaClient::new(&url, None).unwrap();
    let e = aaa.login("alice", "nope").await.unwrap_err();
    assert!(matches!(&e, AaaError::Refused { status: 401, code, .. } if code == "bad_credentials"), "{e}");
    let grant = aaa.login("alice", "alice-pw").await.unwrap();
    assert_eq!(grant.callerid, "up=alice");
    let keys = aaa.keys().await.unwrap();
    assert_eq!(keys.request.key_id, f.request_key.key_id());
    let verifier =
        Verifier::new().with_key(&chorus_keys::parse_public_key(&keys.request.public_key_pem).unwrap()).unwrap();

    // A stand-in node: receives the envelope and checks the signature.
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let mut requests = transport.subscribe("acme.broadcast.agent.rpcutil").await.unwrap();
    let rpc = RpcClient::new(transport.clone(), "up=alice", "acme")
        .with_request_signer(Arc::new(AaaSigner::new(aaa.clone(), grant.token.clone())));
    let options = RequestOptions { timeout: Duration::from_millis(10), ..Default::default() };
    rpc.call("rpcutil", "ping", Default::default(), options.clone()).await.unwrap();
    let message = requests.next().await.unwrap();
    let envelope: RequestEnvelope = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(envelope.caller_jwt.as_deref(), Some(grant.token.as_str()));
    assert_eq!(verify_signed_request(&envelope, &verifier).unwrap(), f.request_key.key_id());

    // Refused: nothing is published, the caller gets the reason.
    let e = rpc.call("puppet", "run", Default::default(), options).await.unwrap_err();
    assert!(e.to_string().contains("agent_not_allowed"), "{e}");

    let body = aaa.sign_json(&grant.token, serde_json::json!([1, 2])).await.unwrap_err();
    assert!(matches!(&body, AaaError::Refused { status: 403, code, .. } if code == "malformed_request"), "{body}");

    stop.send(true).ok();
    server.await.unwrap().unwrap();
}
