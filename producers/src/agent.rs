//! The node agent (`chorus agent`): lifecycle events, the outbox and its forwarder,
//! autonomous agents and the RPC server, on one node.
//!
//! Everything the node does is written to its outbox first, so the node keeps working (and
//! keeps its record) with the broker down; the forwarder catches the site up when it returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::lifecycle::{LifecycleEmitter, NodeIdentity};
use crate::machine::{Machine, MachineHandle, Manifest};
use crate::outbox::{Outbox, OutboxLimits};
use crate::rpc::agents::{RpcUtil, Shell};
use crate::rpc::{Agent, NatsTransport, NodeContext, RpcServer, Transport};
use crate::{Emitter, ProducerError};

/// Where the agent's signing key is.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SigningConfig {
    /// An Ed25519 key file (`chorus security keygen --file`).
    KeyFile(PathBuf),
    /// A key held by a PKCS#11 token (SoftHSM2, an HSM).
    Pkcs11(chorus_schemas::signature::Pkcs11Config),
}

impl SigningConfig {
    /// Opens the key: reads the file, or logs in to the token.
    pub fn signer(&self) -> Result<Arc<dyn chorus_schemas::signature::Signer>, ProducerError> {
        Ok(match self {
            SigningConfig::KeyFile(path) => Arc::new(
                chorus_schemas::signature::Ed25519FileSigner::load(path)
                    .map_err(|e| ProducerError::Signing(e.to_string()))?,
            ),
            SigningConfig::Pkcs11(config) => Arc::new(
                chorus_schemas::signature::Pkcs11Signer::open(config)
                    .map_err(|e| ProducerError::Signing(e.to_string()))?,
            ),
        })
    }
}

/// Configuration of a node agent (YAML or JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node's identity, usually its FQDN.
    pub identity: String,
    #[serde(default = "default_component")]
    pub component: String,
    #[serde(default = "default_version")]
    pub version: String,
    #[serde(default = "default_collective")]
    pub collective: String,
    /// Site name stamped on every event (provenance across federated sites).
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub facts: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub classes: Vec<String>,
    /// Where the outbox and other node state live.
    pub state_dir: PathBuf,
    /// Directory of autonomous agents: one sub-directory per machine with a `machine.yaml`.
    #[serde(default)]
    pub machines_dir: Option<PathBuf>,
    /// Directory of Action Policy files; without one every RPC request is denied.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    #[serde(default = "default_alive", with = "humantime_serde")]
    pub alive_interval: Duration,
    /// Longest random delay before the first alive event (defaults to the interval).
    #[serde(default, with = "humantime_serde::option")]
    pub alive_splay: Option<Duration>,
    #[serde(default)]
    pub outbox: OutboxLimits,
    /// The site broker; without it the agent runs offline and only fills its outbox.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
    /// Longest wait at shutdown for the outbox to drain to the site.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub shutdown_drain: Duration,
    /// Sign every event with this key (an Ed25519 key file, or a key on a PKCS#11 token
    /// that never leaves it), so consumers can refuse forged events.
    #[serde(default, with = "serde_yaml::with::singleton_map")]
    pub signing: Option<SigningConfig>,
}

fn default_component() -> String {
    "server".into()
}
fn default_version() -> String {
    env!("CARGO_PKG_VERSION").into()
}
fn default_collective() -> String {
    "choria".into()
}
fn default_alive() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}

