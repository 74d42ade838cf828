//! The AAA service (`chorus aaa`) against a real nats-server: login with right and wrong
//! passwords; expired tokens, wrong tenants and agents outside the token refused; allowed
//! requests signed for the caller by the service's delegator credential, and accepted by a
//! node that authenticates every caller. Every decision is checked in `CHORUS_AUDIT`:
//! count, decision and reason.
//!
//! The service is started the way `chorus aaa --config` starts it ([`chorus_aaa::start`]), with its
//! audit records going straight to JetStream, so each record is stored before the HTTP
//! answer is sent and the counts below are exact.

use std::sync::Arc;
use std::time::Duration;

use chorus_aaa::{AaaClient, AaaConfig, AaaError, AaaSigner, RunningAaa};
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_keys::{Algorithm, FileSigner, Signer};
use chorus_platform::BackboneSink;
use chorus_platform::Emitter;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_rpc::agents::RpcUtil;
use chorus_rpc::{
    NatsTransport, NodeContext, RequestOptions, RequestSecurity, RpcClient, RpcServer, ServerOptions, Transport,
};
use chorus_runtime::{Service as _, Shutdown};
use chorus_schemas::{AuditAction, AuditRecord, Event, EventRecord, RpcRequest, StatusCode};

use crate::issuer::TestIssuer;
use crate::tenants::{as_user, broker};
use chorus_testkit::conformance::read_all;
use chorus_testkit::eventually;
use chorus_testkit::nats::NatsServer;

pub struct Aaa {
    pub running: RunningAaa,
    pub client: AaaClient,
    pub dir: tempfile::TempDir,
    /// The fleet's issuer, which gave the service its delegator credential.
    pub issuer: TestIssuer,
    /// The key this test's client logs in with.
    pub key: Arc<FileSigner>,
    audit: chorus_aaa::config::AuditConfig,
}

impl Aaa {
    /// Logs `user` in with the test client's key.
    pub async fn login(&self, user: &str, password: &str) -> Result<chorus_aaa::LoginGrant, AaaError> {
        self.client.login(user, password, self.key.as_ref()).await
    }

    /// Stops the service and starts it again in the same directory with `jwt` as its `jwt:`
    /// section (the users, signer and audit stay).
    pub async fn restart(&mut self, jwt: &str) {
        self.running.stop().await.unwrap();
        let config = aaa_config(self.dir.path(), self.audit.clone(), jwt, "");
        self.running = chorus_aaa::start(&config, Shutdown::new(), Duration::from_secs(5)).await.unwrap();
        self.client = AaaClient::new(&format!("http://{}", self.running.addr), None).unwrap();
    }

    /// Has `request` signed with `token` and the test client's key.
    pub async fn sign(&self, token: &str, request: &RpcRequest) -> Result<chorus_rpc::RequestEnvelope, AaaError> {
        self.client.sign(token, request, self.key.as_ref()).await
    }
}

/// Starts the service from a configuration file, as `chorus aaa --config` does. Users:
/// alice (tenant acme, `rpcutil.*` and `puppet.status`), gina (tenant globex, `*`).
pub async fn start_aaa(audit: NatsConfig) -> Aaa {
    start_aaa_with(audit, "").await
}

/// As [`start_aaa`], with more top-level configuration (e.g. `login:` limits).
pub async fn start_aaa_with(audit: NatsConfig, more: &str) -> Aaa {
    start_aaa_audit(chorus_aaa::config::AuditConfig { nats: Some(audit), state_dir: None }, more).await
}

/// As [`start_aaa_with`], with the audit section given whole (an outbox in `state_dir`).
pub async fn start_aaa_audit(audit: chorus_aaa::config::AuditConfig, more: &str) -> Aaa {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    FileSigner::generate(d.join("jwt.pem"), Algorithm::Ed25519).unwrap();
    let issuer = TestIssuer::new();
    issuer.files(d, "signer", |key| {
        let mut spec = chorus_identity::CredentialSpec::client("aaa=aaa1", key, Duration::from_secs(86_400));
        spec.delegator = true;
        spec
    });
    let alice = chorus_aaa::hash_password("alice-pw").unwrap();
    let gina = chorus_aaa::hash_password("gina-pw").unwrap();
    std::fs::write(
        d.join("users.yaml"),
        format!(
            r#"users:
  - {{username: alice, password_hash: "{alice}", callerid: up=alice, tenant: acme, agents: ["rpcutil.*", "puppet.status"], properties: {{team: web}}}}
  - {{username: gina, password_hash: "{gina}", callerid: up=gina, tenant: globex, agents: ["*"]}}
"#
        ),
    )
    .unwrap();
    let jwt = format!("{{key: {{key_file: {}/jwt.pem}}, validity: 1h}}", d.display());
    let config = aaa_config(d, audit.clone(), &jwt, more);
    let running = chorus_aaa::start(&config, Shutdown::new(), Duration::from_secs(5)).await.unwrap();
    let client = AaaClient::new(&format!("http://{}", running.addr), None).unwrap();
    Aaa { running, client, dir, issuer, key: Arc::new(FileSigner::random(Algorithm::Ed25519)), audit }
}

