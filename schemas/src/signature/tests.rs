use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::envelope::{DecodeError, EventRecord, EventSignature};
use crate::lifecycle::Alive;
use crate::tests::samples::samples;
use chorus_identity::{Credential, CredentialSpec, Issuers};
use chorus_keys::{Algorithm, FileSigner, Signer};

const NODE: &str = "node1.example.net";

/// An issuer, and nodes whose keys it vouches for.
struct Fleet {
    issuer: FileSigner,
    verifier: Verifier,
}

impl Fleet {
    fn new() -> Self {
        let issuer = FileSigner::random(Algorithm::Ed25519);
        let verifier = Verifier::new(Arc::new(Issuers::new().with(issuer.public_key().clone())));
        Fleet { issuer, verifier }
    }

    /// A key of `algorithm` for `identity` and its node credential, valid ten years from 2020.
    fn node(&self, identity: &str, algorithm: Algorithm) -> (FileSigner, String) {
        let key = FileSigner::random(algorithm);
        let spec = CredentialSpec::node(identity, key.public_key().clone(), Duration::from_secs(10 * 365 * 86_400));
        let credential = Credential::issue(&self.issuer, &spec, 1_577_836_800).unwrap();
        (key, credential.token().to_string())
    }
}

fn alive() -> EventRecord {
    EventRecord::new(Alive::new(NODE, "server", "0.1.0", Some(1800)), 7)
}

fn sign(record: EventRecord, node: &(FileSigner, String)) -> EventRecord {
    record.signed(&node.0, Some(&node.1)).unwrap()
}

#[test]
fn every_sample_signs_survives_the_wire_and_verifies_with_both_algorithms() {
    let fleet = Fleet::new();
    for algorithm in [Algorithm::Ed25519, Algorithm::EcdsaP256] {
        for (ty, record) in samples() {
            let node = fleet.node(&record.subject, algorithm);
            let signed = sign(record.clone(), &node);
            let key_id = node.0.key_id();
            assert_eq!(signed.signature.as_ref().unwrap().key_id, key_id);
            assert_eq!(fleet.verifier.verify(&signed).unwrap().identity, record.subject, "{ty}");
            let bytes = signed.encode();
            let wire: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(wire["sigkey"], key_id, "{ty}");
            assert!(wire["sig"].is_string(), "{ty}");
            assert_eq!(wire["sigcred"], node.1.as_str(), "{ty}");
            let decoded = EventRecord::decode(&bytes).unwrap();
            assert_eq!(decoded, signed, "{ty}");
            assert_eq!(decoded.encode(), bytes, "{ty}");
            assert!(fleet.verifier.verify(&decoded).is_ok(), "{ty}");
            // The signed bytes are those of the record without its signature.
            assert_eq!(signing_bytes(&signed), signing_bytes(&record), "{ty}");
            assert_eq!(fleet.verifier.verify(&record), Err(VerifyError::Unsigned), "{ty}");
        }
    }
}

#[test]
fn key_order_on_the_wire_does_not_matter() {
    let fleet = Fleet::new();
    let (_, request) = samples().into_iter().find(|(ty, _)| *ty == "io.choria.rpc.v1.request").unwrap();
    let bytes = sign(request, &fleet.node("any-node", Algorithm::Ed25519)).encode();
    // Re-serialize with every object's keys reversed.
    fn reverse(v: &Value) -> String {
        match v {
            Value::Object(m) => {
                let parts: Vec<String> =
                    m.iter().rev().map(|(k, v)| format!("{}:{}", Value::String(k.clone()), reverse(v))).collect();
                format!("{{{}}}", parts.join(","))
            }
            Value::Array(a) => format!("[{}]", a.iter().map(reverse).collect::<Vec<_>>().join(",")),
            other => other.to_string(),
        }
    }
    let shuffled = reverse(&serde_json::from_slice(&bytes).unwrap());
    assert_ne!(shuffled.as_bytes(), &bytes[..]);
    let decoded = EventRecord::decode(shuffled.as_bytes()).unwrap();
    assert!(fleet.verifier.verify(&decoded).is_ok());
}

