//! Nodes' side of enrolment ([`chorus_rpc::agents::provision`]): on a real node
//! ([`FileEnrollee`]) the key is a file made on first use, and the credential, the
//! configuration and the policies are written where the agent reads them at its next start;
//! for simulated nodes ([`SimulatedEnrollee`]) all of it is kept in memory, so a provisioner
//! can be tried against thousands of nodes in one process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chorus_identity::Issuers;
use chorus_keys::{Algorithm, FileSigner, Signer};
use chorus_platform::Emitter;
use chorus_rpc::agents::provision::{Enrollee, Enrolment};
use chorus_schemas::lifecycle::Startup;

/// Simulated nodes' enrolment: a key made per node on first use, the issuers the "image"
/// trusts, what each node was configured with, and a restart that starts the node again as
/// `server` (its startup event).
pub struct SimulatedEnrollee {
    issuers: Issuers,
    keys: Mutex<HashMap<String, Arc<dyn Signer>>>,
    enrolled: Mutex<HashMap<String, Enrolment>>,
    /// Each node's emitter and version, by identity.
    nodes: HashMap<String, (Arc<Emitter>, String)>,
}

impl SimulatedEnrollee {
    /// Nodes trusting `issuers`; each node's emitter (and version, by identity) publishes
    /// its restart.
    pub fn new(issuers: Issuers, nodes: HashMap<String, (Arc<Emitter>, String)>) -> Self {
        SimulatedEnrollee { issuers, keys: Mutex::default(), enrolled: Mutex::default(), nodes }
    }

    /// What node `identity` was configured with, once it was.
    pub fn enrolment(&self, identity: &str) -> Option<Enrolment> {
        self.enrolled.lock().unwrap_or_else(|e| e.into_inner()).get(identity).cloned()
    }

    /// How many nodes were configured.
    pub fn enrolled(&self) -> usize {
        self.enrolled.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[async_trait]
impl Enrollee for SimulatedEnrollee {
    fn key(&self, identity: &str) -> Result<Arc<dyn Signer>, String> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        Ok(keys.entry(identity.to_owned()).or_insert_with(|| Arc::new(FileSigner::random(Algorithm::Ed25519))).clone())
    }

    fn issuers(&self) -> &Issuers {
        &self.issuers
    }

    async fn apply(&self, identity: &str, enrolment: Enrolment) -> Result<(), String> {
        self.enrolled.lock().unwrap_or_else(|e| e.into_inner()).insert(identity.to_owned(), enrolment);
        Ok(())
    }

    async fn restart(&self, identity: &str) -> Result<(), String> {
        let (emitter, version) = self.nodes.get(identity).ok_or_else(|| format!("no simulated node {identity}"))?;
        emitter.record(Startup::new(identity, "server", version)).await.map_err(|e| e.to_string())
    }
}

/// Where a node in provisioning mode keeps what enrolment gives it (the `provisioning`
/// section of the agent's configuration).
///
/// ```yaml
/// provisioning:
///   issuers: [/etc/chorus/issuer.pub]   # whose credentials the node accepts (its image's)
///   key_file: /etc/chorus/node.key      # made when missing
///   credential: /etc/chorus/node.cred   # written
///   config: /etc/chorus/agent.yaml      # the agent's own file: written, then the agent restarts
///   policy_dir: /etc/chorus/policies    # <agent>.policy files written
/// ```
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningConfig {
    /// Trusted issuers of node credentials: files or directories.
    pub issuers: Vec<std::path::PathBuf>,
    /// The node's key file (Ed25519), made when missing.
    pub key_file: std::path::PathBuf,
    /// Where the credential is written.
    pub credential: std::path::PathBuf,
    /// Where the configuration is written, as the agent's YAML: the agent's own
    /// configuration file, so the restart reads it.
    pub config: std::path::PathBuf,
    /// Where Action Policy files are written.
    pub policy_dir: std::path::PathBuf,
}

/// A real node's enrolment: files, and a restart of the agent.
pub struct FileEnrollee {
    config: ProvisioningConfig,
    issuers: Issuers,
    key: Arc<dyn Signer>,
    restart: Arc<tokio::sync::Notify>,
}

impl FileEnrollee {
    /// Opens (or makes) the node's key and reads its trusted issuers; `restart` is notified
    /// once the node was configured and asked to restart.
    pub fn new(
        config: ProvisioningConfig,
        restart: Arc<tokio::sync::Notify>,
    ) -> Result<Self, crate::error::ProducerError> {
        let issuers = Issuers::from_paths(&config.issuers).map_err(crate::error::ProducerError::Identity)?;
        let key: Arc<dyn Signer> = if config.key_file.exists() {
            Arc::new(FileSigner::load(&config.key_file)?)
        } else {
            Arc::new(FileSigner::generate(&config.key_file, Algorithm::Ed25519)?)
        };
        Ok(FileEnrollee { config, issuers, key, restart })
    }
}

/// Written beside and renamed: a crash leaves the old file or the new one, never half.
fn write_private(path: &std::path::Path, content: &[u8]) -> Result<(), String> {
    chorus_runtime::files::replace(path, content, 0o600).map_err(|e| e.to_string())
}

#[async_trait]
impl Enrollee for FileEnrollee {
    fn key(&self, _identity: &str) -> Result<Arc<dyn Signer>, String> {
        Ok(self.key.clone())
    }

    fn issuers(&self) -> &Issuers {
        &self.issuers
    }

    async fn apply(&self, identity: &str, enrolment: Enrolment) -> Result<(), String> {
        // The configuration must be one this agent can start with, for this node: a broken
        // one is refused here rather than written over the working provisioning config.
        let config: crate::agent::AgentConfig =
            chorus_runtime::config::from_value(serde_json::Value::Object(enrolment.configuration.clone()))
                .map_err(|e| format!("configuration: {e}"))?;
        chorus_runtime::Config::validate(&config).map_err(|e| format!("configuration: {e}"))?;
        if config.identity != identity {
            return Err(format!("configuration is for {:?}, not this node", config.identity));
        }
        for (agent, text) in &enrolment.action_policies {
            write_private(&self.config.policy_dir.join(format!("{agent}.policy")), text.as_bytes())?;
        }
        write_private(&self.config.credential, enrolment.credential.as_bytes())?;
        let yaml = serde_yaml::to_string(&serde_json::Value::Object(enrolment.configuration))
            .map_err(|e| format!("configuration: {e}"))?;
        write_private(&self.config.config, yaml.as_bytes())?;
        tracing::info!(%identity, config = %self.config.config.display(), "enrolled: credential, configuration and policies written");
        Ok(())
    }

    async fn restart(&self, identity: &str) -> Result<(), String> {
        tracing::info!(%identity, "enrolled: restarting into the normal component");
        self.restart.notify_one();
        Ok(())
    }
}
