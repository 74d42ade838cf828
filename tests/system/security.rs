//! Signatures and PKCS#11 against a real SoftHSM2 token and a real nats-server, with both
//! algorithms (Ed25519, and ECDSA P-256 for tokens without Ed25519):
//!
//! * keys generated on the token never leave it and reopen by label;
//! * events (and RPC request records) signed with a node key on the token, under its node
//!   credential, verify; a projector trusting the issuer dead-letters unsigned, tampered,
//!   foreign and misattributed events with the reason while applying the rest;
//! * mutual TLS to nats-server (`verify: true`) with the client certificate's private key on
//!   the token, and events published and replayed through that connection.
//!
//! Each test gets its own SoftHSM2 token directory (`SOFTHSM2_CONF` pointing at a temporary
//! config, set before the PKCS#11 module is initialized in this process; nextest runs every
//! test in a process of its own).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_consumers::projection::{Projector, ProjectorOptions, Store, Txn, View, ViewError};
use chorus_identity::{Credential, CredentialSpec, Issuers};
use chorus_keys::{Algorithm, FileSigner, KeyConfig, Pkcs11Config, Pkcs11Signer, Signer};
use chorus_platform::deadletter::DeadLetter;
use chorus_platform::ensure_platform_streams;
use chorus_platform::to_message;
use chorus_runtime::tls::client_config_with_signer;
use chorus_runtime::TlsClientConfig;
use chorus_schemas::lifecycle::Alive;
use chorus_schemas::rpc::RpcRequest;
use chorus_schemas::signature::{Verifier, VerifyError};
use chorus_schemas::subject::{CHORUS_DEADLETTER, CHORUS_LIFECYCLE};
use chorus_schemas::{Event, EventRecord, Lifecycle};
use chorus_testkit::conformance::read_all;
use chorus_testkit::nats::NatsServer;

const TOKEN: &str = "chorus";
const PIN: &str = "1234";
const SO_PIN: &str = "5678";

/// A SoftHSM2 token initialized in a temporary directory, with `SOFTHSM2_CONF` set for this
/// process.
struct SoftHsm {
    dir: tempfile::TempDir,
}

