//! The node agent (`chorus agent`): lifecycle events, the outbox and its forwarder,
//! autonomous agents and the RPC server, on one node.
//!
//! Everything the node does is written to its outbox first, so the node keeps working (and
//! keeps its record) with the broker down; the forwarder catches the site up when it returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_identity::{Identity, Issuers, Role};
use chorus_keys::KeyConfig;
use chorus_platform::{Emitter, EventSink, Outbox, OutboxLimits, SigningSink};
use chorus_rpc::{NatsTransport, NodeContext, PolicySettings, RequestSecurity, RpcServer, ServerOptions, Transport};
use chorus_runtime::{Config, ConfigError, Health, Service, ServiceError, Shutdown, Tasks};
use serde::{Deserialize, Serialize};

use crate::agents_dir;
use crate::lifecycle::{LifecycleEmitter, NodeIdentity};
use crate::machine::{Machine, MachineHandle, Manifest};
use crate::registration::{FactSources, Registrar, RegistrationConfig, RegistrationStatus};
use crate::ProducerError;

mod monitor;
pub use monitor::AgentMonitor;

/// Configuration of a node agent (YAML or JSON).
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node's identity, usually its FQDN; by default this host's name (as `hostname`
    /// prints it), so one packaged configuration serves every node.
    #[serde(default = "default_identity")]
    #[schemars(extend("default" = "<this host's name>"))]
    pub identity: String,
    /// What runs on the node (`server`, or `provision_mode_server` before provisioning): the
    /// last token of its lifecycle subjects.
    #[serde(default = "default_component")]
    pub component: String,
    /// Version reported in lifecycle events and `rpcutil inventory`.
    #[serde(default = "default_version")]
    #[schemars(extend("default" = "<the chorus version>"))]
    pub version: String,
    /// The collective (sub-network) the node listens in.
    #[serde(default = "default_collective")]
    pub collective: String,
    /// Site name stamped on every event (provenance across federated sites).
    #[serde(default)]
    pub site: Option<String>,
    /// Facts, matched by discovery filters and Action Policy.
    #[serde(default)]
    pub facts: serde_json::Map<String, serde_json::Value>,
    /// A YAML or JSON file of facts, merged over `facts` and read again every
    /// `registration.check_interval`: a change is applied and published at once.
    #[serde(default)]
    pub facts_file: Option<PathBuf>,
    /// A program (and its arguments) printing a JSON object of facts, merged over the file's
    /// and run as often as the file is read.
    #[serde(default)]
    pub facts_command: Option<Vec<String>>,
    /// Configuration-management classes, matched by class filters and Action Policy.
    #[serde(default)]
    pub classes: Vec<String>,
    /// When the node publishes its registration (metadata for discovery).
    #[serde(default)]
    pub registration: RegistrationConfig,
    /// Where the outbox and other node state live.
    pub state_dir: PathBuf,
    /// Directory of autonomous agents: one sub-directory per machine with a `machine.yaml`.
    #[serde(default)]
    pub machines_dir: Option<PathBuf>,
    /// Directory of Action Policy files; without one every RPC request is denied.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Directory of external agents (Choria's external-agent protocol): `X.json` DDLs with
    /// `"provider": "external"` beside their executables; each agent's configuration file
    /// is `<agent>.cfg` there. Loaded at start and again when the directory changes; the
    /// ones left out are named in health.
    #[serde(default)]
    pub agents_dir: Option<PathBuf>,
    /// How often the agents directory is checked for changes.
    #[serde(default = "default_agents_reload", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub agents_reload_interval: Duration,
    /// How the policy directory is read: Choria's authorizer (`action_policy`,
    /// `rego_policy`) and its default-policy settings.
    #[serde(default)]
    pub policy: PolicySettings,
    /// Interval of alive events.
    #[serde(default = "default_alive", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub alive_interval: Duration,
    /// Longest random delay before the first alive event (defaults to the interval).
    #[serde(default, with = "humantime_serde::option")]
    #[schemars(with = "Option<String>")]
    pub alive_splay: Option<Duration>,
    /// What the outbox gives up first when it grows during an outage.
    #[serde(default)]
    pub outbox: OutboxLimits,
    /// The site broker; without it the agent runs offline and only fills its outbox.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
    /// Longest wait at shutdown for the outbox to drain to the site.
    #[serde(default = "default_drain", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub shutdown_drain: Duration,
    /// Who the node is (its key and credential) and whom it believes (trusted issuers).
    #[serde(default)]
    pub security: SecurityConfig,
    /// In provisioning mode: where enrolment writes what the provisioner gives the node
    /// (`chorus_provision`, docs/CONSUMERS.md); without it the node cannot be enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<crate::enrolment::ProvisioningConfig>,
}

