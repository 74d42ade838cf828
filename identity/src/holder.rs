//! A key together with the credential that says whom it speaks for.

use std::path::Path;
use std::sync::Arc;

use chorus_keys::{KeyConfig, Signer};

use crate::{Credential, CredentialError, Role};

/// What a node or a client signs with: its key, and the credential a trusted issuer gave
/// that key. Cheap to clone.
#[derive(Clone)]
pub struct Identity {
    signer: Arc<dyn Signer>,
    credential: Arc<Credential>,
}

impl Identity {
    /// Pairs `signer` with `credential`; refuses a credential for another key.
    pub fn new(signer: Arc<dyn Signer>, credential: Credential) -> Result<Self, CredentialError> {
        if credential.public_key() != signer.public_key() {
            return Err(CredentialError::Malformed(format!(
                "the credential for {:?} is for key {}, not for this key {}",
                credential.subject(),
                credential.public_key().key_id(),
                signer.key_id()
            )));
        }
        Ok(Identity { signer, credential: Arc::new(credential) })
    }

    /// Opens the key and reads the credential file, and checks they belong together and
    /// that the credential is for `role` (and `subject`, when given).
    pub fn load(
        key: &KeyConfig,
        credential: &Path,
        role: Role,
        subject: Option<&str>,
    ) -> Result<Self, CredentialError> {
        let signer = key.open().map_err(CredentialError::Sign)?;
        let identity = Self::new(signer, Credential::read_file(credential)?)?;
        if identity.credential.role() != role {
            return Err(CredentialError::WrongRole { expected: role, found: identity.credential.role() });
        }
        if let Some(subject) = subject.filter(|s| *s != identity.subject()) {
            return Err(CredentialError::Malformed(format!(
                "{}: the credential is for {:?}, not {subject:?}",
                credential.display(),
                identity.subject()
            )));
        }
        Ok(identity)
    }

    /// The key.
    pub fn signer(&self) -> &Arc<dyn Signer> {
        &self.signer
    }

    /// The credential.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// The credential token, as it travels beside signatures.
    pub fn token(&self) -> &str {
        self.credential.token()
    }

    /// The caller id or node identity.
    pub fn subject(&self) -> &str {
        self.credential.subject()
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("credential", &self.credential).finish()
    }
}