impl SoftHsm {
    /// Call before any runtime or PKCS#11 use: it sets an environment variable.
    fn init() -> SoftHsm {
        let module = Path::new(chorus_keys::DEFAULT_PKCS11_MODULE);
        assert!(module.exists(), "{} is missing: run scripts/setup (Debian package softhsm2)", module.display());
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
        )
        .unwrap();
        // SAFETY of set_var: no other thread runs yet (tests call this first, before a runtime).
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN])
            .output()
            .expect("softhsm2-util (Debian package softhsm2; scripts/setup installs it)");
        assert!(out.status.success(), "softhsm2-util --init-token: {}", String::from_utf8_lossy(&out.stderr));
        SoftHsm { dir }
    }

    fn config(&self, key_label: &str) -> Pkcs11Config {
        Pkcs11Config::new(TOKEN, PIN, key_label)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn alive(node: &str, version: &str, seq: u64) -> EventRecord {
    EventRecord::new(Alive::new(node, "server", version, Some(300)), seq)
}

#[test]
fn the_token_key_is_generated_once_never_leaves_and_reopens_by_label() {
    let hsm = SoftHsm::init();
    // A wrong PIN is refused. (Checked first: PKCS#11 login state belongs to the process, so
    // once one session has logged in, the token no longer checks the PIN of later ones.)
    let mut wrong = hsm.config("events");
    wrong.pin = Some("0000".into());
    let err = Pkcs11Signer::open(&wrong).unwrap_err();
    assert!(err.to_string().contains("pkcs11 login") && err.to_string().contains("wrong PIN"), "{err}");
    for algorithm in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
        let label = format!("events-{algorithm}");
        let generated = Pkcs11Signer::generate(&hsm.config(&label), algorithm).unwrap();
        assert_eq!(generated.algorithm(), algorithm);
        // A second key with the same label is refused.
        let err = Pkcs11Signer::generate(&hsm.config(&label), algorithm).unwrap_err();
        assert!(err.to_string().contains("already has objects labelled"), "{err}");

        // Reopened from another signer (PIN from a file this time): the same key.
        let pin_file = hsm.path("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        let mut config = hsm.config(&label);
        config.pin = None;
        config.pin_file = Some(pin_file);
        let reopened = Pkcs11Signer::open(&config).unwrap();
        assert_eq!(reopened.public_key(), generated.public_key());
        assert_eq!(reopened.key_id(), chorus_keys::key_id(generated.public_key().as_bytes()));

        // The token's signatures check with the public key alone, as any verifier does.
        let sig = reopened.sign(b"message").unwrap();
        assert!(generated.public_key().verify(b"message", &sig), "{algorithm}");
        assert!(!generated.public_key().verify(b"messagE", &sig), "{algorithm}");
        if algorithm == Algorithm::Ed25519 {
            // Ed25519 is deterministic: both handles give the same signature.
            assert_eq!(generated.sign(b"message").unwrap(), sig);
        }

        // The private key is sensitive and not extractable: its value cannot be read.
        use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
        use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
        use cryptoki::session::UserType;
        let ctx = Pkcs11::new(chorus_keys::DEFAULT_PKCS11_MODULE).unwrap();
        // Already initialized in this process by the signers.
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).ok();
        let slot = cryptoki::slot::Slot::try_from(generated.slot_id()).unwrap();
        let session = ctx.open_ro_session(slot).unwrap();
        session.login(UserType::User, Some(&PIN.into())).ok();
        let private = session
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(label.as_bytes().to_vec())])
            .unwrap();
        assert_eq!(private.len(), 1);
        let info = session.get_attribute_info(private[0], &[AttributeType::Value]).unwrap();
        assert!(matches!(info[0], AttributeInfo::Sensitive), "{:?}", info[0]);
        let flags =
            session.get_attributes(private[0], &[AttributeType::Sensitive, AttributeType::Extractable]).unwrap();
        assert!(
            flags.contains(&Attribute::Sensitive(true)) && flags.contains(&Attribute::Extractable(false)),
            "{flags:?}"
        );
    }

    // Unknown key label, unknown token: clear errors at open.
    let err = Pkcs11Signer::open(&hsm.config("absent")).unwrap_err();
    assert!(err.to_string().contains("no private key labelled \"absent\""), "{err}");
    let mut other_token = hsm.config("events-ed25519");
    other_token.token_label = Some("nope".into());
    assert!(Pkcs11Signer::open(&other_token).unwrap_err().to_string().contains("no token labelled"));
}

/// A view that records the version of each node it applies.
struct Versions;

impl View for Versions {
    fn name(&self) -> &str {
        "signed_versions"
    }

    fn apply(&mut self, _sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        if let Event::Lifecycle(Lifecycle::Alive(a)) = &record.data {
            txn.insert_json(format!("node/{}", a.identity).as_bytes(), &a.version)?;
        }
        Ok(())
    }
}

#[test]
fn token_signed_events_verify_and_a_projector_dead_letters_forged_and_unsigned_ones() {
    let hsm = SoftHsm::init();
    for algorithm in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
        token_signed_events(&hsm, algorithm);
    }
}

