//! TLS client settings and the one rustls client builder (ring provider) behind every TLS
//! connection Chorus makes: to NATS brokers, syslog collectors, Splunk HEC and the AAA
//! service.
//!
//! The client key may be a PEM file ([`TlsClientConfig::key_file`]) or any
//! [`chorus_keys::Signer`] ([`client_config_with_signer`]): a key held by a PKCS#11 token
//! never leaves it, and the handshake's `CertificateVerify` is signed through the token.
//! The one signature scheme of the key's algorithm is offered for such a key (`ed25519`, or
//! `ecdsa_secp256r1_sha256` for P-256); brokers built with Go's crypto/tls (nats-server)
//! accept both.
//!
//! ```no_run
//! use chorus_runtime::tls::{client_config, TlsClientConfig};
//!
//! let settings = TlsClientConfig { ca_file: Some("ca.pem".into()), ..Default::default() };
//! let rustls_config = client_config(&settings)?;
//! # Ok::<(), chorus_runtime::ConfigError>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chorus_keys::{Algorithm, Signer};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{ClientConfig, RootCertStore, SignatureAlgorithm, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// TLS settings of a client connection, as configuration files write them (`tls:`).
/// Errors name fields relative to this section (`tls.ca_file`).
#[derive(schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClientConfig {
    /// PEM CA bundle that signs the server's certificate; the system's roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain, leaf first), for servers that authenticate clients.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Name checked against the server's certificate (a DNS name or an IP address); the host
    /// of the address or URL when absent. Not for NATS, whose client checks the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// NATS only: refuse a connection without TLS even when the URL says `nats://` (default
    /// true). Syslog and HEC always use TLS when this section is present.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

impl TlsClientConfig {
    /// Trusting the CAs of `ca_file`, without a client certificate.
    pub fn with_ca(ca_file: impl Into<PathBuf>) -> Self {
        TlsClientConfig { ca_file: Some(ca_file.into()), required: true, ..Default::default() }
    }

    /// Checks that the files exist and that certificate and key go together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::invalid("tls", "cert_file and key_file go together"));
        }
        for (field, path) in [("ca_file", &self.ca_file), ("cert_file", &self.cert_file), ("key_file", &self.key_file)]
        {
            if let Some(p) = path {
                if !p.exists() {
                    return Err(ConfigError::invalid(
                        format!("tls.{field}"),
                        format!("{} does not exist", p.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The name the server's certificate is checked against: `server_name`, else `host`.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, ConfigError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
        ServerName::try_from(name.to_owned())
            .map_err(|e| ConfigError::invalid("tls.server_name", format!("{name:?}: {e}")).with_source(e))
    }
}

/// A rustls client configuration from `settings`: the CAs of `ca_file` (else the system's),
/// and the client certificate and key when given.
pub fn client_config(settings: &TlsClientConfig) -> Result<ClientConfig, ConfigError> {
    let roots = roots(settings.ca_file.as_deref())?;
    let builder = builder()?.with_root_certificates(roots);
    match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "tls.cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| ConfigError::invalid("tls.key_file", format!("{}: {e}", key.display())).with_source(e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ConfigError::invalid("tls", format!("client certificate: {e}")).with_source(e))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(ConfigError::invalid("tls", "cert_file and key_file go together")),
    }
}

/// A rustls client configuration trusting the CAs of `ca_file` (PEM) and authenticating with
/// the certificate chain of `cert_file` (PEM, leaf first), whose key (Ed25519 or P-256)
/// `signer` holds.
/// Fails when the leaf certificate is not for the signer's public key.
pub fn client_config_with_signer(
    ca_file: &Path,
    cert_file: &Path,
    signer: Arc<dyn Signer>,
) -> Result<ClientConfig, ConfigError> {
    let roots = roots(Some(ca_file))?;
    let chain = read_certs(cert_file, "tls.cert_file")?;
    let spki = signer.public_key().to_spki_der();
    // The leaf's SubjectPublicKeyInfo appears verbatim in its DER.
    if !chain[0].as_ref().windows(spki.len()).any(|w| w == spki.as_slice()) {
        return Err(ConfigError::invalid(
            "tls.cert_file",
            format!(
                "{}: the certificate is not for the {} key {}",
                cert_file.display(),
                signer.algorithm(),
                signer.key_id()
            ),
        ));
    }
    let scheme = match signer.algorithm() {
        Algorithm::Ed25519 => (SignatureScheme::ED25519, SignatureAlgorithm::ED25519),
        Algorithm::EcdsaP256 => (SignatureScheme::ECDSA_NISTP256_SHA256, SignatureAlgorithm::ECDSA),
    };
    let key = Arc::new(SignerKey { signer, spki, scheme });
    let certified = Arc::new(CertifiedKey::new(chain, key));
    Ok(builder()?.with_root_certificates(roots).with_client_cert_resolver(Arc::new(OneCert(certified))))
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid("tls", &e).with_source(e))
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path, "tls.ca_file")? {
                roots.add(cert).map_err(|e| {
                    ConfigError::invalid("tls.ca_file", format!("{}: {e}", path.display())).with_source(e)
                })?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // Skip the odd unparsable system certificate rather than fail.
                if let Err(e) = roots.add(cert) {
                    tracing::debug!(error = %e, "skipping a system CA certificate");
                }
            }
            if roots.is_empty() {
                return Err(ConfigError::invalid("tls", "no ca_file given and no system CA certificates found"));
            }
        }
    }
    Ok(roots)
}

fn read_certs(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::invalid(field, format!("{}: {e}", path.display())).with_source(e))?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(field, format!("{}: no certificate in it", path.display())));
    }
    Ok(certs)
}

/// A rustls signing key that signs through a [`Signer`].
struct SignerKey {
    signer: Arc<dyn Signer>,
    spki: Vec<u8>,
    scheme: (SignatureScheme, SignatureAlgorithm),
}

impl std::fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignerKey").field("key_id", &self.signer.key_id()).finish()
    }
}

impl SigningKey for SignerKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&self.scheme.0)
            .then(|| Box::new(SignerHandle(self.signer.clone(), self.scheme.0)) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.scheme.1
    }
}

struct SignerHandle(Arc<dyn Signer>, SignatureScheme);

impl std::fmt::Debug for SignerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SignerHandle").field(&self.0.key_id()).finish()
    }
}

impl rustls::sign::Signer for SignerHandle {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let sig = self.0.sign(message).map_err(|e| rustls::Error::General(format!("client key: {e}")))?;
        match self.0.algorithm() {
            Algorithm::Ed25519 => Ok(sig.to_vec()),
            // TLS carries ECDSA signatures DER-encoded, not as r || s.
            Algorithm::EcdsaP256 => {
                chorus_keys::ecdsa_der(&sig).map_err(|e| rustls::Error::General(format!("client key: {e}")))
            }
        }
    }

    fn scheme(&self) -> SignatureScheme {
        self.1
    }
}

/// Always presents the one certificate chain (whatever CA hints the server sends, so a
/// mismatch shows up as the server's refusal rather than as a silent anonymous handshake).
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesClientCert for OneCert {
    fn resolve(&self, _hints: &[&[u8]], sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let scheme = self.0.key.algorithm();
        sigschemes
            .iter()
            .any(|s| match scheme {
                SignatureAlgorithm::ED25519 => *s == SignatureScheme::ED25519,
                _ => *s == SignatureScheme::ECDSA_NISTP256_SHA256,
            })
            .then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
