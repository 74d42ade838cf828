//! rustls client configuration (ring provider) for syslog over TLS and HEC over HTTPS.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use super::config::TlsSettings;
use super::ExportError;

/// A client configuration: roots from `ca_file` (or the system's), optional client
/// certificate and key.
pub fn client_config(settings: &TlsSettings) -> Result<ClientConfig, ExportError> {
    let bad = |m: String| ExportError::Config(m);
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(format!("tls.ca_file {}: {e}", path.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("tls.ca_file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(bad(format!("tls.ca_file {}: no certificate in it", path.display())));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(format!("tls.ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // Skip the odd unparsable system certificate rather than fail.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(bad("tls: no ca_file given and no system CA certificates found".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("tls: {e}")))?
        .with_root_certificates(roots);
    let config = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| bad(format!("tls.cert_file {}: {e}", cert.display())))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("tls.cert_file {}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(bad(format!("tls.cert_file {}: no certificate in it", cert.display())));
            }
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| bad(format!("tls.key_file {}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| bad(format!("tls client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// The name the server's certificate is checked against: `server_name`, else `host`.
pub fn server_name(settings: &TlsSettings, host: &str) -> Result<ServerName<'static>, ExportError> {
    let name = settings.server_name.as_deref().unwrap_or(host);
    let name = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    ServerName::try_from(name.to_owned()).map_err(|e| ExportError::Config(format!("tls server name {name:?}: {e}")))
}