/// n1's key on the token, with a node credential for n1 from the issuer the projector trusts.
fn token_signed_events(hsm: &SoftHsm, algorithm: Algorithm) {
    let signer = Arc::new(Pkcs11Signer::generate(&hsm.config(&format!("n1-{algorithm}")), algorithm).unwrap());
    let issuer = FileSigner::random(Algorithm::EcdsaP256);
    let now = chrono::Utc::now().timestamp() - 60;
    let node = |identity: &str, key: &dyn Signer, issuer: &FileSigner| {
        let spec = CredentialSpec::node(identity, key.public_key().clone(), std::time::Duration::from_secs(3600));
        Credential::issue(issuer, &spec, now).unwrap().token().to_string()
    };
    let n1 = node("n1.example.net", &*signer, &issuer);
    let stranger = FileSigner::random(algorithm);
    let stranger_cred = node("n4.example.net", &stranger, &FileSigner::random(Algorithm::Ed25519));
    let verifier = Arc::new(Verifier::new(Arc::new(Issuers::new().with(issuer.public_key().clone()))));
    let sign = |r: EventRecord| r.signed(&*signer, Some(&n1)).unwrap();

    // Signed on the token, through the wire format, verified.
    let good = sign(alive("n1.example.net", "1.0.0", 1));
    let decoded = EventRecord::decode(&good.encode()).unwrap();
    assert_eq!(verifier.verify(&decoded).unwrap().identity, "n1.example.net");

    // RPC request records are signed and verified the same way.
    let mut data = chorus_schemas::rpc::JsonObject::new();
    data.insert("service".into(), "nginx".into());
    let request = sign(EventRecord::new(
        RpcRequest::new("choria=ops", "ops.example.net", "choria", "service", "restart", data),
        1,
    ));
    let decoded = EventRecord::decode(&request.encode()).unwrap();
    assert!(verifier.verify(&decoded).is_ok());
    let mut escalated = decoded.clone();
    if let Event::RpcRequest(r) = &mut escalated.data {
        r.action = "stop".into();
    }
    assert_eq!(verifier.verify(&escalated), Err(VerifyError::BadSignature(signer.key_id().into())));

    // Tampered after signing: the payload changed on the wire, signature kept.
    let signed = sign(alive("n1.example.net", "1.0.0", 2));
    let mut wire: serde_json::Value = serde_json::from_slice(&signed.encode()).unwrap();
    wire["data"]["version"] = "6.6.6".into();
    let tampered = serde_json::to_vec(&wire).unwrap();

    let unsigned = alive("n3.example.net", "1.0.0", 3);
    let by_stranger = alive("n4.example.net", "1.0.0", 4).signed(&stranger, Some(&stranger_cred)).unwrap();
    // A stranger's signature claiming the token's key id and credential: forged.
    let mut forged = alive("n1.example.net", "1.0.0", 5).signed(&stranger, Some(&n1)).unwrap();
    forged.signature.as_mut().unwrap().key_id = signer.key_id().to_owned();
    // n1's key signing an event about n5: refused.
    let misattributed = sign(alive("n5.example.net", "1.0.0", 6));
    let last = sign(alive("n1.example.net", "2.0.0", 7));

    let server = NatsServer::start().unwrap();
    runtime().block_on(async {
        let backbone: Arc<dyn Backbone> =
            Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
        ensure_platform_streams(&*backbone, &Default::default()).await.unwrap();
        let mut tampered_message = to_message(&signed).unwrap();
        tampered_message.payload = tampered.into();
        let messages = vec![
            to_message(&good).unwrap(),
            tampered_message,
            to_message(&unsigned).unwrap(),
            to_message(&by_stranger).unwrap(),
            to_message(&forged).unwrap(),
            to_message(&misattributed).unwrap(),
            to_message(&last).unwrap(),
        ];
        backbone.publish_batch(messages).await.unwrap();

        let store = Store::temporary().unwrap();
        let options = ProjectorOptions { verifier: Some(verifier.clone()), ..Default::default() };
        let mut projector =
            Projector::new(backbone.clone(), CHORUS_LIFECYCLE, &store, Versions).unwrap().with_options(options);
        let stats = projector.catch_up().await.unwrap();
        assert_eq!((stats.applied, stats.dead_lettered, stats.checkpoint), (2, 5, 7));
        let state = projector.state();
        assert_eq!(state.get_json::<String>(b"node/n1.example.net").unwrap().as_deref(), Some("2.0.0"));
        for refused in ["n3", "n4", "n5"] {
            let key = format!("node/{refused}.example.net");
            assert_eq!(state.get_json::<String>(key.as_bytes()).unwrap(), None, "{refused} was applied");
        }

        let letters: Vec<DeadLetter> = read_all(&*backbone, CHORUS_DEADLETTER)
            .await
            .iter()
            .map(|m| DeadLetter::from_message(m).unwrap())
            .collect();
        let summary: Vec<(u64, &str)> = letters.iter().map(|l| (l.sequence, l.code.as_str())).collect();
        assert_eq!(
            summary,
            vec![
                (2, "bad_signature"),
                (3, "unsigned"),
                (4, "unknown_issuer"),
                (5, "bad_signature"),
                (6, "wrong_identity")
            ]
        );
        assert!(letters.iter().all(|l| l.origin == "signed_versions" && l.stream == CHORUS_LIFECYCLE));
        assert!(letters[0].reason.contains("tampered or forged"), "{}", letters[0].reason);
        assert!(letters[0].payload.as_deref().unwrap().contains("6.6.6"));
        assert_eq!(letters[1].reason, "event is not signed");
        assert!(letters[4].reason.contains("n5.example.net"), "{}", letters[4].reason);
    });
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate for `client_key` (a
/// public key only: its private key stays on the token).
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
}

/// The token's public key, for rcgen to put in a certificate.
struct TokenPublicKey(chorus_keys::PublicKey);

impl rcgen::PublicKeyData for TokenPublicKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.0.algorithm() {
            Algorithm::Ed25519 => &rcgen::PKCS_ED25519,
            Algorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

fn pki(dir: &Path, client_key: chorus_keys::PublicKey) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Chorus security test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "localhost");
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();

    let mut client = CertificateParams::new(vec!["agent.example.net".to_string()]).unwrap();
    client.distinguished_name.push(DnType::CommonName, "agent.example.net");
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.use_authority_key_identifier_extension = true;
    let client_cert = client.signed_by(&TokenPublicKey(client_key), &issuer).unwrap();

    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert.pem()),
        server_key: write("server-key.pem", server_key.serialize_pem()),
        client_cert: write("client.pem", client_cert.pem()),
    }
}