/// Changes one thing of the wire JSON of a signed record and decodes it.
fn tampered(bytes: &[u8], change: impl FnOnce(&mut Value)) -> EventRecord {
    let mut v: Value = serde_json::from_slice(bytes).unwrap();
    change(&mut v);
    EventRecord::decode(&serde_json::to_vec(&v).unwrap()).unwrap()
}

#[test]
fn any_change_after_signing_is_a_bad_signature() {
    let fleet = Fleet::new();
    let node = fleet.node(NODE, Algorithm::Ed25519);
    let signed = sign(alive().with_site("london"), &node);
    let bytes = signed.encode();
    let bad = Err(VerifyError::BadSignature(node.0.key_id().into()));
    type Change = Box<dyn FnOnce(&mut Value)>;
    let changes: Vec<(&str, Change)> = vec![
        ("data", Box::new(|v| v["data"]["version"] = "9.9.9".into())),
        ("added data field", Box::new(|v| v["data"]["component"] = "provision_mode_server".into())),
        ("seq", Box::new(|v| v["seq"] = 8.into())),
        ("site", Box::new(|v| v["site"] = "paris".into())),
        (
            "site removed",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("site");
            }),
        ),
        ("time", Box::new(|v| v["time"] = "2025-01-01T00:00:00Z".into())),
    ];
    for (what, change) in changes {
        let record = tampered(&bytes, change);
        assert_eq!(fleet.verifier.verify(&record), bad, "{what}");
    }
    // A signature of another record does not transfer.
    let other = sign(alive(), &node);
    let mut swapped = signed.clone();
    swapped.signature = other.signature.clone();
    assert_eq!(fleet.verifier.verify(&swapped), bad);
    // Flipping one bit of the signature.
    let mut flipped = signed.clone();
    let mut raw =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &flipped.signature.as_ref().unwrap().sig)
            .unwrap();
    raw[5] ^= 1;
    flipped.signature.as_mut().unwrap().sig = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, raw);
    assert_eq!(fleet.verifier.verify(&flipped), bad);
}

#[test]
fn a_node_key_cannot_sign_another_nodes_events() {
    let fleet = Fleet::new();
    let other = fleet.node("other.example.net", Algorithm::Ed25519);
    // The other node signs an event about NODE with its own (valid) credential.
    let err = fleet.verifier.verify(&sign(alive(), &other)).unwrap_err();
    assert_eq!(err.code(), "wrong_identity");
    assert!(err.to_string().contains("other.example.net"), "{err}");
    // Changing the subject and identity after signing is caught too: bad signature first of
    // all, and the identity no longer matches the credential.
    let node = fleet.node(NODE, Algorithm::Ed25519);
    let bytes = sign(alive(), &node).encode();
    let moved = tampered(&bytes, |v| {
        v["subject"] = "evil".into();
        v["data"]["identity"] = "evil".into();
    });
    assert_eq!(fleet.verifier.verify(&moved).unwrap_err().code(), "wrong_identity");
    // Someone else's credential beside our signature: the keys differ.
    let mut mixed = sign(alive(), &node);
    mixed.signature.as_mut().unwrap().credential = Some(other.1.clone());
    assert_eq!(fleet.verifier.verify(&mixed).unwrap_err().code(), "key_mismatch");
}

#[test]
fn a_site_stamped_by_the_replicator_keeps_the_signature_valid() {
    let fleet = Fleet::new();
    let bytes = sign(alive(), &fleet.node(NODE, Algorithm::EcdsaP256)).encode();
    let stamped = tampered(&bytes, |v| v["site"] = "east".into());
    assert_eq!(stamped.site.as_deref(), Some("east"));
    assert!(fleet.verifier.verify(&stamped).is_ok());
}

