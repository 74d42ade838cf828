//! Public keys of either algorithm: how they are written, read, named and checked.
//!
//! Chorus signs with Ed25519 or ECDSA P-256 (many HSMs and smart cards have no Ed25519).
//! Both give 64-byte signatures (P-256 as `r || s`, as JWS writes it), so everything that
//! carries a signature carries it the same way; only the public key says how to check it.

use std::fmt;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePublicKey};
use p256::ecdsa::signature::Verifier as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::KeyError;

/// A signature algorithm Chorus keys use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// Ed25519 (RFC 8032), pure: the message itself is signed.
    Ed25519,
    /// ECDSA over NIST P-256 with SHA-256 (FIPS 186-4), signatures as 64-byte `r || s`.
    EcdsaP256,
}

impl Algorithm {
    /// The short name used in key texts and on the command line: `ed25519` or `p256`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256 => "p256",
        }
    }

    /// The JWS `alg` of this algorithm (RFC 8037 `EdDSA`, RFC 7518 `ES256`).
    pub fn jws(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "EdDSA",
            Algorithm::EcdsaP256 => "ES256",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.to_ascii_lowercase().as_str() {
            "ed25519" | "eddsa" => Ok(Algorithm::Ed25519),
            "p256" | "p-256" | "ecdsa-p256" | "es256" | "prime256v1" | "secp256r1" => Ok(Algorithm::EcdsaP256),
            _ => Err(KeyError::new(format!("unknown key algorithm {s:?} (ed25519 or p256)"))),
        }
    }
}

/// A public key: Ed25519 (32 bytes) or P-256 (the 65-byte uncompressed SEC1 point).
///
/// Equal, hashed and written by its bytes; it also keeps the decoded curve point, so checking
/// a signature does not decompress the point again (about a quarter of an Ed25519 check, and
/// a client checks one reply signature per node).
#[derive(Clone)]
pub struct PublicKey {
    algorithm: Algorithm,
    bytes: Vec<u8>,
    key_id: String,
    point: Point,
}

/// The decoded key, ready to check signatures.
#[derive(Clone)]
enum Point {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        (self.algorithm, &self.bytes) == (other.algorithm, &other.bytes)
    }
}

impl Eq for PublicKey {}

impl std::hash::Hash for PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.algorithm, &self.bytes).hash(state)
    }
}

