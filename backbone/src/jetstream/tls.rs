//! TLS towards the broker with a client key that the process cannot read: the client
//! certificate's Ed25519 private key stays in a PKCS#11 token (or behind any other
//! [`chorus_schemas::signature::Signer`]), and the TLS handshake's `CertificateVerify` is
//! signed through it.
//!
//! ```no_run
//! # async fn f() -> chorus_backbone::Result<()> {
//! use chorus_backbone::jetstream::{pkcs11_client_config, JetStreamBackbone, NatsConfig};
//! use chorus_schemas::signature::Pkcs11Config;
//!
//! let token = Pkcs11Config::new("chorus", "1234", "nats-client");
//! let tls = pkcs11_client_config("ca.pem".as_ref(), "client.pem".as_ref(), &token)?;
//! let backbone = JetStreamBackbone::connect_with_tls(&NatsConfig::new(["tls://broker:4222"]), Some(tls)).await?;
//! # Ok(()) }
//! ```
//!
//! Only TLS 1.3 and TLS 1.2 signature scheme `ed25519` is offered for the client key;
//! brokers built with Go's crypto/tls (nats-server) accept it.

use std::path::Path;
use std::sync::Arc;

use chorus_schemas::signature::{Pkcs11Config, Pkcs11Signer, Signer};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::{BackboneError, Result};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// A rustls signing key that signs through a [`Signer`].
struct SignerKey {
    signer: Arc<dyn Signer>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignerKey").field("key_id", &self.signer.key_id()).finish()
    }
}

impl SigningKey for SignerKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(SignerHandle(self.signer.clone())) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

struct SignerHandle(Arc<dyn Signer>);

impl std::fmt::Debug for SignerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SignerHandle").field(&self.0.key_id()).finish()
    }
}

impl rustls::sign::Signer for SignerHandle {
    fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, rustls::Error> {
        self.0.sign(message).map(|sig| sig.to_vec()).map_err(|e| rustls::Error::General(format!("client key: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Always presents the one certificate chain (whatever CA hints the server sends, so a
/// mismatch shows up as the server's refusal rather than as a silent anonymous handshake).
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesClientCert for OneCert {
    fn resolve(&self, _hints: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        sigschemes.contains(&SignatureScheme::ED25519).then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| BackboneError::InvalidConfig(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(BackboneError::InvalidConfig(format!("{what} {}: no certificate", path.display())));
    }
    Ok(certs)
}

/// A rustls client configuration trusting the CAs of `ca_file` (PEM) and authenticating with
/// the certificate chain of `cert_file` (PEM, leaf first), whose Ed25519 key `signer` holds.
/// Fails when the leaf certificate is not for the signer's public key.
pub fn client_config_with_signer(
    ca_file: &Path,
    cert_file: &Path,
    signer: Arc<dyn Signer>,
) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(ca_file, "nats.tls ca_file")? {
        roots
            .add(ca)
            .map_err(|e| BackboneError::InvalidConfig(format!("nats.tls ca_file {}: {e}", ca_file.display())))?;
    }
    let chain = read_certs(cert_file, "nats.tls cert_file")?;
    let spki = [&ED25519_SPKI_PREFIX[..], &signer.public_key()[..]].concat();
    // The leaf's SubjectPublicKeyInfo appears verbatim in its DER.
    if !chain[0].as_ref().windows(spki.len()).any(|w| w == spki.as_slice()) {
        return Err(BackboneError::InvalidConfig(format!(
            "nats.tls cert_file {}: the certificate is not for the Ed25519 key {}",
            cert_file.display(),
            signer.key_id()
        )));
    }
    let key = Arc::new(SignerKey { signer, spki });
    let certified = Arc::new(CertifiedKey::new(chain, key));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BackboneError::InvalidConfig(format!("nats.tls: {e}")))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(OneCert(certified)));
    Ok(config)
}

/// [`client_config_with_signer`] with the key on a PKCS#11 token.
pub fn pkcs11_client_config(ca_file: &Path, cert_file: &Path, token: &Pkcs11Config) -> Result<rustls::ClientConfig> {
    let signer =
        Pkcs11Signer::open(token).map_err(|e| BackboneError::InvalidConfig(format!("nats.tls pkcs11: {e}")))?;
    client_config_with_signer(ca_file, cert_file, Arc::new(signer))
}