/// The service's configuration in directory `d`, with `jwt` as its `jwt:` section.
fn aaa_config(d: &std::path::Path, audit: chorus_aaa::config::AuditConfig, jwt: &str, more: &str) -> AaaConfig {
    AaaConfig {
        audit,
        ..AaaConfig::from_yaml(&aaa_yaml(d, jwt, &format!("{{state_dir: {}/unused}}", d.display()), more)).unwrap()
    }
}

/// The configuration file of a service whose keys, credential and users are in `d` (as
/// [`start_aaa`] makes them), with `jwt` and `audit` as those sections.
pub fn aaa_yaml(d: &std::path::Path, jwt: &str, audit: &str, more: &str) -> String {
    format!(
        r#"
identity: aaa1.example.net
site: london
listen: 127.0.0.1:0
users_file: {d}/users.yaml
tenants:
  acme: {{collectives: [acme]}}
  globex: {{collectives: [globex]}}
jwt: {jwt}
signer: {{key: {{key_file: {d}/signer.key}}, credential: {d}/signer.cred}}
audit: {audit}
{more}
"#,
        d = d.display()
    )
}

pub async fn site(server: &NatsServer) -> Arc<dyn Backbone> {
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    b
}

/// The AAA service's audit records in `CHORUS_AUDIT`, in order, with the subject each was
/// stored under.
pub async fn audit_records(b: &dyn Backbone) -> Vec<(String, AuditRecord)> {
    audit_records_of(b, "aaa1.example.net").await
}

/// The audit records `identity` (the AAA service or a node) stored in `CHORUS_AUDIT`.
pub async fn audit_records_of(b: &dyn Backbone, identity: &str) -> Vec<(String, AuditRecord)> {
    read_all(b, "CHORUS_AUDIT")
        .await
        .into_iter()
        .filter_map(|m| {
            let record = EventRecord::decode(&m.payload).expect("audit events decode");
            let Event::Audit(a) = record.data else { panic!("not an audit record: {record:?}") };
            (record.subject == identity).then_some((m.subject, a))
        })
        .collect()
}

pub fn request(callerid: &str, collective: &str, agent: &str, action: &str) -> RpcRequest {
    RpcRequest::new(callerid, "laptop.example.net", collective, agent, action, Default::default())
}