impl AgentConfig {
    pub fn new(identity: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            identity: identity.into(),
            component: default_component(),
            version: default_version(),
            collective: default_collective(),
            site: None,
            facts: Default::default(),
            classes: Vec::new(),
            state_dir: state_dir.into(),
            machines_dir: None,
            policy_dir: None,
            alive_interval: default_alive(),
            alive_splay: None,
            outbox: OutboxLimits::default(),
            nats: None,
            shutdown_drain: default_drain(),
            signing: None,
        }
    }

    /// Reads a YAML (or JSON) configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, ProducerError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ProducerError::Config(format!("{}: {e}", path.display())))?;
        let de = serde_yaml::Deserializer::from_str(&text);
        let config: AgentConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| ProducerError::Config(format!("{}: {}: {}", path.display(), e.path(), e.inner())))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ProducerError> {
        let bad = |m: String| Err(ProducerError::Config(m));
        if self.identity.is_empty() || self.identity.chars().any(|c| c.is_whitespace() || c == '*' || c == '>') {
            return bad(format!("identity {:?} must be non-empty without white space or wildcards", self.identity));
        }
        for (field, token) in [("component", &self.component), ("collective", &self.collective)] {
            chorus_schemas::subject::validate_token(field, token).map_err(|e| ProducerError::Config(e.to_string()))?;
        }
        if self.alive_interval < Duration::from_secs(1) {
            return bad("alive_interval must be >= 1s".into());
        }
        if let Some(n) = &self.nats {
            n.validate()?;
        }
        Ok(())
    }
}

/// A running node agent.
pub struct NodeAgent {
    config: AgentConfig,
    lifecycle: LifecycleEmitter,
    outbox: Outbox,
    machines: Vec<MachineHandle>,
    rpc: Option<RpcServer>,
    stop: watch::Sender<bool>,
    forwarder: Option<tokio::task::JoinHandle<Result<(), ProducerError>>>,
    alive: tokio::task::JoinHandle<()>,
}

impl NodeAgent {
    /// Starts the agent: outbox, startup event, alive events, machines, forwarder and RPC.
    pub async fn start(config: AgentConfig) -> Result<Self, ProducerError> {
        config.validate()?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| ProducerError::Config(format!("state_dir {}: {e}", config.state_dir.display())))?;
        let store = EmbeddedBackbone::open_path(config.state_dir.join("outbox"))?;
        let outbox = Outbox::open(store, config.outbox.clone()).await?;
        let next_seq = outbox.next_producer_seq().await?;
        let sink: Arc<dyn crate::EventSink> = match &config.signing {
            None => Arc::new(outbox.clone()),
            Some(signing) => Arc::new(crate::emitter::SigningSink::new(Arc::new(outbox.clone()), signing.signer()?)),
        };
        let emitter = Arc::new(Emitter::new(sink, next_seq, config.site.clone()));
        let node = NodeIdentity {
            identity: config.identity.clone(),
            component: config.component.clone(),
            version: config.version.clone(),
        };
        let lifecycle = LifecycleEmitter::new(node, emitter.clone());
        lifecycle.startup().await?;