/// The node's identity and the callers it accepts (see docs/SECURITY.md).
///
/// With `issuers`, every RPC request must be signed by its caller under a client credential
/// of one of them, and the node signs its events and replies with `key` under its node
/// `credential`. Without, caller ids are taken on trust; an agent whose Action Policy names
/// callers then refuses to start unless `insecure: true` says that is intended.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Trusted issuer public keys: files, or directories of `*.pem`/`*.pub` files.
    #[serde(default)]
    pub issuers: Vec<PathBuf>,
    /// The node's key (a key file, or a key on a PKCS#11 token that never leaves it).
    #[serde(default)]
    pub key: Option<KeyConfig>,
    /// The node credential for `key` (`chorus credential issue --node`).
    #[serde(default)]
    pub credential: Option<PathBuf>,
    /// Run without authenticating callers although the policies name some: every caller id
    /// is then whatever the client writes. Warned about at start and in health.
    #[serde(default)]
    pub insecure: bool,
    /// Longest TTL a request may ask for; longer ones are refused (a captured request is
    /// replayable only within its TTL, and each node runs a request once).
    #[serde(default = "default_max_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_request_ttl: Duration,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            issuers: Vec::new(),
            key: None,
            credential: None,
            insecure: false,
            max_request_ttl: default_max_ttl(),
        }
    }
}

fn default_agents_reload() -> Duration {
    Duration::from_secs(30)
}

fn default_max_ttl() -> Duration {
    chorus_rpc::security::DEFAULT_MAX_TTL
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
    /// A node `identity` keeping its state in `state_dir`, with defaults for the rest.
    pub fn new(identity: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            identity: identity.into(),
            component: default_component(),
            version: default_version(),
            collective: default_collective(),
            site: None,
            facts: Default::default(),
            facts_file: None,
            facts_command: None,
            classes: Vec::new(),
            registration: RegistrationConfig::default(),
            state_dir: state_dir.into(),
            machines_dir: None,
            policy_dir: None,
            agents_dir: None,
            agents_reload_interval: default_agents_reload(),
            policy: PolicySettings::default(),
            alive_interval: default_alive(),
            alive_splay: None,
            outbox: OutboxLimits::default(),
            nats: None,
            shutdown_drain: default_drain(),
            security: SecurityConfig::default(),
            provisioning: None,
        }
    }

    /// Reads and checks a YAML (or JSON) configuration file; errors name the file and field.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        chorus_runtime::config::load(path)
    }
}

/// This host's name, or empty (refused by validation) when it cannot be read.
fn default_identity() -> String {
    hostname::get().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

impl Config for AgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.identity.is_empty() || self.identity.chars().any(|c| c.is_whitespace() || c == '*' || c == '>') {
            return Err(ConfigError::invalid(
                "identity",
                format!("{:?} must be non-empty without white space or wildcards", self.identity),
            ));
        }
        for (field, token) in [("component", &self.component), ("collective", &self.collective)] {
            chorus_schemas::subject::validate_token(field, token)
                .map_err(|e| ConfigError::invalid(field, &e).with_source(e))?;
        }
        if self.alive_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid("alive_interval", "must be >= 1s"));
        }
        if self.facts_command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(ConfigError::invalid("facts_command", "names no program"));
        }
        if self.registration.interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid("registration.interval", "must be >= 1s"));
        }
        if let Some(n) = &self.nats {
            n.validate().map_err(|e| e.within("nats"))?;
        }
        let security = &self.security;
        if security.key.is_some() != security.credential.is_some() {
            return Err(ConfigError::invalid("security", "key and credential go together"));
        }
        if !security.issuers.is_empty() && security.insecure {
            return Err(ConfigError::invalid("security.insecure", "cannot be set together with issuers"));
        }
        if !security.issuers.is_empty() && security.key.is_none() {
            return Err(ConfigError::invalid(
                "security.key",
                "a node that checks its callers signs its replies and events: set key and credential",
            ));
        }
        if security.max_request_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid("security.max_request_ttl", "must be >= 1s"));
        }
        Ok(())
    }
}