pub fn refused_code(result: Result<impl std::fmt::Debug, AaaError>, status: u16) -> String {
    match result {
        Err(AaaError::Refused { status: s, code, .. }) if s == status => code,
        other => panic!("expected a {status} refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_right_and_wrong_password() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let mut aaa = start_aaa(NatsConfig::new([server.url()])).await;

    assert_eq!(refused_code(aaa.login("alice", "alice-pw-wrong").await, 401), "bad_credentials");
    assert_eq!(refused_code(aaa.login("mallory", "whatever").await, 401), "bad_credentials");
    let grant = aaa.login("alice", "alice-pw").await.unwrap();
    assert_eq!(grant.callerid, "up=alice");
    let claims = aaa.running.service.tokens().verify(&grant.token).unwrap();
    assert_eq!((claims.tenant.as_str(), claims.collectives.as_slice()), ("acme", &["acme".to_string()][..]));
    assert_eq!(claims.agents, ["rpcutil.*", "puppet.status"]);
    assert_eq!(claims.exp - claims.iat, 3600, "default validity 1h");
    assert_eq!(claims.user_properties["team"], "web");

    let records = audit_records(&*b).await;
    assert_eq!(records.len(), 3, "{records:#?}");
    let (subject, wrong) = &records[0];
    assert_eq!(subject, "chorus.audit.deny.london");
    assert_eq!((wrong.callerid.as_str(), wrong.action), ("up=alice", AuditAction::Deny));
    assert_eq!(wrong.reason.as_deref(), Some("bad username or password"));
    assert_eq!(records[1].1.callerid, "unknown=mallory");
    assert_eq!(records[1].1.action, AuditAction::Deny);
    let (subject, ok) = &records[2];
    assert_eq!(subject, "chorus.audit.allow.london");
    assert_eq!((ok.action, ok.reason.as_deref()), (AuditAction::Allow, None));
    assert_eq!(ok.jti.as_deref(), Some(claims.jti.as_str()), "the login record names the token it issued");
    assert_eq!(ok.request["action"], "login");
    let all = serde_json::to_string(&records.iter().map(|r| &r.1).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains("alice-pw"), "a password reached the audit trail");
    aaa.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused_and_audited() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let mut aaa = start_aaa(NatsConfig::new([server.url()])).await;
    let tokens = aaa.running.service.tokens();
    // A token the service itself issued two hours ago for one hour.
    let users = chorus_aaa::Users::load(&aaa.dir.path().join("users.yaml")).unwrap();
    let issued = chrono::Utc::now().timestamp() - 7200;
    let claims = tokens.claims_for(users.get("alice").unwrap(), &["acme".into()], aaa.key.public_key().clone(), issued);
    let expired = tokens.sign(&claims).unwrap();

    let code = refused_code(aaa.sign(&expired, &request("up=alice", "acme", "rpcutil", "ping")).await, 401);
    assert_eq!(code, "token_expired");

    let records = audit_records(&*b).await;
    assert_eq!(records.len(), 1, "{records:#?}");
    let (subject, r) = &records[0];
    assert_eq!(subject, "chorus.audit.deny.london");
    assert_eq!((r.action, r.reason.as_deref()), (AuditAction::Deny, Some("token expired")));
    assert_eq!(r.callerid, "up=alice");
    assert_eq!(r.request["agent"], "rpcutil", "the refused request is in the record");
    aaa.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tenant_is_refused_and_audited() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let mut aaa = start_aaa(NatsConfig::new([server.url()])).await;
    let alice = aaa.login("alice", "alice-pw").await.unwrap();
    let jti = aaa.running.service.tokens().verify(&alice.token).unwrap().jti;

    // alice (acme) addressing globex's collective, even with an agent she may call.
    let code = refused_code(aaa.sign(&alice.token, &request("up=alice", "globex", "rpcutil", "ping")).await, 403);
    assert_eq!(code, "wrong_tenant");
    // Pretending to be gina does not help: the caller must be the token's.
    let code = refused_code(aaa.sign(&alice.token, &request("up=gina", "globex", "rpcutil", "ping")).await, 403);
    assert_eq!(code, "caller_mismatch");

    let records = audit_records(&*b).await;
    assert_eq!(records.len(), 3, "login, two denials: {records:#?}");
    let (subject, wrong) = &records[1];
    assert_eq!(subject, "chorus.audit.deny.london");
    assert_eq!(wrong.action, AuditAction::Deny);
    let reason = wrong.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("wrong tenant") && reason.contains("\"globex\"") && reason.contains("\"acme\""),
        "{reason}"
    );
    assert_eq!(wrong.jti.as_deref(), Some(jti.as_str()));
    assert!(records[2].1.reason.as_deref().unwrap().contains("does not match the token"), "{:?}", records[2].1.reason);
    assert!(records.iter().all(|(_, r)| r.client.as_deref().is_some_and(|c| c.starts_with("127.0.0.1:"))));
    aaa.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_outside_the_tokens_agents_is_refused_and_audited() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let mut aaa = start_aaa(NatsConfig::new([server.url()])).await;
    let alice = aaa.login("alice", "alice-pw").await.unwrap();

    for (agent, action) in [("puppet", "run"), ("shell", "run")] {
        let code = refused_code(aaa.sign(&alice.token, &request("up=alice", "acme", agent, action)).await, 403);
        assert_eq!(code, "agent_not_allowed");
    }
    // puppet.status is listed explicitly, rpcutil by wildcard.
    aaa.sign(&alice.token, &request("up=alice", "acme", "puppet", "status")).await.unwrap();

    let records = audit_records(&*b).await;
    let decisions: Vec<(AuditAction, Option<&str>)> =
        records.iter().map(|(_, r)| (r.action, r.reason.as_deref())).collect();
    assert_eq!(
        decisions,
        [
            (AuditAction::Allow, None),
            (AuditAction::Deny, Some(r#"agent not allowed: puppet.run is not in ["rpcutil.*", "puppet.status"]"#)),
            (AuditAction::Deny, Some(r#"agent not allowed: shell.run is not in ["rpcutil.*", "puppet.status"]"#)),
            (AuditAction::Allow, None),
        ]
    );
    aaa.running.stop().await.unwrap();
}

/// The whole chain on a broker configured by `chorus broker config`: the AAA service audits
/// as the least-privilege `aaa` user; an RPC client holding no credential has its request
/// signed for it; the node, trusting the fleet's issuer, runs it as the caller, and refuses
/// the same request unsigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_request_is_signed_audited_and_run_by_a_verifying_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = broker(
        &dir.path().join("unused"),
        r#"  acme:
    collectives: [acme]
    users:
      - {user: acme-admin, role: admin, password: acme-admin-pw}
      - {user: acme-aaa, role: aaa, password: acme-aaa-pw}
      - {user: acme-agent, role: agent, password: acme-agent-pw}
      - {user: acme-client, role: client, password: acme-client-pw, callerid: up=alice}
  globex:
    collectives: [globex]
    users: [{user: globex-admin, role: admin, password: globex-admin-pw}]
"#,
    );
    let as_user = |user: &str| as_user(&server, user);
    let admin: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&as_user("acme-admin")).await.unwrap());
    ensure_platform_streams(&*admin, &StreamLimits::default()).await.unwrap();
    let mut aaa = start_aaa(as_user("acme-aaa")).await;

    // The node: trusts the fleet's issuer; its policy would allow anyone.
    let security = Arc::new(RequestSecurity::new(aaa.issuer.issuers()));
    let policies = dir.path().join("policy");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("rpcutil.policy"), "policy default deny\nallow\t*\t*\t*\t*\n").unwrap();
    let agent_conn = as_user("acme-agent").connect(None).await.unwrap();
    let node_site: Arc<dyn Backbone> =
        Arc::new(JetStreamBackbone::from_client(agent_conn.clone(), &as_user("acme-agent")));
    let emitter = Arc::new(Emitter::new(Arc::new(BackboneSink(node_site)), 1, Some("london".into())));
    let options = ServerOptions { security: Some(security), ..Default::default() };
    let node_transport: Arc<dyn Transport> = Arc::new(NatsTransport::new(agent_conn));
    let server_rpc = RpcServer::new(node_transport, vec![Arc::new(RpcUtil)], Some(policies), options).unwrap();
    let node_identity = aaa.issuer.node("node1.acme.net");
    server_rpc.add_node(NodeContext::new("node1.acme.net", "acme"), emitter, Some(node_identity)).await.unwrap();

    // The caller logs in and holds nothing but the token.
    let grant = aaa.login("alice", "alice-pw").await.unwrap();
    let client_conn = as_user("acme-client").connect(None).await.unwrap();
    let transport: Arc<dyn Transport> = Arc::new(NatsTransport::new(client_conn));
    let signed_rpc = RpcClient::new(transport.clone(), grant.callerid.clone(), "acme")
        .with_senderid("laptop.acme.net")
        .with_request_signer(Arc::new(AaaSigner::new(aaa.client.clone(), grant.token.clone(), aaa.key.clone())))
        .with_trust(aaa.issuer.issuers());
    let options = RequestOptions { expected: Some(1), timeout: Duration::from_secs(30), ..Default::default() };
    let results = signed_rpc.call("rpcutil", "ping", Default::default(), options.clone()).await.unwrap();
    let signed_requestid = results.request.requestid.clone();
    assert_eq!(results.replies.len(), 1);
    assert_eq!(results.replies[0].statuscode, StatusCode::Ok, "{:?}", results.replies[0]);

    // Refused by the signer: nothing is sent.
    let e = signed_rpc.call("shell", "run", Default::default(), options.clone()).await.unwrap_err();
    assert!(e.to_string().contains("agent_not_allowed"), "{e}");

    // The same request unsigned: the node refuses it although its policy allows it.
    let unsigned_rpc = RpcClient::new(transport, grant.callerid.clone(), "acme").with_senderid("laptop.acme.net");
    let results = unsigned_rpc.call("rpcutil", "ping", Default::default(), options).await.unwrap();
    assert_eq!(results.replies.len(), 1);
    let refused = &results.replies[0];
    assert_eq!((refused.statuscode, refused.authorized), (StatusCode::Aborted, false), "{refused:?}");
    assert!(refused.policy.as_deref().unwrap_or_default().contains("refused (unsigned)"), "{refused:?}");

    let records = audit_records(&*admin).await;
    let decisions: Vec<(AuditAction, &str, &str)> = records
        .iter()
        .map(|(_, r)| {
            (
                r.action,
                r.request.get("agent").and_then(|v| v.as_str()).unwrap_or("-"),
                r.reason.as_deref().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(records.len(), 3, "{decisions:#?}");
    assert_eq!((records[0].1.action, records[0].1.request["action"].as_str()), (AuditAction::Allow, Some("login")));
    let (subject, allow) = &records[1];
    assert_eq!(subject, "chorus.audit.allow.london");
    assert_eq!((allow.action, allow.callerid.as_str()), (AuditAction::Allow, "up=alice"));
    assert_eq!(allow.request["requestid"], signed_requestid.as_str(), "the allow record is the request the node ran");
    assert_eq!(records[2].1.action, AuditAction::Deny);
    assert!(records[2].1.reason.as_deref().unwrap().starts_with("agent not allowed: shell.run"));

    // The node's refusal is audited by the node, with its reason.
    let refusals = eventually("the node's audited refusal", Duration::from_secs(30), || {
        let admin = &*admin;
        async move {
            let records = audit_records_of(admin, "node1.acme.net").await;
            if records.is_empty() {
                Err("no audit record from the node yet".to_string())
            } else {
                Ok(records)
            }
        }
    })
    .await;
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    let (subject, refusal) = &refusals[0];
    assert_eq!((subject.as_str(), refusal.action), ("chorus.audit.deny.london", AuditAction::Deny));
    assert_eq!(refusal.code.as_deref(), Some("unsigned"), "{refusal:?}");

    // Audit records exist only in acme's account.
    let globex = as_user("globex-admin");
    let globex: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&globex).await.unwrap());
    assert!(globex.stream_info("CHORUS_AUDIT").await.is_err(), "globex has no audit stream of acme's");
    aaa.running.stop().await.unwrap();
}

/// The refusals `code` in the audit trail, once there (the audit record is stored before the
/// answer, so it is there at once).
async fn audited(b: &dyn Backbone, code: &str) -> Vec<AuditRecord> {
    audit_records(b).await.into_iter().map(|(_, r)| r).filter(|r| r.code.as_deref() == Some(code)).collect()
}

/// Alice logs in and is then deleted from the users file (written anew, as configuration
/// management does): her unexpired token signs nothing more. Gina, still in the file, goes
/// on signing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_user_with_a_live_token_is_refused_and_audited() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let mut aaa = start_aaa(NatsConfig::new([server.url()])).await;
    let alice = aaa.login("alice", "alice-pw").await.unwrap();
    let gina = aaa.login("gina", "gina-pw").await.unwrap();
    aaa.sign(&alice.token, &request("up=alice", "acme", "rpcutil", "ping")).await.unwrap();

    let users = aaa.dir.path().join("users.yaml");
    let kept: String = std::fs::read_to_string(&users)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("username: alice"))
        .map(|l| format!("{l}\n"))
        .collect();
    let next = users.with_extension("new");
    std::fs::write(&next, kept).unwrap();
    std::fs::rename(&next, &users).unwrap();

    let code = refused_code(aaa.sign(&alice.token, &request("up=alice", "acme", "rpcutil", "ping")).await, 401);
    assert_eq!(code, "user_revoked");
    aaa.sign(&gina.token, &request("up=gina", "globex", "rpcutil", "ping")).await.expect("gina still signs");

    let refusals = audited(&*b, "user_revoked").await;
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert_eq!((refusals[0].action, refusals[0].callerid.as_str()), (AuditAction::Deny, "up=alice"));
    assert!(refusals[0].client.is_some(), "the client address is recorded: {:?}", refusals[0]);
    aaa.running.stop().await.unwrap();
}

