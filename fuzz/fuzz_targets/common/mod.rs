//! Fixed keys shared by the `credential` and `request_envelope` targets, so the seeds signed
//! with them (`fuzz/seeds/credential`, `fuzz/seeds/request_envelope`) verify and the fuzzer
//! starts past the signature checks. Test keys, published here: they guard nothing.

// Each target uses part of this module.
#![allow(dead_code)]

use std::time::Duration;

use chorus_identity::{Credential, CredentialSpec, Issuers};
use chorus_keys::{FileSigner, Signer};

/// The time every check is made at (Unix seconds), inside the seeds' validity.
pub const NOW: i64 = 1_750_000_000;
/// When the fixed credentials (and those of the seeds) were issued.
pub const ISSUED_AT: i64 = 1_700_000_000;
/// How long they are valid: until 2043.
pub const VALIDITY: Duration = Duration::from_secs(20 * 365 * 86_400);

/// The caller every fixed request comes from.
pub const ALICE: &str = "choria=alice";
/// The delegator (an AAA signer).
pub const AAA: &str = "choria=aaa";

const P256_ISSUER: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIGrj9XsrV2rbnA31ncAj06nWiF4V7jhUN5I7E/gmmYQkoAoGCCqGSM49
AwEHoUQDQgAEXGxs3iUYQlOHLpluEx43h7pagivM+njRo3OkAm8CXSykCzpG4Ywz
PebFzom5zJ94tu8m9Hq6ctHREXoMD4yhgw==
-----END EC PRIVATE KEY-----";

const P256_ALICE: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIAy0IKlBJ3hDgEHBqOcFktngqtCA8Ml8LtbAhsms0+EioAoGCCqGSM49
AwEHoUQDQgAEAaNOr2H+CpDM6adeFJ2SpYszp8OcmY/EctdjkxtMVeMt8vDbUhJI
a9C8i3GENgfaYFr4PuKHg+xsKLhQJXz9eQ==
-----END EC PRIVATE KEY-----";

/// The trusted Ed25519 issuer.
pub fn ed25519_issuer() -> FileSigner {
    FileSigner::from_seed(&[0x11; 32])
}

/// The trusted P-256 issuer.
pub fn p256_issuer() -> FileSigner {
    FileSigner::from_text(P256_ISSUER).expect("the fixed P-256 issuer key parses")
}

/// Issuers trusting exactly the two fixed issuer keys.
pub fn issuers() -> Issuers {
    Issuers::new().with(ed25519_issuer().public_key().clone()).with(p256_issuer().public_key().clone())
}

/// Alice's Ed25519 key.
pub fn alice() -> FileSigner {
    FileSigner::from_seed(&[0x22; 32])
}

/// Alice's P-256 key.
pub fn alice_p256() -> FileSigner {
    FileSigner::from_text(P256_ALICE).expect("the fixed P-256 caller key parses")
}

/// The delegator's Ed25519 key.
pub fn aaa() -> FileSigner {
    FileSigner::from_seed(&[0x33; 32])
}

/// A node's Ed25519 key.
pub fn node() -> FileSigner {
    FileSigner::from_seed(&[0x44; 32])
}

/// A client credential for `subject`'s `key`, allowed every agent, issued by `issuer` at
/// [`ISSUED_AT`] for [`VALIDITY`].
pub fn client_credential(issuer: &dyn Signer, subject: &str, key: &dyn Signer, delegator: bool) -> Credential {
    let mut spec = CredentialSpec::client(subject, key.public_key().clone(), VALIDITY);
    spec.delegator = delegator;
    Credential::issue(issuer, &spec, ISSUED_AT).expect("the fixed credential issues")
}
