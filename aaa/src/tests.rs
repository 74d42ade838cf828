//! The AAA service on the embedded backbone: decisions, their audit records, the HTTP API
//! and the RPC client integration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::{Backbone, ReplayOptions};
use chorus_identity::{Credential, CredentialSpec, Identity, Issuers};
use chorus_keys::{Algorithm, FileSigner, Signer};
use chorus_platform::{ensure_platform_streams, BackboneSink, Emitter, StreamLimits};
use chorus_rpc::signed::request_signing_bytes;
use chorus_rpc::{LocalTransport, RequestEnvelope, RequestOptions, RequestSecurity, RpcClient, Transport};
use chorus_schemas::{AuditAction, AuditRecord, Event, EventRecord, RpcRequest};
use futures::StreamExt;

use super::config::{Limit, LoginLimits};
use super::signer::{login_message, signature_of};
use super::*;

struct Fixture {
    service: Arc<AaaService>,
    backbone: Arc<dyn Backbone>,
    issuer: FileSigner,
    dir: tempfile::TempDir,
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
        disabled: false,
    }
}

fn users_file(users: &[User]) -> String {
    serde_yaml::to_string(&UsersFile { users: users.to_vec() }).unwrap()
}

const CLIENT: &str = "192.0.2.7:50000";

fn client() -> Option<SocketAddr> {
    Some(CLIENT.parse().unwrap())
}

async fn fixture() -> Fixture {
    fixture_with(LoginLimits::default()).await
}

async fn fixture_with(limits: LoginLimits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backbone: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("store")).unwrap());
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let emitter = Arc::new(Emitter::new(Arc::new(BackboneSink(backbone.clone())), 1, Some("london".into())));
    let everyone = [user("alice", "acme", &["rpcutil.*", "puppet.status"]), user("gina", "globex", &["*"])];
    let path = dir.path().join("users.yaml");
    std::fs::write(&path, users_file(&everyone)).unwrap();
    let tenants: BTreeMap<String, Vec<String>> =
        [("acme".to_string(), vec!["acme".to_string()]), ("globex".to_string(), vec!["globex".to_string()])].into();
    let tokens = TokenAuthority::new(
        Arc::new(FileSigner::random(Algorithm::Ed25519)),
        "chorus-aaa",
        Duration::from_secs(3600),
        Duration::from_secs(86400),
        Duration::ZERO,
    );
    let issuer = FileSigner::random(Algorithm::Ed25519);
    let key = FileSigner::random(Algorithm::EcdsaP256);
    let mut spec = CredentialSpec::client("aaa=aaa1", key.public_key().clone(), Duration::from_secs(86400));
    spec.delegator = true;
    let credential = Credential::issue(&issuer, &spec, chrono::Utc::now().timestamp()).unwrap();
    let signer = Identity::new(Arc::new(key), credential).unwrap();
    let service = AaaService::new(
        "aaa1.example.net",
        "london",
        Users::load(&path).unwrap(),
        tenants,
        tokens,
        signer,
        &limits,
        emitter,
    )
    .unwrap()
    .with_users_file(path);
    Fixture { service: Arc::new(service), backbone, issuer, dir }
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

fn attempt(name: &str, password: &str, key: &dyn Signer) -> LoginAttempt {
    let timestamp = chrono::Utc::now().timestamp();
    LoginAttempt {
        username: name.into(),
        password: password.into(),
        public_key: key.public_key().to_text(),
        timestamp,
        signature: signature_of(key, &login_message(timestamp, name, key.public_key())).unwrap(),
    }
}

