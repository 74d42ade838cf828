//! Feeds arbitrary bytes to what a node does with a request before anything runs: decode the
//! `RequestEnvelope` (serde_json), split its signature (`signed::parse_signature`) and check
//! who sent it (`RequestSecurity::authenticate`, then the replay cache, `first`), with issuers
//! trusting one fixed Ed25519 and one fixed P-256 key (`common`).
//!
//! Each envelope that decodes is checked as it came, and again signed properly for its
//! request (by `choria=alice` with her credential, or by the delegator `choria=aaa` when the
//! envelope names a delegator) after a trip through the wire format, which is how the fuzzer
//! gets past the signature to the caller, limit, TTL and reply-subject checks.
//!
//! Properties checked:
//! * nothing panics (libFuzzer reports any panic as a crash);
//! * what is accepted is signed, names the key that signed, and comes from the request's
//!   caller (or a delegator);
//! * a properly signed envelope survives encoding and decoding unchanged, and is refused only
//!   for what the request asks (another caller than the credential's, a TTL above the
//!   node's maximum), never for its signature;
//! * a node runs a request once: `first` is true once per node, then false.
//!
//! Run: `cargo fuzz run request_envelope fuzz/seeds/request_envelope` (seeds: requests signed
//! by a caller with either algorithm, by a delegator, unsigned, and for another caller).

#![no_main]

mod common;

use std::sync::{Arc, OnceLock};

use chorus_identity::{reply_token, Identity};
use chorus_rpc::signed::parse_signature;
use chorus_rpc::{RequestEnvelope, RequestSecurity};
use libfuzzer_sys::fuzz_target;

struct Fixed {
    issuers: Arc<chorus_identity::Issuers>,
    alice: Identity,
    aaa: Identity,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let alice = common::alice();
        let aaa = common::aaa();
        let alice_credential = common::client_credential(&common::ed25519_issuer(), common::ALICE, &alice, false);
        let aaa_credential = common::client_credential(&common::p256_issuer(), common::AAA, &aaa, true);
        Fixed {
            issuers: Arc::new(common::issuers()),
            alice: Identity::new(Arc::new(alice), alice_credential).expect("alice's key matches her credential"),
            aaa: Identity::new(Arc::new(aaa), aaa_credential).expect("the delegator's key matches its credential"),
        }
    })
}

/// The reply subject a node sees when `callerid` asks in `collective`.
fn reply_to(collective: &str, callerid: &str) -> String {
    format!("{collective}.reply.{}.0123456789abcdef0123456789abcdef", reply_token(callerid))
}

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<RequestEnvelope>(data) else {
        return;
    };
    let fixed = fixed();
    let security = RequestSecurity::new(fixed.issuers.clone());
    let request = &envelope.request;
    for text in [&envelope.signature, &envelope.caller, &envelope.delegator].into_iter().flatten() {
        let _ = parse_signature(text);
    }

    let own = reply_to(&request.collective, &request.callerid);
    let alices = reply_to("choria", common::ALICE);
    for reply in [Some(own.as_str()), Some(alices.as_str()), None] {
        match security.authenticate(&envelope, reply, common::NOW) {
            Ok(caller) => {
                let signature = envelope.signature.as_deref().expect("an accepted request is signed");
                let (key_id, _) = parse_signature(signature).expect("an accepted signature parses");
                assert_eq!(caller.key_id, key_id, "accepted with another key id than the signature's");
                assert_eq!(caller.callerid, request.callerid, "accepted for another caller");
                assert_eq!(caller.delegator.is_some(), envelope.delegator.is_some(), "delegation mixed up");
            }
            Err(refusal) => {
                assert!(!refusal.code.is_empty() && !refusal.reason.is_empty(), "refusal without a reason");
                let _ = refusal.to_string();
            }
        }
    }

    // Properly signed, through the wire format.
    let delegated = envelope.delegator.is_some();
    let signed = if delegated {
        RequestEnvelope::delegated(request.clone(), &fixed.aaa)
    } else {
        RequestEnvelope::signed(request.clone(), &fixed.alice)
    }
    .expect("a file key signs");
    let wire = serde_json::to_vec(&signed).expect("an envelope encodes");
    let received: RequestEnvelope = match serde_json::from_slice(&wire) {
        Ok(received) => received,
        Err(e) => panic!("an encoded envelope does not decode: {e}\n{}", String::from_utf8_lossy(&wire)),
    };
    assert_eq!(received, signed, "the envelope changed on the wire");
    match security.authenticate(&received, Some(&own), common::NOW) {
        Ok(caller) => assert_eq!(caller.callerid, request.callerid, "accepted for another caller"),
        Err(refusal) => {
            let expected = match refusal.code {
                "caller_mismatch" => !delegated && request.callerid != common::ALICE,
                "ttl_too_long" => request.ttl > security.max_ttl(),
                _ => false,
            };
            assert!(expected, "a properly signed request is refused: {refusal}\n{}", String::from_utf8_lossy(&wire));
        }
    }

    // The replay cache.
    assert!(security.first(request, 1, common::NOW), "a request is new to a node that has not seen it");
    assert!(!security.first(request, 1, common::NOW), "a node runs a request twice");
    assert!(security.first(request, 2, common::NOW), "one node's run stops another's");
    for now in [i64::MIN, -1, 0, i64::MAX] {
        let _ = security.first(request, 3, now);
    }
});