/// A running node agent: a runtime [`Service`].
pub struct NodeAgent {
    config: AgentConfig,
    /// Asked for by enrolment: the node restarts into its normal component.
    restart: Arc<tokio::sync::Notify>,
    lifecycle: LifecycleEmitter,
    outbox: Outbox,
    machines: Vec<MachineHandle>,
    rpc: Option<Arc<RpcServer>>,
    /// Alive events.
    tasks: Tasks,
    /// The outbox forwarder, stopped only after the shutdown event is stored, so that event
    /// is forwarded too.
    delivery: Tasks,
    stopped: bool,
    /// Health and metrics.
    monitor: AgentMonitor,
}

/// How long before its node credential expires an agent reports it in health: a tenth of
/// its validity, at most a day (so credentials renewed daily do not warn all day).
fn credential_warning_from(issued: i64, expires: i64) -> i64 {
    expires - ((expires - issued) / 10).clamp(0, 86_400)
}

impl NodeAgent {
    /// Starts the agent under `shutdown`: outbox, startup event, alive events, machines,
    /// forwarder and RPC.
    pub async fn start(config: AgentConfig, shutdown: Shutdown) -> Result<Self, ProducerError> {
        config.validate()?;
        let security = Security::open(&config)?;
        let store = EmbeddedBackbone::open_path(config.state_dir.join("outbox"))?;
        let outbox = Outbox::open(store, config.outbox.clone()).await?;
        let next_seq = outbox.next_producer_seq().await?;
        let sink: Arc<dyn EventSink> = match &security.identity {
            None => Arc::new(outbox.clone()),
            Some(identity) => Arc::new(SigningSink::new(Arc::new(outbox.clone()), identity.clone())),
        };
        let emitter = Arc::new(Emitter::new(sink, next_seq, config.site.clone()));
        let node = NodeIdentity {
            identity: config.identity.clone(),
            component: config.component.clone(),
            version: config.version.clone(),
        };
        let lifecycle = LifecycleEmitter::new(node, emitter.clone());
        // A node in provisioning mode announces itself once it answers RPC: its startup is
        // what the provisioner acts on, at once.
        let provisioning = config.component == chorus_schemas::lifecycle::PROVISION_MODE_COMPONENT;
        if !provisioning {
            lifecycle.startup().await?;
        }

        let mut tasks = Tasks::new(format!("agent {}", config.identity), shutdown);
        let restart = Arc::new(tokio::sync::Notify::new());
        // Not a child of `shutdown`: the forwarder must outlive the shutdown event.
        let mut delivery = Tasks::new(format!("agent {} forwarder", config.identity), Shutdown::new());
        let mut transport: Option<Arc<dyn Transport>> = None;
        let mut site_backbone: Option<Arc<dyn Backbone>> = None;
        if let Some(nats) = &config.nats {
            let mut nats = nats.clone();
            nats.retry_on_initial_connect = true;
            let client = nats.connect(None).await?;
            let site: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::from_client(client.clone(), &nats));
            site_backbone = Some(site.clone());
            let forwarder = outbox.clone();
            let stop = delivery.shutdown().clone();
            delivery.spawn("forwarder", async move { forwarder.forward(site, 1_000, stop).await });
            transport = Some(Arc::new(NatsTransport::new(client)));
        }

