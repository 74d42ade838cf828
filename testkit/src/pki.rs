//! A throw-away PKI for TLS tests: a CA, a server certificate for `localhost`/127.0.0.1 and a
//! client certificate, written as PEM files into a test's directory.

use std::path::{Path, PathBuf};

/// PEM files of a generated CA, server and client.
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (`ca.pem`) that signed the server and client certificates.
    pub ca: PathBuf,
    /// Server certificate (`server.pem`) for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// Private key of the server certificate (`server-key.pem`).
    pub server_key: PathBuf,
    /// Client certificate (`client.pem`) for the client name given to [`generate`].
    pub client_cert: PathBuf,
    /// Private key of the client certificate (`client-key.pem`).
    pub client_key: PathBuf,
}

/// Generates a CA, a server certificate for `localhost` and `127.0.0.1`, and a client
/// certificate for `client` (DNS name and common name), into `dir`. Panics on failure: it is
/// test setup.
pub fn generate(dir: &Path, client: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("writing a PEM file");
        p
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "Chorus test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::new(names).expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &issuer).expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) =
        leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let cn = client.split('.').next().unwrap_or(client);
    let (client_cert, client_key) = leaf(vec![client.into()], cn, ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server-key.pem", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client-key.pem", client_key),
    }
}