impl PublicKey {
    /// An Ed25519 public key from its 32 bytes; refuses what is not a curve point.
    pub fn ed25519(bytes: [u8; 32]) -> Result<Self, KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|e| KeyError::new(format!("not an Ed25519 public key: {e}")))?;
        Ok(Self::new(Algorithm::Ed25519, bytes.to_vec(), Point::Ed25519(key)))
    }

    /// A P-256 public key from a SEC1 point (compressed or not); kept uncompressed.
    pub fn p256(sec1: &[u8]) -> Result<Self, KeyError> {
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(sec1)
            .map_err(|e| KeyError::new(format!("not a P-256 public key: {e}")))?;
        Ok(Self::new(Algorithm::EcdsaP256, key.to_encoded_point(false).as_bytes().to_vec(), Point::P256(key)))
    }

    fn new(algorithm: Algorithm, bytes: Vec<u8>, point: Point) -> Self {
        let key_id = key_id(&bytes);
        PublicKey { algorithm, bytes, key_id, point }
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The raw key: 32 bytes (Ed25519) or a 65-byte uncompressed SEC1 point (P-256).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The key id carried with signatures (see [`key_id`]).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Whether `signature` is this key's signature of `message`. Ed25519 is checked
    /// strictly (no small-order keys, canonical `s`).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(signature) else { return false };
        match &self.point {
            Point::Ed25519(key) => key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig)).is_ok(),
            Point::P256(key) => {
                let Ok(sig) = p256::ecdsa::Signature::from_slice(&sig) else { return false };
                key.verify(message, &sig).is_ok()
            }
        }
    }

    /// Whether every `(key, message, signature)` is valid, checked together: Ed25519
    /// signatures in one batch (one multi-scalar multiplication, about half the work per
    /// signature of checking them one by one), P-256 ones one by one. `false` says only that
    /// at least one is not; [`PublicKey::verify`] tells which. The batch equation is the
    /// cofactored one, so it may accept a signature with a small-order component that the
    /// strict single check refuses: such a signature can only come from the key's holder.
    pub fn verify_all(items: &[(&PublicKey, &[u8], &[u8; 64])]) -> bool {
        let mut messages = Vec::with_capacity(items.len());
        let mut signatures = Vec::with_capacity(items.len());
        let mut keys = Vec::with_capacity(items.len());
        for (key, message, signature) in items {
            match &key.point {
                Point::Ed25519(point) => {
                    messages.push(*message);
                    signatures.push(ed25519_dalek::Signature::from_bytes(signature));
                    keys.push(*point);
                }
                Point::P256(_) => {
                    if !key.verify(message, *signature) {
                        return false;
                    }
                }
            }
        }
        match keys.len() {
            0 => true,
            1 => items.iter().any(|(k, m, s)| matches!(k.point, Point::Ed25519(_)) && k.verify(m, *s)),
            _ => ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok(),
        }
    }

    /// The key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`), what `openssl pkey -pubout` writes.
    pub fn to_pem(&self) -> String {
        self.spki_der_pem().expect("a checked public key always encodes")
    }

    fn spki_der_pem(&self) -> Result<String, KeyError> {
        let fail = |e: &dyn fmt::Display| KeyError::new(format!("encoding the public key: {e}"));
        match self.algorithm {
            Algorithm::Ed25519 => {
                let bytes: [u8; 32] = self.bytes.as_slice().try_into().map_err(|_| fail(&"length"))?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| fail(&e))?;
                key.to_public_key_pem(LineEnding::LF).map_err(|e| fail(&e))
            }
            Algorithm::EcdsaP256 => {
                let key = p256::PublicKey::from_sec1_bytes(&self.bytes).map_err(|e| fail(&e))?;
                key.to_public_key_pem(LineEnding::LF).map_err(|e| fail(&e))
            }
        }
    }

    /// The DER SubjectPublicKeyInfo (for certificates and TLS).
    pub fn to_spki_der(&self) -> Vec<u8> {
        match self.algorithm {
            Algorithm::Ed25519 => [&ED25519_SPKI_PREFIX[..], &self.bytes[..]].concat(),
            Algorithm::EcdsaP256 => {
                let key = p256::PublicKey::from_sec1_bytes(&self.bytes).expect("a checked P-256 key");
                key.to_public_key_der().expect("a P-256 SPKI always encodes").as_bytes().to_vec()
            }
        }
    }

    /// Reads a public key: SPKI PEM of either algorithm, `<alg>:<base64url>` (see
    /// [`PublicKey::to_text`]), or 32 bytes in hex or base64 (an Ed25519 key, the older form).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.starts_with("-----BEGIN") {
            if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_pem(text) {
                return Self::ed25519(key.to_bytes());
            }
            return match p256::PublicKey::from_public_key_pem(text) {
                Ok(key) => Self::p256(key.to_sec1_bytes().as_ref()),
                Err(_) => Err(KeyError::new("not an Ed25519 or P-256 SPKI PEM public key")),
            };
        }
        if let Some((alg, rest)) = text.split_once(':') {
            let algorithm: Algorithm = alg.parse()?;
            let bytes = URL_SAFE_NO_PAD
                .decode(rest)
                .map_err(|e| KeyError::new(format!("public key {alg}: not base64url: {e}")))?;
            return match algorithm {
                Algorithm::Ed25519 => Self::ed25519(
                    bytes.as_slice().try_into().map_err(|_| KeyError::new("an Ed25519 public key is 32 bytes"))?,
                ),
                Algorithm::EcdsaP256 => Self::p256(&bytes),
            };
        }
        let bytes = decode_32(text).ok_or_else(|| {
            KeyError::new("expected an SPKI PEM public key, <alg>:<base64url>, or 32 bytes in hex or base64")
        })?;
        Self::ed25519(bytes)
    }

    /// Reads a public key file (see [`PublicKey::parse`]).
    pub fn read_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|e| KeyError::new(format!("reading {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| KeyError::new(format!("{}: {e}", path.display())))
    }

    /// The compact text form `<alg>:<base64url of the raw key>`, used inside credentials.
    pub fn to_text(&self) -> String {
        format!("{}:{}", self.algorithm.name(), URL_SAFE_NO_PAD.encode(&self.bytes))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, {})", self.algorithm, self.key_id)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_text())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PublicKey::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A P-256 signature (`r || s`, as [`Signer::sign`](crate::Signer::sign) gives it) in the
/// DER form TLS and X.509 carry.
pub fn ecdsa_der(signature: &[u8; 64]) -> Result<Vec<u8>, KeyError> {
    let sig = p256::ecdsa::Signature::from_slice(signature)
        .map_err(|e| KeyError::new(format!("not a P-256 signature: {e}")))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// The key id of a raw public key (32 Ed25519 bytes, or the 65-byte uncompressed P-256
/// point): lowercase hex of the first 16 bytes of its SHA-256.
pub fn key_id(public_key: &[u8]) -> String {
    let digest = Sha256::digest(public_key);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// 32 bytes written as 64 hex digits or as standard base64.
pub(crate) fn decode_32(text: &str) -> Option<[u8; 32]> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        }
        return Some(out);
    }
    let bytes = zeroize::Zeroizing::new(STANDARD.decode(text).ok()?);
    bytes.as_slice().try_into().ok()
}