        let mut machines = start_machines(&config, &emitter, site_backbone, tasks.shutdown());
        crate::machine::connect_subscriptions(&mut machines);
        let alive = lifecycle.clone();
        let (interval, splay) = (config.alive_interval, config.alive_splay.unwrap_or(config.alive_interval));
        let stop = tasks.shutdown().clone();
        tasks.spawn("alive", async move {
            alive.run_alive(interval, splay, stop).await;
            Ok::<_, ProducerError>(())
        });

        let mut rpc = None;
        let mut registration = None;
        let skipped_agents = Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(transport) = transport {
            let sources = FactSources {
                inline: config.facts.clone(),
                file: config.facts_file.clone(),
                command: config.facts_command.clone(),
            };
            // A source that cannot be read now is retried by the registration loop, which
            // reports it in health; the node starts with the facts it has.
            let read = sources.read().await;
            let read_at_start = read.is_ok();
            let facts = read.unwrap_or_else(|e| {
                tracing::warn!("facts: {e}");
                config.facts.clone()
            });
            let ctx = NodeContext {
                identity: config.identity.clone(),
                collective: config.collective.clone(),
                facts,
                classes: config.classes.clone(),
                version: config.version.clone(),
                machines: machines.iter().map(|m| m.instance().machine.clone()).collect(),
                provision_mode: config.component == chorus_schemas::lifecycle::PROVISION_MODE_COMPONENT,
            };
            // Scout over the node's machines (Choria's `scout` agent: checks, trigger,
            // maintenance, resume).
            let remotes = machines.iter().map(MachineHandle::remote).collect();
            let mut node_agents: Vec<Arc<dyn chorus_rpc::Agent>> = vec![Arc::new(crate::scout::Scout::new(remotes))];
            if let (true, Some(p)) = (ctx.provision_mode, &config.provisioning) {
                let enrollee = crate::enrolment::FileEnrollee::new(p.clone(), restart.clone())?;
                node_agents.push(Arc::new(chorus_rpc::agents::Provision::new(Arc::new(enrollee))));
            }
            let (agents, left_out) = agents_dir::load(config.agents_dir.as_deref(), &node_agents).await;
            *skipped_agents.lock().unwrap_or_else(|e| e.into_inner()) = left_out;
            let options = ServerOptions {
                security: security.requests.clone(),
                policy: config.policy.clone(),
                ..Default::default()
            };
            let server = RpcServer::new(transport, agents, config.policy_dir.clone(), options)?;
            server.add_node(ctx, emitter.clone(), security.identity.clone()).await?;
            let server = Arc::new(server);
            if let Some(dir) = &config.agents_dir {
                let watch = agents_dir::watch(
                    server.clone(),
                    dir.clone(),
                    node_agents,
                    config.agents_reload_interval,
                    skipped_agents.clone(),
                    tasks.shutdown().clone(),
                );
                tasks.spawn("external agents", async move {
                    watch.await;
                    Ok::<_, ProducerError>(())
                });
            }
            if config.registration.enabled {
                let status = Arc::new(RegistrationStatus::default());
                let registrar = Registrar {
                    server: server.clone(),
                    collective: config.collective.clone(),
                    identity: config.identity.clone(),
                    sources,
                    config: config.registration.clone(),
                    status: status.clone(),
                };
                let run = registrar.run(read_at_start, tasks.shutdown().clone());
                tasks.spawn("registration", async move {
                    run.await;
                    Ok::<_, ProducerError>(())
                });
                registration = Some(status);
            }
            rpc = Some(server);
        }
        if provisioning {
            lifecycle.startup().await?;
        }
        let monitor = AgentMonitor {
            tasks: tasks.monitor(),
            delivery: delivery.monitor(),
            outbox: outbox.clone(),
            machines: machines.iter().map(MachineHandle::remote).collect(),
            rpc: rpc.clone(),
            registration,
            insecure: security.warning,
            skipped_agents,
            credential_expires: security.identity.as_ref().map(|i| {
                let claims = i.credential().claims();
                (claims.exp, credential_warning_from(claims.iat, claims.exp))
            }),
        };
        Ok(NodeAgent { config, restart, lifecycle, outbox, machines, rpc, tasks, delivery, stopped: false, monitor })
    }

    /// Notified when enrolment asked the node to restart into its normal component (its
    /// configuration was written): the process stops the agent and starts again.
    pub fn restart_signal(&self) -> Arc<tokio::sync::Notify> {
        self.restart.clone()
    }

    /// The node's outbox.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The autonomous agents it runs.
    pub fn machines(&self) -> &[MachineHandle] {
        &self.machines
    }

    /// Its RPC server, when connected to a broker.
    pub fn rpc(&self) -> Option<&RpcServer> {
        self.rpc.as_deref()
    }

    /// Its lifecycle events.
    pub fn lifecycle(&self) -> &LifecycleEmitter {
        &self.lifecycle
    }

    /// Its health and metrics, for an ops server (`chorus agent --listen`).
    pub fn monitor(&self) -> AgentMonitor {
        self.monitor.clone()
    }
}

