//! Credentials issued and checked with both algorithms, and every way one is refused.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chorus_keys::{Algorithm, FileSigner, Signer};

use super::*;

const NOW: i64 = 1_764_500_000;
const DAY: Duration = Duration::from_secs(86_400);

fn client(issuer: &FileSigner, holder: &FileSigner) -> Credential {
    let mut spec = CredentialSpec::client("up=alice", holder.public_key().clone(), DAY);
    spec.agents = vec!["rpcutil.*".into()];
    spec.collectives = vec!["acme".into()];
    spec.tenant = Some("acme".into());
    Credential::issue(issuer, &spec, NOW).unwrap()
}

#[test]
fn credentials_of_both_algorithms_issue_and_verify() {
    for (issuer_alg, holder_alg) in [
        (Algorithm::Ed25519, Algorithm::Ed25519),
        (Algorithm::EcdsaP256, Algorithm::Ed25519),
        (Algorithm::Ed25519, Algorithm::EcdsaP256),
        (Algorithm::EcdsaP256, Algorithm::EcdsaP256),
    ] {
        let issuer = FileSigner::random(issuer_alg);
        let holder = FileSigner::random(holder_alg);
        let credential = client(&issuer, &holder);
        let header = jws::parse(credential.token()).unwrap().header;
        assert_eq!(header.alg, issuer_alg.jws());
        let issuers = Issuers::new().with(issuer.public_key().clone());
        let back = issuers.verify(credential.token(), Role::Client, NOW + 60).unwrap();
        assert_eq!(back.subject(), "up=alice");
        assert_eq!(back.public_key(), holder.public_key());
        assert!(back.allows_agent("rpcutil", "ping") && !back.allows_agent("shell", "run"));
        assert!(back.allows_collective("acme") && !back.allows_collective("globex"));
        // Verified again: from the cache, same answer.
        assert!(issuers.verify(credential.token(), Role::Client, NOW + 61).is_ok());
    }
}

#[test]
fn credentials_are_refused_for_every_reason_with_a_code() {
    let issuer = FileSigner::random(Algorithm::Ed25519);
    let holder = FileSigner::random(Algorithm::Ed25519);
    let issuers = Issuers::new().with(issuer.public_key().clone());
    let good = client(&issuer, &holder);
    let code = |token: &str, role: Role, at: i64| issuers.verify(token, role, at).unwrap_err().code();

    // Another issuer.
    let stranger = client(&FileSigner::random(Algorithm::Ed25519), &holder);
    assert_eq!(code(stranger.token(), Role::Client, NOW), "unknown_issuer");
    // Expired, not yet valid (beyond the leeway).
    assert_eq!(code(good.token(), Role::Client, NOW + 86_400 + DEFAULT_LEEWAY + 1), "credential_expired");
    assert_eq!(code(good.token(), Role::Client, NOW - DEFAULT_LEEWAY - 1), "credential_not_yet_valid");
    assert!(issuers.verify(good.token(), Role::Client, NOW - DEFAULT_LEEWAY).is_ok());
    // A client credential is not a node's.
    assert_eq!(code(good.token(), Role::Node, NOW), "wrong_credential_role");

    // Claims changed after issue: the subject swapped for another caller.
    let parts: Vec<&str> = good.token().split('.').collect();
    let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = "up=admin".into();
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2]);
    assert_eq!(code(&forged, Role::Client, NOW), "bad_credential_signature");

    // alg none, and a header naming another algorithm than the issuer key's.
    for alg in ["none", "HS256", "ES256"] {
        let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"{}"}}"#, issuer.key_id()));
        let token = format!("{header}.{}.{}", parts[1], parts[2]);
        assert_eq!(code(&token, Role::Client, NOW), "malformed_credential", "{alg}");
    }
    // A critical header, garbage, an oversized token.
    let crit = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"EdDSA","kid":"{}","crit":["x"]}}"#, issuer.key_id()));
    assert_eq!(code(&format!("{crit}.{}.{}", parts[1], parts[2]), Role::Client, NOW), "malformed_credential");
    for junk in ["", "a.b", "a.b.c.d", "...", &"x".repeat(jws::MAX_TOKEN + 1)] {
        assert_eq!(code(junk, Role::Client, NOW), "malformed_credential", "{junk:.20}");
    }
    // An unknown claim is refused, even when correctly signed.
    let mut extra = serde_json::to_value(good.claims()).unwrap();
    extra["future_limit"] = 1.into();
    let token = jws::sign(&issuer, &extra).unwrap();
    assert_eq!(code(&token, Role::Client, NOW), "malformed_credential");
}

#[test]
fn issuing_refuses_what_no_credential_may_say() {
    let issuer = FileSigner::random(Algorithm::Ed25519);
    let key = FileSigner::random(Algorithm::Ed25519).public_key().clone();
    let issue = |spec: CredentialSpec| Credential::issue(&issuer, &spec, NOW);
    assert!(issue(CredentialSpec::client("alice", key.clone(), DAY)).is_err(), "caller id without kind=");
    assert!(issue(CredentialSpec::client("up=al ice", key.clone(), DAY)).is_err());
    assert!(issue(CredentialSpec::node("", key.clone(), DAY)).is_err());
    let mut node = CredentialSpec::node("n1.example.net", key.clone(), DAY);
    node.delegator = true;
    assert!(issue(node).is_err(), "a node is no delegator");
    let mut bad = CredentialSpec::client("up=a", key.clone(), DAY);
    bad.agents = vec!["rpcutil".into()];
    assert!(issue(bad).is_err());
    assert!(issue(CredentialSpec::client("up=a", key, Duration::ZERO)).is_err());
}

#[test]
fn trust_paths_read_files_and_directories_and_refuse_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let a = FileSigner::random(Algorithm::Ed25519);
    let b = FileSigner::random(Algorithm::EcdsaP256);
    std::fs::write(dir.path().join("a.pem"), a.public_key().to_pem()).unwrap();
    std::fs::write(dir.path().join("b.pub"), b.public_key().to_text()).unwrap();
    std::fs::write(dir.path().join("README"), "ignored").unwrap();
    let issuers = Issuers::from_paths([dir.path()]).unwrap();
    let ids: Vec<&str> = issuers.key_ids().collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&a.key_id()) && ids.contains(&b.key_id()));
    std::fs::write(dir.path().join("c.pem"), "not a key").unwrap();
    assert!(Issuers::from_paths([dir.path()]).is_err());
    assert!(Issuers::from_paths([dir.path().join("absent.pem")]).is_err());
}

#[test]
fn agent_patterns_and_reply_tokens() {
    let p: Vec<String> = vec!["rpcutil.*".into(), "puppet.status".into()];
    assert!(agent_allowed(&p, "rpcutil", "ping"));
    assert!(agent_allowed(&p, "puppet", "status"));
    assert!(!agent_allowed(&p, "puppet", "run"));
    assert!(!agent_allowed(&[], "rpcutil", "ping"));
    assert!(agent_allowed(&["*".into()], "shell", "run"));
    assert!(check_agent_pattern("a.b.c").is_err() && check_agent_pattern("*.ping").is_err());
    let t = reply_token("up=alice");
    assert_eq!(t.len(), 32);
    assert_ne!(t, reply_token("up=bob"));
    assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
}
