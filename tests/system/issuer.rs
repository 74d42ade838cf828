//! An issuer for tests: keys and credentials for callers, nodes and delegators, in memory
//! or written to files as configurations name them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chorus_identity::{Credential, CredentialSpec, Identity, Issuers};
use chorus_keys::{Algorithm, FileSigner, KeyConfig, PublicKey, Signer};

const DAY: Duration = Duration::from_secs(86_400);

/// An organisation issuer.
pub struct TestIssuer {
    pub key: FileSigner,
}

impl TestIssuer {
    pub fn new() -> Self {
        TestIssuer { key: FileSigner::random(Algorithm::Ed25519) }
    }

    /// Trusting only this issuer.
    pub fn issuers(&self) -> Arc<Issuers> {
        Arc::new(Issuers::new().with(self.key.public_key().clone()))
    }

    /// Writes the issuer's public key to `dir/issuer.pub` and returns the path.
    pub fn write_public(&self, dir: &Path) -> PathBuf {
        let path = dir.join("issuer.pub");
        std::fs::write(&path, self.key.public_key().to_pem()).unwrap();
        path
    }

    pub fn credential(&self, spec: &CredentialSpec) -> Credential {
        Credential::issue(&self.key, spec, chrono::Utc::now().timestamp()).unwrap()
    }

    /// A new key and a credential made by `spec` for its public key.
    pub fn identity(&self, spec: impl FnOnce(PublicKey) -> CredentialSpec) -> Identity {
        let key = FileSigner::random(Algorithm::Ed25519);
        let credential = self.credential(&spec(key.public_key().clone()));
        Identity::new(Arc::new(key), credential).unwrap()
    }

    /// A caller allowed `agents` (`agent.action` patterns).
    pub fn client(&self, callerid: &str, agents: &[&str]) -> Identity {
        self.identity(|key| {
            let mut spec = CredentialSpec::client(callerid, key, DAY);
            spec.agents = agents.iter().map(|a| a.to_string()).collect();
            spec
        })
    }

    pub fn node(&self, identity: &str) -> Identity {
        self.identity(|key| CredentialSpec::node(identity, key, DAY))
    }

    /// A key file and credential file for `spec`, in `dir` as `<name>.key`/`<name>.cred`.
    pub fn files(
        &self,
        dir: &Path,
        name: &str,
        spec: impl FnOnce(PublicKey) -> CredentialSpec,
    ) -> (KeyConfig, PathBuf) {
        let key_path = dir.join(format!("{name}.key"));
        let key = FileSigner::generate(&key_path, Algorithm::Ed25519).unwrap();
        let credential = self.credential(&spec(key.public_key().clone()));
        let credential_path = dir.join(format!("{name}.cred"));
        std::fs::write(&credential_path, credential.token()).unwrap();
        (KeyConfig::KeyFile(key_path), credential_path)
    }

    pub fn node_files(&self, dir: &Path, identity: &str) -> (KeyConfig, PathBuf) {
        self.files(dir, identity, |key| CredentialSpec::node(identity, key, DAY))
    }
}