#[async_trait]
impl Service for NodeAgent {
    fn name(&self) -> &str {
        self.tasks.service()
    }

    fn health(&self) -> Health {
        self.monitor.health()
    }

    fn failed(&self) -> bool {
        self.tasks.failed() || self.delivery.failed()
    }

    /// Stops machines and RPC, records the shutdown event and waits (up to `shutdown_drain`)
    /// for the outbox to reach the site. What does not make it stays in the outbox for the
    /// next start.
    async fn stop(&mut self) -> Result<(), ServiceError> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        let name = self.tasks.service().to_string();
        let mut failures = Vec::new();
        if let Err(e) = self.tasks.stop().await {
            failures.extend(e.failures);
        }
        if let Some(rpc) = self.rpc.take() {
            rpc.close().await;
        }
        for m in &mut self.machines {
            if let Err(e) = m.stop().await {
                failures.extend(e.failures);
            }
        }
        if let Err(e) = self.lifecycle.shutdown().await {
            failures.extend(ServiceError::new(&name, "shutdown event", e).failures);
        }
        self.delivery.shutdown().request();
        if tokio::time::timeout(self.config.shutdown_drain, self.delivery.join()).await.is_err() {
            tracing::warn!(
                backlog = self.outbox.stats().backlog(),
                "outbox not drained at shutdown; kept for the next start"
            );
            self.delivery.abort();
        }
        if let Err(e) = self.delivery.join().await {
            failures.extend(e.failures);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(ServiceError { service: name, failures })
        }
    }
}

/// What the agent's security configuration amounts to once opened.
struct Security {
    /// The node's key and credential.
    identity: Option<Identity>,
    /// The checks on incoming requests, when callers are authenticated.
    requests: Option<Arc<RequestSecurity>>,
    /// Why callers are not authenticated, when they are not.
    warning: Option<String>,
}

impl Security {
    /// Opens the key, reads and checks the credential against the issuers, and refuses an
    /// agent whose policies name callers it cannot authenticate (unless told `insecure`).
    fn open(config: &AgentConfig) -> Result<Self, ProducerError> {
        let security = &config.security;
        let invalid = |field: &str, e: &dyn std::fmt::Display| ConfigError::invalid(field, e.to_string());
        let identity = match (&security.key, &security.credential) {
            (Some(key), Some(credential)) => Some(
                Identity::load(key, credential, Role::Node, Some(&config.identity))
                    .map_err(|e| invalid("security.credential", &e))?,
            ),
            _ => None,
        };
        if security.issuers.is_empty() {
            let warning = if security.insecure {
                "security.insecure is set: RPC caller ids are not authenticated".to_string()
            } else {
                if let Some(at) = config.policy_dir.as_deref().and_then(chorus_rpc::policy::first_named_caller) {
                    return Err(ConfigError::invalid(
                        "security.issuers",
                        format!(
                            "the Action Policy names callers ({at}) but no issuer is configured, so caller ids \
                             cannot be authenticated; set security.issuers (or security.insecure: true to run \
                             without)"
                        ),
                    )
                    .into());
                }
                "no security.issuers: RPC caller ids are not authenticated".to_string()
            };
            tracing::warn!(identity = %config.identity, "{warning}");
            return Ok(Security { identity, requests: None, warning: Some(warning) });
        }
        let issuers = Arc::new(Issuers::from_paths(&security.issuers).map_err(|e| invalid("security.issuers", &e))?);
        let identity = identity.expect("validated: issuers need a key and credential");
        // The node's own credential must be one its peers will accept.
        issuers
            .verify(identity.token(), Role::Node, chrono::Utc::now().timestamp())
            .map_err(|e| invalid("security.credential", &format!("not accepted by the configured issuers: {e}")))?;
        let tenant = identity.credential().claims().tenant.clone();
        let requests = RequestSecurity::new(issuers).with_max_ttl(security.max_request_ttl).with_tenant(tenant);
        Ok(Security { identity: Some(identity), requests: Some(Arc::new(requests)), warning: None })
    }
}