#[test]
fn mutual_tls_to_nats_with_the_client_key_held_by_the_token() {
    let hsm = SoftHsm::init();
    for algorithm in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
        mutual_tls_with(&hsm, algorithm);
    }
}

fn mutual_tls_with(hsm: &SoftHsm, algorithm: Algorithm) {
    let token = hsm.config(&format!("nats-client-{algorithm}"));
    let signer = Arc::new(Pkcs11Signer::generate(&token, algorithm).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), signer.public_key().clone());

    let server = NatsServer::builder()
        .extra_config(&format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca.display()
        ))
        .start()
        .unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port());

    runtime().block_on(async {
        // Without a client certificate the server refuses the connection: through the
        // settings, and through a rustls configuration that differs from the token one only
        // in having no client certificate.
        let mut anonymous = NatsConfig::new([url.clone()]);
        anonymous.tls = Some(TlsClientConfig::with_ca(pki.ca.clone()));
        anonymous.request_timeout = std::time::Duration::from_secs(5);
        assert!(anonymous.connect(None).await.is_err(), "connected without a client certificate");
        let mut roots = rustls::RootCertStore::empty();
        let ca_der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_file(&pki.ca).unwrap()
        };
        roots.add(ca_der).unwrap();
        let no_client_cert =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let config = NatsConfig::new([url.clone()]);
        assert!(
            JetStreamBackbone::connect_with_tls(&config, Some(no_client_cert)).await.is_err(),
            "connected without a client certificate"
        );

        // A certificate for another key is refused before any connection is made.
        let stranger: Arc<dyn Signer> = Arc::new(FileSigner::random(algorithm));
        let err = client_config_with_signer(&pki.ca, &pki.client_cert, stranger).unwrap_err();
        assert!(err.to_string().contains(&format!("not for the {algorithm} key")), "{err}");

        // With the token-held key: connected, events published and replayed through TLS.
        let token_key = KeyConfig::Pkcs11(token.clone()).open().unwrap();
        let tls = client_config_with_signer(&pki.ca, &pki.client_cert, token_key).unwrap();
        let config = NatsConfig::new([url.clone()]);
        let backbone = JetStreamBackbone::connect_with_tls(&config, Some(tls)).await.unwrap();
        ensure_platform_streams(&backbone, &Default::default()).await.unwrap();
        let records: Vec<EventRecord> =
            (1..=5).map(|i| alive(&format!("n{i}.example.net"), "1.0.0", i).signed(&*signer, None).unwrap()).collect();
        backbone.publish_batch(records.iter().map(|r| to_message(r).unwrap()).collect()).await.unwrap();
        let stored = read_all(&backbone, CHORUS_LIFECYCLE).await;
        assert_eq!(stored.len(), records.len());
        for (message, sent) in stored.iter().zip(&records) {
            let record = EventRecord::decode(&message.payload).unwrap();
            assert_eq!(&record, sent);
            let signature = record.signature.as_ref().unwrap();
            let sig = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &signature.sig).unwrap();
            let bytes = chorus_schemas::signature::signing_bytes(&record);
            assert!(signer.public_key().verify(&bytes, &sig));
        }

        // The server saw a TLS client that presented our certificate.
        let connz = server.monitor_json("/connz?auth=1").unwrap();
        let connections = connz["connections"].as_array().unwrap();
        assert!(!connections.is_empty(), "{connz}");
        assert!(connections.iter().all(|c| c["tls_version"].as_str().is_some_and(|v| !v.is_empty())), "{connz}");
    });
}
