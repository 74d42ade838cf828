use serde_json::Value;

use super::*;
use crate::envelope::{DecodeError, EventRecord, EventSignature};
use crate::lifecycle::Alive;
use crate::tests::samples::samples;
use chorus_keys::{Ed25519FileSigner, Signer};

/// RFC 8032 section 7.1, test 1.
const SEED_HEX: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const KEY_ID: &str = "21fe31dfa154a261626bf854046fd227";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signer() -> Ed25519FileSigner {
    Ed25519FileSigner::from_text(SEED_HEX).unwrap()
}

fn alive() -> EventRecord {
    EventRecord::new(Alive::new("node1.example.net", "server", "0.1.0", Some(1800)), 7)
}

#[test]
fn every_sample_signs_survives_the_wire_and_verifies() {
    let s = signer();
    let verifier = Verifier::new().with_key(&s.public_key()).unwrap();
    for (ty, record) in samples() {
        let signed = record.clone().signed(&s).unwrap();
        assert_eq!(signed.signature.as_ref().unwrap().key_id, KEY_ID);
        assert_eq!(verifier.verify(&signed), Ok(KEY_ID), "{ty}");
        let bytes = signed.encode();
        let wire: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(wire["sigkey"], KEY_ID, "{ty}");
        assert!(wire["sig"].is_string(), "{ty}");
        let decoded = EventRecord::decode(&bytes).unwrap();
        assert_eq!(decoded, signed, "{ty}");
        assert_eq!(decoded.encode(), bytes, "{ty}");
        assert_eq!(verifier.verify(&decoded), Ok(KEY_ID), "{ty}");
        // The signed bytes are those of the record without its signature.
        assert_eq!(signing_bytes(&signed), signing_bytes(&record), "{ty}");
        assert_eq!(verifier.verify(&record), Err(VerifyError::Unsigned), "{ty}");
    }
}

#[test]
fn key_order_on_the_wire_does_not_matter() {
    let s = signer();
    let verifier = Verifier::new().with_key(&s.public_key()).unwrap();
    let (_, request) = samples().into_iter().find(|(ty, _)| *ty == "io.choria.rpc.v1.request").unwrap();
    let bytes = request.signed(&s).unwrap().encode();
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
    assert_eq!(verifier.verify(&decoded), Ok(KEY_ID));
}

/// Changes one thing of the wire JSON of a signed record and decodes it.
fn tampered(bytes: &[u8], change: impl FnOnce(&mut Value)) -> EventRecord {
    let mut v: Value = serde_json::from_slice(bytes).unwrap();
    change(&mut v);
    EventRecord::decode(&serde_json::to_vec(&v).unwrap()).unwrap()
}

#[test]
fn any_change_after_signing_is_a_bad_signature() {
    let s = signer();
    let verifier = Verifier::new().with_key(&s.public_key()).unwrap();
    let signed = alive().with_site("london").signed(&s).unwrap();
    let bytes = signed.encode();
    let bad = Err(VerifyError::BadSignature(KEY_ID.into()));
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
        ("time", Box::new(|v| v["time"] = "2030-01-01T00:00:00Z".into())),
        (
            "subject and identity",
            Box::new(|v| {
                v["subject"] = "evil".into();
                v["data"]["identity"] = "evil".into();
            }),
        ),
    ];
    for (what, change) in changes {
        let record = tampered(&bytes, change);
        assert_eq!(verifier.verify(&record), bad, "{what}");
    }
    // A signature of another record does not transfer.
    let other = alive().signed(&s).unwrap();
    let mut swapped = signed.clone();
    swapped.signature = other.signature.clone();
    assert_eq!(verifier.verify(&swapped), bad);
    // Flipping one bit of the signature.
    let mut flipped = signed.clone();
    let mut raw =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &flipped.signature.as_ref().unwrap().sig)
            .unwrap();
    raw[5] ^= 1;
    flipped.signature.as_mut().unwrap().sig = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, raw);
    assert_eq!(verifier.verify(&flipped), bad);
}

#[test]
fn a_site_stamped_by_the_replicator_keeps_the_signature_valid() {
    let s = signer();
    let verifier = Verifier::new().with_key(&s.public_key()).unwrap();
    let bytes = alive().signed(&s).unwrap().encode();
    let stamped = tampered(&bytes, |v| v["site"] = "east".into());
    assert_eq!(stamped.site.as_deref(), Some("east"));
    assert_eq!(verifier.verify(&stamped), Ok(KEY_ID));
}