#[test]
fn every_refusal_has_its_own_code() {
    let fleet = Fleet::new();
    let node = fleet.node(NODE, Algorithm::Ed25519);
    assert_eq!(fleet.verifier.verify(&alive()).unwrap_err().code(), "unsigned");

    // Signed without a credential.
    let bare = alive().signed(&node.0, None).unwrap();
    assert_eq!(fleet.verifier.verify(&bare).unwrap_err().code(), "no_credential");

    // A credential from an issuer nobody trusts.
    let stranger = Fleet::new().node(NODE, Algorithm::Ed25519);
    let err = fleet.verifier.verify(&sign(alive(), &stranger)).unwrap_err();
    assert_eq!(err.code(), "unknown_issuer", "{err}");

    // A credential that was not valid at the event's time.
    let key = FileSigner::random(Algorithm::Ed25519);
    let spec = CredentialSpec::node(NODE, key.public_key().clone(), Duration::from_secs(3600));
    let expired = Credential::issue(&fleet.issuer, &spec, 1_000_000_000).unwrap();
    let err = fleet.verifier.verify(&alive().signed(&key, Some(expired.token())).unwrap()).unwrap_err();
    assert_eq!(err.code(), "credential_expired", "{err}");

    // A client credential is not a node's.
    let spec = CredentialSpec::client("up=alice", key.public_key().clone(), Duration::from_secs(3600));
    let client = Credential::issue(&fleet.issuer, &spec, chrono::Utc::now().timestamp()).unwrap();
    let err = fleet.verifier.verify(&alive().signed(&key, Some(client.token())).unwrap()).unwrap_err();
    assert_eq!(err.code(), "wrong_credential_role", "{err}");

    // Someone else's signature under the node's key id: forged.
    let mut forged = sign(alive(), &stranger);
    let sig = forged.signature.as_mut().unwrap();
    sig.key_id = node.0.key_id().into();
    sig.credential = Some(node.1.clone());
    assert_eq!(fleet.verifier.verify(&forged).unwrap_err().code(), "bad_signature");

    for (sig, reason) in [("not base64!", "not base64"), ("AAAA", "3 bytes, expected 64")] {
        let mut record = alive();
        record.signature =
            Some(EventSignature { key_id: node.0.key_id().into(), sig: sig.into(), credential: Some(node.1.clone()) });
        let err = fleet.verifier.verify(&record).unwrap_err();
        assert_eq!(err.code(), "malformed_signature");
        assert!(err.to_string().contains(reason), "{err}");
        // Decoding keeps a malformed signature, so the verifier can say why it is refused.
        assert_eq!(EventRecord::decode(&record.encode()).unwrap(), record);
    }
}

#[test]
fn decode_wants_sig_and_sigkey_together_and_non_empty() {
    let fleet = Fleet::new();
    let bytes = sign(alive(), &fleet.node(NODE, Algorithm::Ed25519)).encode();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    for (drop, attribute) in [("sig", "sig"), ("sigkey", "sigkey")] {
        let mut w = v.clone();
        w.as_object_mut().unwrap().remove(drop);
        let err = EventRecord::decode(&serde_json::to_vec(&w).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::InvalidAttribute { attribute: a, .. } if a == attribute), "{err}");
    }
    for (field, value) in [
        ("sig", Value::from("")),
        ("sigkey", Value::from("")),
        ("sig", Value::from(5)),
        ("sigcred", Value::from("")),
        ("sigcred", Value::from(1)),
    ] {
        let mut w = v.clone();
        w[field] = value;
        let err = EventRecord::decode(&serde_json::to_vec(&w).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::InvalidAttribute { attribute: a, .. } if a == field), "{err}");
    }
    // A credential alone is not a signature.
    let mut w = v.clone();
    w.as_object_mut().unwrap().remove("sig");
    w.as_object_mut().unwrap().remove("sigkey");
    let err = EventRecord::decode(&serde_json::to_vec(&w).unwrap()).unwrap_err();
    assert!(matches!(err, DecodeError::InvalidAttribute { attribute: "sigcred", .. }), "{err}");
    // null means absent, as for every CloudEvents attribute.
    let mut w = v.clone();
    for field in ["sig", "sigkey", "sigcred"] {
        w[field] = Value::Null;
    }
    assert_eq!(EventRecord::decode(&serde_json::to_vec(&w).unwrap()).unwrap().signature, None);
}