        let (stop, stop_rx) = watch::channel(false);
        let mut forwarder = None;
        let mut transport: Option<Arc<dyn Transport>> = None;
        if let Some(nats) = &config.nats {
            let mut nats = nats.clone();
            nats.retry_on_initial_connect = true;
            let client = nats.connect(None).await?;
            let site: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::from_client(client.clone(), &nats));
            forwarder = Some(outbox.spawn_forwarder(site, 1_000, stop_rx.clone()));
            transport = Some(Arc::new(NatsTransport::new(client)));
        }

        let machines = start_machines(&config, &emitter);
        let alive = lifecycle.spawn_alive(config.alive_interval, config.alive_splay.unwrap_or(config.alive_interval));

        let mut rpc = None;
        if let Some(transport) = transport {
            let ctx = NodeContext {
                identity: config.identity.clone(),
                collective: config.collective.clone(),
                facts: config.facts.clone(),
                classes: config.classes.clone(),
                version: config.version.clone(),
                machines: machines.iter().map(|m| m.instance().machine.clone()).collect(),
            };
            let agents: Vec<Arc<dyn Agent>> = vec![Arc::new(RpcUtil), Arc::new(Shell)];
            let server = RpcServer::start(transport, ctx, agents, config.policy_dir.clone(), emitter.clone())
                .await
                .map_err(|e| ProducerError::Other(format!("rpc server: {e}")))?;
            rpc = Some(server);
        }
        Ok(NodeAgent { config, lifecycle, outbox, machines, rpc, stop, forwarder, alive })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn machines(&self) -> &[MachineHandle] {
        &self.machines
    }

    pub fn rpc(&self) -> Option<&RpcServer> {
        self.rpc.as_ref()
    }

    pub fn lifecycle(&self) -> &LifecycleEmitter {
        &self.lifecycle
    }

    /// Stops machines and RPC, records the shutdown event and waits (up to `shutdown_drain`)
    /// for the outbox to reach the site. What does not make it stays in the outbox for the
    /// next start.
    pub async fn shutdown(self) -> Result<(), ProducerError> {
        self.alive.abort();
        drop(self.rpc);
        for m in &self.machines {
            m.stop().await;
        }
        self.lifecycle.shutdown().await?;
        let _ = self.stop.send(true);
        if let Some(f) = self.forwarder {
            match tokio::time::timeout(self.config.shutdown_drain, f).await {
                Ok(Ok(r)) => r?,
                Ok(Err(e)) => return Err(ProducerError::Other(format!("forwarder: {e}"))),
                Err(_) => tracing::warn!(
                    backlog = self.outbox.stats().backlog(),
                    "outbox not drained at shutdown; kept for the next start"
                ),
            }
        }
        Ok(())
    }
}

/// Starts every `machine.yaml` under the machines directory; a bad manifest is reported with
/// the field at fault and skipped, the others run.
fn start_machines(config: &AgentConfig, emitter: &Arc<Emitter>) -> Vec<MachineHandle> {
    let Some(dir) = &config.machines_dir else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => {
            entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("machine.yaml").exists()).collect()
        }
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot read machines directory");
            return Vec::new();
        }
    };
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let manifest = match Manifest::load(d.join("machine.yaml")) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(machine = %d.display(), error = %e, "invalid machine manifest, not started");
                continue;
            }
        };
        match Machine::start(manifest, config.identity.clone(), d.clone(), emitter.clone()) {
            Ok(h) => out.push(h),
            Err(e) => tracing::error!(machine = %d.display(), error = %e, "machine not started"),
        }
    }
    out
}

#[cfg(test)]
mod signing_tests {
    use super::*;
    use chorus_backbone::Backbone;
    use futures::StreamExt;

    /// An agent configured with a key signs every event it stores; a verifier trusting the
    /// key accepts them, one trusting another key refuses them.
    #[tokio::test]
    async fn an_agent_with_a_signing_key_signs_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        let signer = chorus_schemas::signature::Ed25519FileSigner::generate(&key).unwrap();
        let yaml = format!(
            "identity: n1.example.net\nstate_dir: {}\nsigning: {{ key_file: {} }}\n",
            dir.path().join("state").display(),
            key.display()
        );
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        let agent = NodeAgent::start(config).await.unwrap();
        agent.shutdown().await.unwrap();

        let store =
            chorus_backbone::embedded::EmbeddedBackbone::open_path(dir.path().join("state").join("outbox")).unwrap();
        let mut trusted = chorus_schemas::signature::Verifier::new();
        trusted.trust_signer(&signer).unwrap();
        let mut other = chorus_schemas::signature::Verifier::new();
        other.trust_signer(&chorus_schemas::signature::Ed25519FileSigner::random()).unwrap();
        let mut replay = store.replay(crate::outbox::OUTBOX_STREAM, Default::default()).await.unwrap();
        let mut seen = 0;
        while let Some(m) = replay.next().await {
            let record = chorus_schemas::EventRecord::decode(&m.unwrap().payload).unwrap();
            trusted.verify(&record).expect("signed with the agent's key");
            assert!(other.verify(&record).is_err(), "another key does not verify it");
            seen += 1;
        }
        assert!(seen >= 2, "startup and shutdown at least, got {seen}");
    }
}
