//! Feeds arbitrary bytes to credential checking: `Issuers::verify` (what nodes, clients and
//! the broker run on every credential that arrives), `Credential::parse_unverified` and the
//! compact JWS parser under them, with issuers trusting one fixed Ed25519 and one fixed P-256
//! key (`common`).
//!
//! Each input is used twice:
//! * as a token, whole (invalid UTF-8 read as U+FFFD);
//! * as the claims of a token that a trusted issuer signs (the first byte picks the issuer:
//!   even Ed25519, odd P-256; the rest, when it starts like a JSON object, are the claims
//!   bytes), so the fuzzer reaches the claims decoding and the role and time checks behind
//!   the signature.
//!
//! Properties checked:
//! * nothing panics (libFuzzer reports any panic as a crash), at any check time;
//! * a credential that verifies is for the role asked, valid at the time asked, names a
//!   trusted issuer, and reads the same unverified; a second check (from the cache) agrees;
//! * a token a trusted issuer signed is never refused as forged or of an unknown issuer, and
//!   well-formed claims naming that issuer verify at their `nbf` when `exp` is not earlier.
//!
//! Run: `cargo fuzz run credential fuzz/seeds/credential` (seeds: credentials of both roles
//! and both issuers, an expired one, and the claims of one).

#![no_main]

mod common;

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chorus_identity::jws::{self, Header};
use chorus_identity::{Claims, Credential, CredentialError, Issuers, Role, DEFAULT_LEEWAY};
use chorus_keys::{FileSigner, Signer};
use libfuzzer_sys::fuzz_target;

type Verified = Result<Arc<Credential>, CredentialError>;

struct Fixed {
    issuers: Issuers,
    signers: [FileSigner; 2],
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| Fixed {
        issuers: common::issuers(),
        signers: [common::ed25519_issuer(), common::p256_issuer()],
    })
}

/// Same result, whether credential or refusal.
fn same(a: &Verified, b: &Verified) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a.to_string() == b.to_string(),
        _ => false,
    }
}

/// Checks `token` as a client and as a node credential at [`common::NOW`], and when a
/// trusted issuer signed it (then it is cached and checking is cheap) again, and at extreme
/// times. Returns the outcomes at [`common::NOW`].
fn check(issuers: &Issuers, token: &str) -> [Verified; 2] {
    let roles = [Role::Client, Role::Node];
    let at_now = roles.map(|role| {
        let result = issuers.verify(token, role, common::NOW);
        if let Ok(credential) = &result {
            assert_eq!(credential.role(), role, "verified for another role");
            assert!(credential.valid_at(common::NOW, DEFAULT_LEEWAY).is_ok(), "verified outside its validity");
            assert!(issuers.key_ids().any(|id| id == credential.claims().iss), "verified with an untrusted issuer");
            let unverified = Credential::parse_unverified(token).expect("a verified credential parses unverified");
            assert_eq!(unverified.claims(), credential.claims(), "verified and unverified claims differ");
            let _ = (credential.allows_agent("rpcutil", "ping"), credential.allows_collective("choria"));
        }
        result
    });
    let signed = at_now.iter().any(|r| {
        matches!(
            r,
            Ok(_)
                | Err(CredentialError::WrongRole { .. }
                    | CredentialError::Expired { .. }
                    | CredentialError::NotYetValid { .. })
        )
    });
    if !signed {
        return at_now;
    }
    for (role, result) in roles.into_iter().zip(&at_now) {
        let again = issuers.verify(token, role, common::NOW);
        assert!(same(result, &again), "a second check disagrees: {result:?} then {again:?}");
        for at in [i64::MIN, -1, 0, i64::MAX] {
            if let Err(e) = issuers.verify(token, role, at) {
                let _ = (e.code(), e.to_string());
            }
        }
    }
    at_now
}

fuzz_target!(|data: &[u8]| {
    let fixed = fixed();
    // A fresh cache per input: what one input verified must not decide another.
    let issuers = fixed.issuers.clone();

    let token = String::from_utf8_lossy(data);
    let _ = check(&issuers, &token);
    if let Ok(parsed) = jws::parse(&token) {
        for signer in &fixed.signers {
            let _ = parsed.verify(signer.public_key());
        }
    }
    if let Ok(credential) = Credential::parse_unverified(&token) {
        let _ = (credential.subject(), credential.public_key().key_id(), format!("{credential:?}"));
        let _ = credential.valid_at(i64::MIN, i64::MAX);
        let _ = credential.valid_at(i64::MAX, i64::MIN);
    }

    // Signing costs: only claims that may be a JSON object.
    let Some((&pick, claims)) = data.split_first() else {
        return;
    };
    if claims.trim_ascii_start().first() != Some(&b'{') {
        return;
    }
    let signer = &fixed.signers[usize::from(pick & 1)];
    let header = Header {
        alg: signer.algorithm().jws().to_string(),
        typ: Some("JWT".into()),
        kid: Some(signer.key_id().to_string()),
        crit: None,
    };
    let header = serde_json::to_vec(&header).expect("a header serializes");
    let signed = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let signature = signer.sign(signed.as_bytes()).expect("a file key signs");
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature));
    for result in check(&issuers, &token) {
        if let Err(e @ (CredentialError::BadSignature | CredentialError::UnknownIssuer(_))) = result {
            panic!("a token signed by a trusted issuer is refused: {e}");
        }
    }
    if let Ok(c) = serde_json::from_slice::<Claims>(claims) {
        if c.iss == signer.key_id() && c.exp >= c.nbf && token.len() <= jws::MAX_TOKEN {
            if let Err(e) = issuers.verify(&token, c.purpose, c.nbf) {
                panic!("well-formed claims signed by their issuer are refused at their nbf: {e}");
            }
        }
    }
});