/// Starts every `machine.yaml` under the machines directory; a bad manifest is reported with
/// the field at fault and skipped, the others run.
fn start_machines(
    config: &AgentConfig,
    emitter: &Arc<Emitter>,
    site: Option<Arc<dyn Backbone>>,
    shutdown: &Shutdown,
) -> Vec<MachineHandle> {
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
        // The machine's data store lives in the node's state, so the machines directory (in
        // /etc, read-only under the packaged unit) is only read.
        let data_dir = config.state_dir.join("machines").join(&manifest.name);
        if let Err(e) = std::fs::create_dir_all(&data_dir) {
            tracing::error!(machine = %d.display(), dir = %data_dir.display(), error = %e, "machine data directory not made; machine not started");
            continue;
        }
        match Machine::start_on(
            manifest,
            config.identity.clone(),
            d.clone(),
            emitter.clone(),
            crate::machine::MachineNode {
                backbone: site.clone(),
                facts: serde_json::Value::Object(config.facts.clone()),
                data_dir: Some(data_dir),
            },
            shutdown.child(),
        ) {
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

    /// An agent configured with a key and node credential signs every event it stores; a
    /// verifier trusting the issuer accepts them, one trusting another issuer refuses them.
    #[tokio::test]
    async fn an_agent_with_a_signing_key_signs_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        let signer = chorus_keys::FileSigner::generate(&key, chorus_keys::Algorithm::EcdsaP256).unwrap();
        let issuer = chorus_keys::FileSigner::random(chorus_keys::Algorithm::Ed25519);
        let spec = chorus_identity::CredentialSpec::node(
            "n1.example.net",
            chorus_keys::Signer::public_key(&signer).clone(),
            Duration::from_secs(3600),
        );
        let credential =
            chorus_identity::Credential::issue(&issuer, &spec, chrono::Utc::now().timestamp() - 60).unwrap();
        std::fs::write(dir.path().join("node.cred"), credential.token()).unwrap();
        let yaml = format!(
            "identity: n1.example.net\nstate_dir: {}\nsecurity: {{ key: {{ key_file: {} }}, credential: {}, insecure: true }}\n",
            dir.path().join("state").display(),
            key.display(),
            dir.path().join("node.cred").display(),
        );
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        let mut agent = NodeAgent::start(config, Shutdown::new()).await.unwrap();
        agent.stop().await.unwrap();
        drop(agent); // releases the outbox

        let store =
            chorus_backbone::embedded::EmbeddedBackbone::open_path(dir.path().join("state").join("outbox")).unwrap();
        let issuers = |key: &chorus_keys::FileSigner| {
            let issuers = chorus_identity::Issuers::new().with(chorus_keys::Signer::public_key(key).clone());
            chorus_schemas::signature::Verifier::new(Arc::new(issuers))
        };
        let trusted = issuers(&issuer);
        let other = issuers(&chorus_keys::FileSigner::random(chorus_keys::Algorithm::Ed25519));
        let mut replay = store.replay(chorus_platform::outbox::OUTBOX_STREAM, Default::default()).await.unwrap();
        let mut seen = 0;
        while let Some(m) = replay.next().await {
            let record = chorus_schemas::EventRecord::decode(&m.unwrap().payload).unwrap();
            trusted.verify(&record).expect("signed with the agent's key under its credential");
            assert!(other.verify(&record).is_err(), "another key does not verify it");
            seen += 1;
        }
        assert!(seen >= 2, "startup and shutdown at least, got {seen}");
    }
}