/// The token key is rotated: during the overlap (old key under `previous_keys`) tokens of
/// the old key still sign and new logins get tokens of the new key; once the old key is
/// removed its tokens are refused, and audited, while new tokens go on signing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_key_keeps_old_tokens_until_removed() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let mut aaa = start_aaa(NatsConfig::new([server.url()])).await;
    let ping = request("up=alice", "acme", "rpcutil", "ping");
    let old = aaa.login("alice", "alice-pw").await.unwrap();

    let d = aaa.dir.path().to_path_buf();
    let previous = FileSigner::load(d.join("jwt.pem")).unwrap();
    std::fs::write(d.join("jwt-old.pub"), previous.public_key().to_pem()).unwrap();
    FileSigner::generate(d.join("jwt-new.pem"), Algorithm::EcdsaP256).unwrap();
    let overlap = format!(
        "{{key: {{key_file: {d}/jwt-new.pem}}, previous_keys: [{d}/jwt-old.pub], validity: 1h}}",
        d = d.display()
    );
    aaa.restart(&overlap).await;
    aaa.sign(&old.token, &ping).await.expect("an old token signs during the overlap");
    let new = aaa.login("alice", "alice-pw").await.unwrap();
    assert_ne!(new.token, old.token);
    let keys = aaa.client.keys().await.unwrap();
    assert_eq!(keys.jwt.len(), 2, "both token keys are published during the overlap: {keys:?}");

    aaa.restart(&format!("{{key: {{key_file: {d}/jwt-new.pem}}, validity: 1h}}", d = d.display())).await;
    assert_eq!(refused_code(aaa.sign(&old.token, &ping).await, 401), "token_unknown_key");
    aaa.sign(&new.token, &ping).await.expect("a token of the current key signs");

    let refusals = audited(&*b, "token_unknown_key").await;
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert_eq!(refusals[0].action, AuditAction::Deny);
    aaa.running.stop().await.unwrap();
}

