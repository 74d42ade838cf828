//! A private key in a file: Ed25519 or ECDSA P-256.
//!
//! The file format is **PKCS#8 PEM** (`-----BEGIN PRIVATE KEY-----`), what
//! `openssl genpkey -algorithm ed25519` and `openssl genpkey -algorithm EC -pkeyopt
//! ec_paramgen_curve:P-256` write and what [`FileSigner::generate`] writes. A P-256 key may
//! also be SEC1 PEM (`-----BEGIN EC PRIVATE KEY-----`, `openssl ecparam -genkey`). An
//! Ed25519 key may instead be the raw 32-byte seed as 64 hex digits or standard base64.
//!
//! Public keys (for verifiers) are read by [`PublicKey::parse`](crate::PublicKey::parse).

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::Signer as _;
use zeroize::Zeroizing;

use crate::public::decode_32;
use crate::{Algorithm, PublicKey, SignError, Signer};

enum Secret {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

/// A private key loaded from a file (or made in memory); see the module documentation.
pub struct FileSigner {
    secret: Secret,
    public: PublicKey,
    path: Option<PathBuf>,
}

impl fmt::Debug for FileSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("FileSigner")
            .field("algorithm", &self.public.algorithm())
            .field("key_id", &self.public.key_id())
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileSigner {
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
        if text.starts_with("-----BEGIN EC PRIVATE KEY-----") {
            let key = p256::SecretKey::from_sec1_pem(text).map_err(|e| format!("not a P-256 SEC1 private key: {e}"))?;
            return Ok(Self::from_secret(Secret::P256(key.into())));
        }
        if text.starts_with("-----BEGIN") {
            if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
                return Ok(Self::from_secret(Secret::Ed25519(key)));
            }
            return match p256::ecdsa::SigningKey::from_pkcs8_pem(text) {
                Ok(key) => Ok(Self::from_secret(Secret::P256(key))),
                Err(_) => Err("not an Ed25519 or P-256 PKCS#8 PEM private key".to_owned()),
            };
        }
        let seed = decode_32(text)
            .ok_or_else(|| "expected a PKCS#8 PEM private key or a 32-byte Ed25519 seed in hex or base64".to_owned())?;
        Ok(Self::from_seed(&seed))
    }

    /// The Ed25519 key with this 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::from_secret(Secret::Ed25519(ed25519_dalek::SigningKey::from_bytes(seed)))
    }

    fn from_secret(secret: Secret) -> Self {
        let public = match &secret {
            Secret::Ed25519(k) => PublicKey::ed25519(k.verifying_key().to_bytes()),
            Secret::P256(k) => PublicKey::p256(k.verifying_key().to_encoded_point(false).as_bytes()),
        }
        .expect("the public key of a private key is a valid key");
        FileSigner { secret, public, path: None }
    }

    /// A fresh random key of `algorithm` (OS randomness), not written anywhere.
    pub fn random(algorithm: Algorithm) -> Self {
        let mut rng = rand_core::OsRng;
        Self::from_secret(match algorithm {
            Algorithm::Ed25519 => Secret::Ed25519(ed25519_dalek::SigningKey::generate(&mut rng)),
            Algorithm::EcdsaP256 => Secret::P256(p256::ecdsa::SigningKey::random(&mut rng)),
        })
    }

    /// Creates a new random key of `algorithm` and writes it to `path` as PKCS#8 PEM,
    /// readable by the owner only (mode 0600 on Unix). Refuses to overwrite an existing file.
    pub fn generate(path: impl AsRef<Path>, algorithm: Algorithm) -> Result<Self, SignError> {
        let path = path.as_ref();
        let mut signer = Self::random(algorithm);
        let encoded = match &signer.secret {
            Secret::Ed25519(k) => k.to_pkcs8_pem(LineEnding::LF),
            Secret::P256(k) => k.to_pkcs8_pem(LineEnding::LF),
        };
        let pem = encoded.map_err(|e| SignError::Failed(format!("encoding PKCS#8: {e}")))?;
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
}

impl Signer for FileSigner {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        Ok(match &self.secret {
            Secret::Ed25519(k) => k.sign(message).to_bytes(),
            Secret::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                // Low-S form, so a signature has one encoding.
                let sig = sig.normalize_s().unwrap_or(sig);
                sig.to_bytes().into()
            }
        })
    }
}
