//! An Ed25519 key in a file.
//!
//! The file format is **PKCS#8 PEM** (`-----BEGIN PRIVATE KEY-----`, RFC 8410), exactly what
//! `openssl genpkey -algorithm ed25519 -out key.pem` writes and what
//! [`Ed25519FileSigner::generate`] writes. For convenience a file may instead hold the raw
//! 32-byte seed as 64 hex digits or as standard base64 (44 characters); surrounding
//! whitespace is ignored.
//!
//! Public keys (for verifiers) are read by [`read_public_key_file`]: SPKI PEM
//! (`-----BEGIN PUBLIC KEY-----`, `openssl pkey -pubout`), or the raw 32 bytes as hex or
//! base64. [`Ed25519FileSigner::public_key_pem`] writes the PEM form.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::{key_id, SignError, Signer};

/// An Ed25519 private key loaded from a file (PKCS#8 PEM, or a raw seed in hex or base64).
pub struct Ed25519FileSigner {
    key: SigningKey,
    key_id: String,
    path: Option<PathBuf>,
}

impl fmt::Debug for Ed25519FileSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("Ed25519FileSigner")
            .field("key_id", &self.key_id)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Ed25519FileSigner {
    /// Loads the key in `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SignError> {
        let path = path.as_ref();
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| SignError::Key(format!("reading key file {}: {e}", path.display())))?,
        );
        let mut signer =
            Self::from_text(&text).map_err(|e| SignError::Key(format!("key file {}: {e}", path.display())))?;
        signer.path = Some(path.to_owned());
        Ok(signer)
    }

    /// Parses a key in any of the accepted formats (see the module documentation).
    pub fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.starts_with("-----BEGIN") {
            let key =
                SigningKey::from_pkcs8_pem(text).map_err(|e| format!("not an Ed25519 PKCS#8 PEM private key: {e}"))?;
            return Ok(Self::from_signing_key(key));
        }
        let seed = decode_32(text)
            .ok_or_else(|| "expected a PKCS#8 PEM private key or a 32-byte seed in hex or base64".to_owned())?;
        Ok(Self::from_seed(&seed))
    }

    /// The key with this 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(seed))
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let key_id = key_id(key.verifying_key().as_bytes());
        Ed25519FileSigner { key, key_id, path: None }
    }

    /// A fresh random key (OS randomness), not written anywhere.
    pub fn random() -> Self {
        Self::from_signing_key(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// Creates a new random key and writes it to `path` as PKCS#8 PEM, readable by the owner
    /// only (mode 0600 on Unix). Refuses to overwrite an existing file.
    pub fn generate(path: impl AsRef<Path>) -> Result<Self, SignError> {
        let path = path.as_ref();
        let mut signer = Self::random();
        let pem =
            signer.key.to_pkcs8_pem(LineEnding::LF).map_err(|e| SignError::Failed(format!("encoding PKCS#8: {e}")))?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file =
            options.open(path).map_err(|e| SignError::Key(format!("creating key file {}: {e}", path.display())))?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| SignError::Key(format!("writing key file {}: {e}", path.display())))?;
        signer.path = Some(path.to_owned());
        Ok(signer)
    }

    /// The file the key was loaded from or written to, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The public key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`), for a verifier's trust
    /// directory.
    pub fn public_key_pem(&self) -> String {
        public_key_pem(&self.public_key())
    }
}

impl Signer for Ed25519FileSigner {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(self.key.sign(message).to_bytes())
    }
}

/// An Ed25519 public key as SPKI PEM.
pub fn public_key_pem(public_key: &[u8; 32]) -> String {
    match VerifyingKey::from_bytes(public_key) {
        Ok(key) => key.to_public_key_pem(LineEnding::LF).expect("an Ed25519 SPKI always encodes"),
        // Not a curve point: still write it, so the error surfaces where it is read.
        Err(_) => format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode([&SPKI_PREFIX[..], &public_key[..]].concat())
        ),
    }
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Parses an Ed25519 public key: SPKI PEM, or the raw 32 bytes as hex or base64.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let bytes = if text.starts_with("-----BEGIN") {
        VerifyingKey::from_public_key_pem(text)
            .map_err(|e| format!("not an Ed25519 SPKI PEM public key: {e}"))?
            .to_bytes()
    } else {
        decode_32(text).ok_or_else(|| "expected an SPKI PEM public key or 32 bytes in hex or base64".to_owned())?
    };
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))?;
    Ok(bytes)
}

/// Reads an Ed25519 public key file (see [`parse_public_key`]).
pub fn read_public_key_file(path: impl AsRef<Path>) -> Result<[u8; 32], String> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse_public_key(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// 32 bytes written as 64 hex digits or as standard base64.
fn decode_32(text: &str) -> Option<[u8; 32]> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        return Some(out);
    }
    let bytes = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(text).ok()?);
    bytes.as_slice().try_into().ok()
}