/// Guessing alice's password: after three attempts the service answers 429 without looking
/// at the password (the right one included) and audits each refusal with the client
/// address; gina, another user, logs in meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_brute_force_is_rate_limited_and_audited() {
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let limits = "login: {per_user: {burst: 3, every: 1h}, per_address: {burst: 50, every: 1s}}";
    let mut aaa = start_aaa_with(NatsConfig::new([server.url()]), limits).await;
    for guess in ["123456", "password", "alice"] {
        assert_eq!(refused_code(aaa.login("alice", guess).await, 401), "bad_credentials");
    }
    assert_eq!(refused_code(aaa.login("alice", "qwerty").await, 429), "rate_limited");
    assert_eq!(refused_code(aaa.login("alice", "alice-pw").await, 429), "rate_limited", "the password is not tried");
    let gina = aaa.login("gina", "gina-pw").await.expect("another user logs in");
    assert_eq!(gina.callerid, "up=gina");

    let limited = audited(&*b, "rate_limited").await;
    assert_eq!(limited.len(), 2, "{limited:#?}");
    for r in &limited {
        assert_eq!((r.action, r.request["username"].as_str()), (AuditAction::Deny, Some("alice")), "{r:?}");
        assert!(r.client.as_deref().unwrap_or_default().starts_with("127.0.0.1"), "{r:?}");
    }
    aaa.running.stop().await.unwrap();
}