async fn login(f: &Fixture, name: &str, key: &dyn Signer) -> String {
    match f.service.login(attempt(name, &format!("{name}-pw"), key), client()).await.unwrap() {
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

/// Signs `r` with `key` and has the service judge it for `token`.
async fn sign(f: &Fixture, token: &str, key: &dyn Signer, r: &RpcRequest) -> Decision<RequestEnvelope> {
    let proof = signature_of(key, &request_signing_bytes(r)).unwrap();
    f.service.sign(token, serde_json::to_value(r).unwrap(), Some(&proof), client()).await.unwrap()
}

#[tokio::test]
async fn every_decision_is_audited_with_its_reason_and_the_client_address() {
    let f = fixture().await;
    let key = FileSigner::random(Algorithm::Ed25519);
    let code = |d: Denial| d.code();
    assert_eq!(
        code(denial(f.service.login(attempt("alice", "wrong", &key), client()).await.unwrap())),
        "bad_credentials"
    );
    assert_eq!(
        code(denial(f.service.login(attempt("mallory", "mallory-pw", &key), client()).await.unwrap())),
        "bad_credentials"
    );
    // A login proof by another key, or an old one.
    let mut stolen = attempt("alice", "alice-pw", &key);
    stolen.public_key = FileSigner::random(Algorithm::Ed25519).public_key().to_text();
    assert_eq!(code(denial(f.service.login(stolen, client()).await.unwrap())), "bad_proof");
    let mut old = attempt("alice", "alice-pw", &key);
    old.timestamp -= 600;
    old.signature = signature_of(&key, &login_message(old.timestamp, "alice", key.public_key())).unwrap();
    assert_eq!(code(denial(f.service.login(old, client()).await.unwrap())), "bad_proof");
    let t = login(&f, "alice", &key).await;

    let signed = match sign(&f, &t, &key, &request("up=alice", "acme", "rpcutil", "ping")).await {
        Decision::Allow(s) => s,
        Decision::Deny { denial, .. } => panic!("{denial}"),
    };
    let judge = |r: RpcRequest| {
        let (f, t, key) = (&f, t.clone(), &key);
        async move { code(denial(sign(f, &t, key, &r).await)) }
    };
    assert_eq!(judge(request("up=bob", "acme", "rpcutil", "ping")).await, "caller_mismatch");
    assert_eq!(judge(request("up=alice", "globex", "rpcutil", "ping")).await, "wrong_tenant");
    assert_eq!(judge(request("up=alice", "nowhere", "rpcutil", "ping")).await, "wrong_tenant");
    assert_eq!(judge(request("up=alice", "acme", "puppet", "run")).await, "agent_not_allowed");
    let mut stale = request("up=alice", "acme", "puppet", "status");
    stale.time -= 3600;
    assert_eq!(judge(stale).await, "request_stale");
    let mut long = request("up=alice", "acme", "puppet", "status");
    long.ttl = 3600;
    assert_eq!(judge(long).await, "ttl_too_long");
    // The token without the key it is bound to signs nothing.
    let thief = FileSigner::random(Algorithm::Ed25519);
    assert_eq!(code(denial(sign(&f, &t, &thief, &request("up=alice", "acme", "rpcutil", "ping")).await)), "bad_proof");
    let unsigned = f.service.sign(
        &t,
        serde_json::to_value(request("up=alice", "acme", "rpcutil", "ping")).unwrap(),
        None,
        client(),
    );
    assert_eq!(code(denial(unsigned.await.unwrap())), "bad_proof");
    let garbage = f.service.sign("garbage", serde_json::json!({"callerid": "up=alice"}), None, client());
    assert_eq!(code(denial(garbage.await.unwrap())), "token_invalid");
    let malformed = f.service.sign(&t, serde_json::json!({"callerid": "up=alice"}), None, client());
    assert_eq!(code(denial(malformed.await.unwrap())), "malformed_request");

    // The service signs as a delegator: a node trusting the issuer accepts it for alice.
    assert_eq!(signed.delegator.as_deref(), Some(f.service.signer().token()));
    let issuers = Arc::new(Issuers::new().with(f.issuer.public_key().clone()));
    let now = chrono::Utc::now().timestamp();
    let reply_to = chorus_rpc::transport::reply_inbox("acme", "up=alice");
    let caller = RequestSecurity::new(issuers.clone()).authenticate(&signed, Some(&reply_to), now).unwrap();
    assert_eq!((caller.callerid.as_str(), caller.delegator.as_deref()), ("up=alice", Some("aaa=aaa1")));
    let mut changed = signed.clone();
    changed.request.action = "run".into();
    assert_eq!(
        RequestSecurity::new(issuers).authenticate(&changed, Some(&reply_to), now).unwrap_err().code,
        "bad_signature"
    );

    let records = audit_records(&*f.backbone).await;
    let codes: Vec<Option<&str>> = records.iter().map(|r| r.code.as_deref()).collect();
    assert_eq!(records.len(), 16, "{codes:#?}");
    assert_eq!(records.iter().filter(|r| r.action == AuditAction::Allow).count(), 2, "login and one signature");
    assert!(records.iter().all(|r| r.signer == "aaa1.example.net" && r.site == "london"));
    assert!(records.iter().all(|r| r.client.as_deref() == Some(CLIENT)), "every record has the client address");
    for wanted in [
        "bad_credentials",
        "bad_proof",
        "caller_mismatch",
        "wrong_tenant",
        "agent_not_allowed",
        "request_stale",
        "ttl_too_long",
        "token_invalid",
        "malformed_request",
    ] {
        assert!(codes.contains(&Some(wanted)), "no {wanted:?} in {codes:#?}");
    }
    assert_eq!(records[1].callerid, "unknown=mallory");
    assert!(!serde_json::to_string(&records).unwrap().contains("alice-pw"), "a password reached the audit trail");
    let jti = f.service.tokens().verify(&t).unwrap().jti;
    assert_eq!(
        records.iter().filter(|r| r.jti.as_deref() == Some(jti.as_str())).count(),
        11,
        "login, allow and nine denials"
    );
}

#[tokio::test]
async fn a_deleted_or_disabled_user_is_refused_with_a_live_token() {
    let f = fixture().await;
    let key = FileSigner::random(Algorithm::Ed25519);
    let (alice, gina) = (login(&f, "alice", &key).await, login(&f, "gina", &key).await);
    let ping = |caller: &str, collective: &str| request(caller, collective, "rpcutil", "ping");
    assert!(matches!(sign(&f, &alice, &key, &ping("up=alice", "acme")).await, Decision::Allow(_)));

    let path = f.dir.path().join("users.yaml");
    let mut disabled = user("alice", "acme", &["rpcutil.*"]);
    disabled.disabled = true;
    std::fs::write(&path, users_file(&[disabled, user("gina", "globex", &["*"])])).unwrap();
    assert_eq!(denial(sign(&f, &alice, &key, &ping("up=alice", "acme")).await).code(), "user_revoked");
    assert_eq!(
        denial(f.service.login(attempt("alice", "alice-pw", &key), client()).await.unwrap()).code(),
        "user_disabled"
    );
    std::fs::write(&path, users_file(&[user("gina", "globex", &["*"])])).unwrap();
    assert_eq!(denial(sign(&f, &alice, &key, &ping("up=alice", "acme")).await).code(), "user_revoked");
    // Others are unaffected.
    assert!(matches!(sign(&f, &gina, &key, &ping("up=gina", "globex")).await, Decision::Allow(_)));
    // A users file that cannot be read refuses everyone until it is fixed.
    std::fs::write(&path, "users: [{username: gina}]\n").unwrap();
    assert_eq!(denial(sign(&f, &gina, &key, &ping("up=gina", "globex")).await).code(), "users_unavailable");
    std::fs::write(&path, users_file(&[user("gina", "globex", &["*"])])).unwrap();
    assert!(matches!(sign(&f, &gina, &key, &ping("up=gina", "globex")).await, Decision::Allow(_)));
}

#[tokio::test]
async fn logins_are_rate_limited_per_user_and_per_address() {
    let limit = |burst| Limit { burst, every: Duration::from_secs(3600) };
    let f = fixture_with(LoginLimits { per_user: limit(3), per_address: limit(4) }).await;
    let key = FileSigner::random(Algorithm::Ed25519);
    let try_login = |name: &str, password: &str, from: &str| {
        let attempt = attempt(name, password, &key);
        let service = f.service.clone();
        let from: SocketAddr = from.parse().unwrap();
        async move { service.login(attempt, Some(from)).await.unwrap() }
    };
    for _ in 0..3 {
        assert_eq!(denial(try_login("alice", "guess", "192.0.2.1:1").await).code(), "bad_credentials");
    }
    // The fourth guess is not even looked at, even with the right password.
    assert_eq!(denial(try_login("alice", "alice-pw", "192.0.2.1:1").await).code(), "rate_limited");
    // Gina logs in from the same address (its fourth attempt: the refused one was not counted) ...
    assert!(matches!(try_login("gina", "gina-pw", "192.0.2.1:2").await, Decision::Allow(_)));
    // ... the address is then spent for everyone, not other addresses.
    assert_eq!(denial(try_login("gina", "gina-pw", "192.0.2.1:3").await).code(), "rate_limited");
    assert!(matches!(try_login("gina", "gina-pw", "198.51.100.9:1").await, Decision::Allow(_)));
    let records = audit_records(&*f.backbone).await;
    let limited: Vec<&AuditRecord> = records.iter().filter(|r| r.code.as_deref() == Some("rate_limited")).collect();
    assert_eq!(limited.len(), 2);
    assert_eq!(limited[0].client.as_deref(), Some("192.0.2.1:1"));
}

/// The HTTP API end to end, and an RPC client getting its requests signed for it: the
/// node side accepts the AAA signer as a delegator.
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
    let key: Arc<dyn Signer> = Arc::new(FileSigner::random(Algorithm::Ed25519));
    let e = aaa.login("alice", "nope", key.as_ref()).await.unwrap_err();
    assert!(matches!(&e, AaaError::Refused { status: 401, code, .. } if code == "bad_credentials"), "{e}");
    let grant = aaa.login("alice", "alice-pw", key.as_ref()).await.unwrap();
    assert_eq!(grant.callerid, "up=alice");
    let keys = aaa.keys().await.unwrap();
    assert_eq!(keys.signer.key_id, f.service.signer().signer().key_id());
    assert_eq!(keys.signer_credential, f.service.signer().token());
    assert_eq!(keys.jwt[0].key_id, f.service.tokens().signer().key_id());

    // A stand-in node: receives the envelope and checks it.
    let transport: Arc<dyn Transport> = Arc::new(LocalTransport::new());
    let mut requests = transport.subscribe("acme.broadcast.agent.rpcutil").await.unwrap();
    let rpc = RpcClient::new(transport.clone(), "up=alice", "acme").with_request_signer(Arc::new(AaaSigner::new(
        aaa.clone(),
        grant.token.clone(),
        key.clone(),
    )));
    let options = RequestOptions { timeout: Duration::from_millis(10), ..Default::default() };
    rpc.call("rpcutil", "ping", Default::default(), options.clone()).await.unwrap();
    let message = requests.next().await.unwrap();
    let envelope: RequestEnvelope = serde_json::from_slice(&message.payload).unwrap();
    let issuers = Arc::new(Issuers::new().with(f.issuer.public_key().clone()));
    let caller = RequestSecurity::new(issuers)
        .authenticate(&envelope, message.reply.as_deref(), chrono::Utc::now().timestamp())
        .unwrap();
    assert_eq!(caller.callerid, "up=alice");

    // Refused: nothing is published, the caller gets the reason.
    let e = rpc.call("puppet", "run", Default::default(), options).await.unwrap_err();
    assert!(e.to_string().contains("agent_not_allowed"), "{e}");
    // The token without its key.
    let e = aaa
        .sign(&grant.token, &request("up=alice", "acme", "rpcutil", "ping"), &FileSigner::random(Algorithm::Ed25519))
        .await
        .unwrap_err();
    assert!(matches!(&e, AaaError::Refused { status: 401, code, .. } if code == "bad_proof"), "{e}");
    let body = aaa.sign_json(&grant.token, serde_json::json!([1, 2]), None).await.unwrap_err();
    assert!(matches!(&body, AaaError::Refused { status: 403, code, .. } if code == "malformed_request"), "{body}");

    // The audit records carry the loopback address the client came from.
    let records = audit_records(&*f.backbone).await;
    assert!(records.iter().all(|r| r.client.as_deref().is_some_and(|c| c.starts_with("127.0.0.1:"))), "{records:#?}");

    stop.send(true).ok();
    server.await.unwrap().unwrap();
}