#[cfg(test)]
mod secure_by_default_tests {
    use super::*;

    fn with_policy(dir: &std::path::Path, policy: &str) -> AgentConfig {
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("rpcutil.policy"), policy).unwrap();
        let mut config = AgentConfig::new("n1.example.net", dir.join("state"));
        config.policy_dir = Some(policies);
        config
    }

    /// Policies that name callers need callers that are authenticated: without an issuer the
    /// agent does not start, and the error says which line and what to set.
    #[tokio::test]
    async fn an_agent_whose_policies_name_callers_refuses_to_start_without_an_issuer() {
        let dir = tempfile::tempdir().unwrap();
        let config = with_policy(dir.path(), "policy default deny\nallow\tchoria=alice\tping\t*\t*\n");
        let error = NodeAgent::start(config, Shutdown::new()).await.err().expect("refused").to_string();
        assert!(error.contains("security.issuers"), "{error}");
        assert!(error.contains("choria=alice") || error.contains("rpcutil.policy"), "{error}");
    }

    /// `insecure: true` starts it, and health says INSECURE for as long as it runs.
    #[tokio::test]
    async fn an_insecure_agent_starts_and_says_so_in_health() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = with_policy(dir.path(), "policy default deny\nallow\tchoria=alice\tping\t*\t*\n");
        config.security.insecure = true;
        let mut agent = NodeAgent::start(config, Shutdown::new()).await.unwrap();
        let health = serde_json::to_value(agent.health()).unwrap();
        let security = health["security"].as_str().unwrap().to_string();
        agent.stop().await.unwrap();
        assert!(security.starts_with("INSECURE:"), "{health}");
    }

    /// Policies that name no caller (everyone, or nobody) need no issuer: the agent starts,
    /// and health still says callers are not authenticated.
    #[tokio::test]
    async fn an_agent_whose_policies_name_no_caller_starts_and_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = with_policy(dir.path(), "policy default deny\nallow\t*\tping\t*\t*\n");
        let mut agent = NodeAgent::start(config, Shutdown::new()).await.unwrap();
        let health = serde_json::to_value(agent.health()).unwrap();
        agent.stop().await.unwrap();
        assert!(health["security"].as_str().unwrap().starts_with("INSECURE:"), "{health}");
    }

    /// A node credential about to expire turns health bad, naming it, before peers start
    /// refusing the node's replies and events.
    #[tokio::test]
    async fn a_node_credential_about_to_expire_shows_in_health() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        let signer = chorus_keys::FileSigner::generate(&key, chorus_keys::Algorithm::Ed25519).unwrap();
        let issuer = chorus_keys::FileSigner::random(chorus_keys::Algorithm::Ed25519);
        let public = chorus_keys::Signer::public_key(&signer).clone();
        // Issued 59 minutes ago for an hour: in the last tenth of its validity.
        let spec = chorus_identity::CredentialSpec::node("n1.example.net", public, Duration::from_secs(3600));
        let issued = chrono::Utc::now().timestamp() - 59 * 60;
        let credential = chorus_identity::Credential::issue(&issuer, &spec, issued).unwrap();
        std::fs::write(dir.path().join("node.cred"), credential.token()).unwrap();
        let mut config = AgentConfig::new("n1.example.net", dir.path().join("state"));
        config.security.key = Some(chorus_keys::KeyConfig::KeyFile(key));
        config.security.credential = Some(dir.path().join("node.cred"));
        let mut agent = NodeAgent::start(config, Shutdown::new()).await.unwrap();
        let health = agent.health();
        agent.stop().await.unwrap();
        assert!(!health.healthy, "{health:?}");
        assert!(health.reason.as_deref().unwrap().contains("node credential expires"), "{health:?}");
        assert_eq!(health.details["credential_expires"], credential.claims().exp);
    }
}