/// An AAA service with an audit outbox, started before its broker has the platform streams:
/// `/healthz` is 503 within 5 s saying what to run, logins work and are audited into the
/// outbox meanwhile, and once the streams exist it is healthy and every record reaches
/// `CHORUS_AUDIT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aaa_started_before_its_streams_exist_is_not_ready_then_delivers_every_record() {
    let server = NatsServer::start().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    let state = tempfile::tempdir().unwrap();
    let audit = chorus_aaa::config::AuditConfig {
        nats: Some(NatsConfig::new([server.url()])),
        state_dir: Some(state.path().to_path_buf()),
    };
    let mut aaa = start_aaa_audit(audit, "").await;
    let ops = aaa.running.addr;
    let health = |want: &'static str| async move {
        match tokio::time::timeout(Duration::from_secs(5), crate::replicate::try_http_get(ops, "/healthz")).await {
            Ok(Ok(body)) if body.starts_with(want) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    };
    let body = eventually("503 while the streams are missing", Duration::from_secs(5), || health("HTTP/1.1 503")).await;
    assert!(body.contains("chorus streams create"), "{body}");
    aaa.login("alice", "alice-pw").await.unwrap();
    assert_eq!(refused_code(aaa.login("alice", "wrong").await, 401), "bad_credentials");
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    eventually("200 once the streams exist", Duration::from_secs(30), || health("HTTP/1.1 200")).await;
    eventually("both records in CHORUS_AUDIT", Duration::from_secs(30), || {
        let b = b.clone();
        async move {
            let n = audit_records(&*b).await.len();
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        }
    })
    .await;
    aaa.running.stop().await.unwrap();
}