#[test]
fn unsigned_unknown_key_and_malformed_signatures_are_told_apart() {
    let s = signer();
    let verifier = Verifier::new().with_key(&s.public_key()).unwrap();
    assert_eq!(verifier.verify(&alive()), Err(VerifyError::Unsigned));
    assert_eq!(VerifyError::Unsigned.code(), "unsigned");

    let stranger = Ed25519FileSigner::random();
    let by_stranger = alive().signed(&stranger).unwrap();
    let err = verifier.verify(&by_stranger).unwrap_err();
    assert_eq!(err, VerifyError::UnknownKey(stranger.key_id().into()));
    assert_eq!(err.code(), "unknown_key");
    assert!(err.to_string().contains(stranger.key_id()));

    // Someone else's signature under our key id: forged.
    let mut forged = by_stranger.clone();
    forged.signature.as_mut().unwrap().key_id = KEY_ID.into();
    let err = verifier.verify(&forged).unwrap_err();
    assert_eq!(err, VerifyError::BadSignature(KEY_ID.into()));
    assert_eq!(err.code(), "bad_signature");

    for (sig, reason) in [("not base64!", "not base64"), ("AAAA", "3 bytes, expected 64")] {
        let mut record = alive();
        record.signature = Some(EventSignature { key_id: KEY_ID.into(), sig: sig.into() });
        let err = verifier.verify(&record).unwrap_err();
        assert_eq!(err.code(), "malformed_signature");
        assert!(err.to_string().contains(reason), "{err}");
        // Decoding keeps a malformed signature, so the verifier can say why it is refused.
        assert_eq!(EventRecord::decode(&record.encode()).unwrap(), record);
    }
    // No key trusted: every signature is by an unknown key.
    assert_eq!(Verifier::new().verify(&alive().signed(&s).unwrap()).unwrap_err().code(), "unknown_key");
}

#[test]
fn decode_wants_sig_and_sigkey_together_and_non_empty() {
    let bytes = alive().signed(&signer()).unwrap().encode();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    for (drop, attribute) in [("sig", "sig"), ("sigkey", "sigkey")] {
        let mut w = v.clone();
        w.as_object_mut().unwrap().remove(drop);
        let err = EventRecord::decode(&serde_json::to_vec(&w).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::InvalidAttribute { attribute: a, .. } if a == attribute), "{err}");
    }
    for (field, value) in [("sig", Value::from("")), ("sigkey", Value::from("")), ("sig", Value::from(5))] {
        let mut w = v.clone();
        w[field] = value;
        let err = EventRecord::decode(&serde_json::to_vec(&w).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::InvalidAttribute { attribute: a, .. } if a == field), "{err}");
    }
    // null means absent, as for every CloudEvents attribute.
    let mut w = v.clone();
    w["sig"] = Value::Null;
    w["sigkey"] = Value::Null;
    assert_eq!(EventRecord::decode(&serde_json::to_vec(&w).unwrap()).unwrap().signature, None);
}

#[test]
fn verifier_trusts_key_files_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let a = Ed25519FileSigner::generate(dir.path().join("a.key")).unwrap();
    let b = Ed25519FileSigner::random();
    let trust = dir.path().join("trusted");
    std::fs::create_dir(&trust).unwrap();
    std::fs::write(trust.join("a.pem"), a.public_key_pem()).unwrap();
    std::fs::write(trust.join("b.pub"), hex(&b.public_key())).unwrap();
    std::fs::write(trust.join("README"), "not a key, not read").unwrap();
    let mut verifier = Verifier::new();
    assert_eq!(verifier.trust_dir(&trust).unwrap(), 2);
    let mut ids: Vec<String> = vec![a.key_id().into(), b.key_id().into()];
    ids.sort();
    assert_eq!(verifier.key_ids().collect::<Vec<_>>(), ids);
    assert!(verifier.verify(&alive().signed(&a).unwrap()).is_ok());
    assert!(verifier.verify(&alive().signed(&b).unwrap()).is_ok());

    std::fs::write(trust.join("broken.pem"), "garbage").unwrap();
    let err = Verifier::new().trust_dir(&trust).unwrap_err();
    assert!(err.to_string().contains("broken.pem"), "{err}");

    let single = Verifier::from_paths([trust.join("a.pem")], []).unwrap();
    assert_eq!(single.key_ids().collect::<Vec<_>>(), vec![a.key_id()]);
    // The private key file is not a public key.
    assert!(Verifier::new().trust_file(dir.path().join("a.key")).is_err());
}

#[test]
fn raw_bytes_verify_against_a_trusted_key() {
    let s = signer();
    let verifier = Verifier::new().with_key(&s.public_key()).unwrap();
    let sig = s.sign(b"hello").unwrap();
    assert_eq!(verifier.verify_bytes(KEY_ID, b"hello", &sig), Ok(()));
    assert_eq!(verifier.verify_bytes(KEY_ID, b"hellO", &sig), Err(VerifyError::BadSignature(KEY_ID.into())));
    assert!(matches!(verifier.verify_bytes("nope", b"hello", &sig), Err(VerifyError::UnknownKey(_))));
}
