//! The load simulator: many simulated nodes in one process, sharing a few connections.
//!
//! A real fleet is tens of thousands of agents; testing the platform at that scale must not
//! need tens of thousands of processes or sockets (this machine allows 20,000 open files).
//! A simulated node is a row in a table (identity, version, sequence, alive slot), not a task;
//! one ticker walks the table and batches the events of many nodes into each publish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chorus_identity::{Credential, CredentialSpec, Identity};
use chorus_keys::{Algorithm, FileSigner, Signer};
use chorus_platform::{take_failure, until_failure, Emitter, EventSink, PlatformError, SigningSink};
use chorus_rpc::{agents, Agent, NodeContext, RequestSecurity, RpcServer, ServerOptions, Transport};
use chorus_runtime::{Config, ConfigError, Health, Service, ServiceError, Shutdown, Tasks};
use chorus_schemas::lifecycle::{Alive, Startup};
use chorus_schemas::{Event, EventRecord};
use serde::{Deserialize, Serialize};

use crate::ProducerError;

/// What to simulate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Number of simulated nodes.
    pub nodes: usize,
    /// Identities are `<prefix>-<n>.<domain>`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Domain part of every identity (default `example.net`).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Lifecycle component of every node (default `server`).
    #[serde(default = "default_component")]
    pub component: String,
    /// Versions handed out round-robin, weighted by repetition (a realistic rollout mix).
    #[serde(default = "default_versions")]
    pub versions: Vec<String>,
    /// Alive interval of every node; each node gets a random slot within it (splay).
    #[serde(default = "default_alive", with = "humantime_serde")]
    pub alive_interval: Duration,
    /// Site stamped on every event (the `site` extension); none when unset.
    #[serde(default)]
    pub site: Option<String>,
}

fn default_prefix() -> String {
    "sim".into()
}
fn default_domain() -> String {
    "example.net".into()
}
fn default_component() -> String {
    "server".into()
}
fn default_versions() -> Vec<String> {
    ["0.29.4", "0.29.4", "0.29.4", "0.29.3", "0.29.3", "0.28.0"].iter().map(|s| s.to_string()).collect()
}
fn default_alive() -> Duration {
    Duration::from_secs(30 * 60)
}

impl SimConfig {
    /// `nodes` simulated nodes, everything else at its default.
    pub fn new(nodes: usize) -> Self {
        SimConfig {
            nodes,
            prefix: default_prefix(),
            domain: default_domain(),
            component: default_component(),
            versions: default_versions(),
            alive_interval: default_alive(),
            site: None,
        }
    }

    /// The identity of simulated node `n`.
    pub fn identity(&self, n: usize) -> String {
        format!("{}-{n:06}.{}", self.prefix, self.domain)
    }
}

impl Config for SimConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, m: &str| Err(ConfigError::invalid(field, m).within("simulator"));
        if self.versions.is_empty() {
            return bad("versions", "must not be empty");
        }
        if self.alive_interval < Duration::from_secs(1) {
            return bad("alive_interval", "must be >= 1s");
        }
        chorus_schemas::subject::validate_token("component", &self.component)
            .map_err(|e| ConfigError::invalid("component", &e).with_source(e).within("simulator"))?;
        Ok(())
    }
}

/// One simulated node: kept small, the simulator holds tens of thousands.
pub struct SimNode {
    /// The node's identity, `<prefix>-<n>.<domain>` with `n` zero-padded to 6 digits.
    pub identity: Box<str>,
    version: u16,
    /// Numbers this node's events, lifecycle and RPC records alike (one sequence per node).
    pub emitter: Arc<Emitter>,
    /// Second within the alive interval at which this node sends its alive event.
    slot: u32,
    /// Its key and node credential, when the fleet has identities
    /// ([`Simulator::with_identities`]): its events and replies are signed.
    pub signing: Option<Identity>,
}

/// Figures of a burst of events.
#[derive(Clone, Debug)]
pub struct Burst {
    /// Events stored.
    pub events: usize,
    /// Wall time from the first store call until the last one returned.
    pub took: Duration,
}

impl Burst {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.took.as_secs_f64().max(1e-9)
    }
}

/// Many simulated nodes emitting lifecycle events into one sink.
pub struct Simulator {
    config: SimConfig,
    nodes: Vec<SimNode>,
    sink: Arc<dyn EventSink>,
}

impl Simulator {
    /// Validates `config` and builds the node table: versions handed out round-robin, alive slots
    /// random within the interval. Nothing is emitted yet.
    pub fn new(config: SimConfig, sink: Arc<dyn EventSink>) -> Result<Self, ProducerError> {
        config.validate()?;
        let interval = config.alive_interval.as_secs().max(1) as u32;
        let nodes = (0..config.nodes)
            .map(|n| SimNode {
                identity: config.identity(n).into_boxed_str(),
                version: (n % config.versions.len()) as u16,
                emitter: Arc::new(Emitter::new(sink.clone(), 1, config.site.clone())),
                slot: fastrand::u32(0..interval),
                signing: None,
            })
            .collect();
        Ok(Simulator { config, nodes, sink })
    }

    /// Gives every node its own Ed25519 key and a node credential from `issuer`, valid
    /// `validity`: every event it emits and every reply it sends is then signed, as a real
    /// agent with `security.key` signs.
    pub fn with_identities(mut self, issuer: &dyn Signer, validity: Duration) -> Result<Self, ProducerError> {
        let now = chrono::Utc::now().timestamp();
        for node in &mut self.nodes {
            let key = FileSigner::random(Algorithm::Ed25519);
            let spec = CredentialSpec::node(&*node.identity, key.public_key().clone(), validity);
            let credential = Credential::issue(issuer, &spec, now).map_err(ProducerError::Identity)?;
            let identity = Identity::new(Arc::new(key), credential).map_err(ProducerError::Identity)?;
            let sink: Arc<dyn EventSink> = Arc::new(SigningSink::new(self.sink.clone(), identity.clone()));
            node.emitter = Arc::new(Emitter::new(sink, 1, self.config.site.clone()));
            node.signing = Some(identity);
        }
        Ok(self)
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The simulated nodes; index `n` is the node with identity number `n`.
    pub fn nodes(&self) -> &[SimNode] {
        &self.nodes
    }

    /// The version simulated node `i` runs.
    pub fn version_of(&self, i: usize) -> &str {
        &self.config.versions[self.nodes[i].version as usize]
    }

    fn stamp(&self, i: usize, data: impl Into<Event>) -> Result<EventRecord, PlatformError> {
        let node = &self.nodes[i];
        let record = node.emitter.stamp(data);
        match &node.signing {
            None => Ok(record),
            Some(identity) => Ok(record.signed(&**identity.signer(), Some(identity.token()))?),
        }
    }

    /// Stores events of `indices` built by `make` as one flow: each event is made when the
    /// sink has room for it, so making and encoding overlap the broker's work instead of
    /// alternating with it (see [`EventSink::store_flow`]).
    async fn burst<F>(&self, indices: Vec<usize>, make: F) -> Result<Burst, PlatformError>
    where
        F: Fn(&Self, usize) -> Result<EventRecord, PlatformError> + Send + Sync,
    {
        let started = Instant::now();
        let events = indices.len();
        let (flow, failed) = until_failure(futures::stream::iter(indices), |i| make(self, i));
        let stored = self.sink.store_flow(Box::pin(flow)).await?;
        if let Some(e) = take_failure(&failed) {
            return Err(e);
        }
        if stored != events as u64 {
            return Err(PlatformError::Unavailable(format!("{stored} of {events} events stored")));
        }
        Ok(Burst { events, took: started.elapsed() })
    }

    /// Every node starts at once: one startup event each, as after a data-centre power cut.
    pub async fn startup_storm(&self) -> Result<Burst, PlatformError> {
        let c = &self.config;
        self.burst((0..self.nodes.len()).collect(), |s, i| {
            s.stamp(i, Startup::new(&*s.nodes[i].identity, &c.component, s.version_of(i)))
        })
        .await
    }

    /// Alive events of the nodes whose slot is `second` of the interval.
    pub async fn alive_slot(&self, second: u32) -> Result<Burst, PlatformError> {
        let c = &self.config;
        let interval = c.alive_interval.as_secs();
        let due: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].slot == second).collect();
        self.burst(due, |s, i| {
            s.stamp(i, Alive::new(&*s.nodes[i].identity, &c.component, s.version_of(i), Some(interval)))
        })
        .await
    }

    /// Every node sends its alive events on its slot until `shutdown`.
    pub async fn run_alive(&self, shutdown: Shutdown) {
        let interval = self.config.alive_interval.as_secs().max(1) as u32;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut second = 0u32;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.requested() => return,
            }
            if let Err(e) = self.alive_slot(second).await {
                tracing::warn!(error = %e, "simulated alive events not stored");
            }
            second = (second + 1) % interval;
        }
    }

    /// Every node shuts down.
    pub async fn shutdown_all(&self) -> Result<Burst, PlatformError> {
        let c = &self.config;
        self.burst((0..self.nodes.len()).collect(), |s, i| {
            s.stamp(i, chorus_schemas::lifecycle::Shutdown::new(&*s.nodes[i].identity, &c.component))
        })
        .await
    }

    /// Runs the fleet as a service under `shutdown`: alive events on every node's slot; at
    /// stop, every node's shutdown event.
    pub fn start(self: Arc<Self>, name: impl Into<Arc<str>>, shutdown: Shutdown) -> SimulatedFleet {
        let mut tasks = Tasks::new(name, shutdown);
        let fleet = self.clone();
        let stop = tasks.shutdown().clone();
        tasks.spawn("alive", async move {
            fleet.run_alive(stop).await;
            Ok::<_, PlatformError>(())
        });
        SimulatedFleet { simulator: self, tasks, stopped: false }
    }
}

/// A [`Simulator`] running as a service ([`Simulator::start`]).
pub struct SimulatedFleet {
    simulator: Arc<Simulator>,
    tasks: Tasks,
    stopped: bool,
}

impl SimulatedFleet {
    /// The simulator.
    pub fn simulator(&self) -> &Arc<Simulator> {
        &self.simulator
    }
}

#[async_trait]
impl Service for SimulatedFleet {
    fn name(&self) -> &str {
        self.tasks.service()
    }

    fn health(&self) -> Health {
        self.tasks.health().with("nodes", self.simulator.nodes.len())
    }

    fn failed(&self) -> bool {
        self.tasks.failed()
    }

    /// Stops the alive events, then every node sends its shutdown event.
    async fn stop(&mut self) -> Result<(), ServiceError> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        self.tasks.stop().await?;
        self.simulator
            .shutdown_all()
            .await
            .map(|_| ())
            .map_err(|e| ServiceError::new(self.tasks.service(), "shutdown events", e))
    }
}

impl Simulator {
    /// Hosts an RPC server for every simulated node on `transport`: one subscription per agent
    /// and one wildcard for directed requests serve all of them. Each node records its RPC
    /// requests and replies with its own sequence, like a real agent, and signs its replies
    /// when it has an identity. With `security`, callers are authenticated as a real agent
    /// with `security.issuers` does.
    pub async fn host_rpc(
        &self,
        transport: Arc<dyn Transport>,
        collective: &str,
        policy_dir: Option<std::path::PathBuf>,
        security: Option<Arc<RequestSecurity>>,
    ) -> Result<RpcServer, ProducerError> {
        self.host(transport, collective, policy_dir, security, Vec::new()).await
    }

    async fn host(
        &self,
        transport: Arc<dyn Transport>,
        collective: &str,
        policy_dir: Option<std::path::PathBuf>,
        security: Option<Arc<RequestSecurity>>,
        extra: Vec<Arc<dyn Agent>>,
    ) -> Result<RpcServer, ProducerError> {
        let mut agents: Vec<Arc<dyn Agent>> = vec![Arc::new(agents::RpcUtil)];
        agents.extend(extra);
        let options = ServerOptions { wildcard_directed: true, security, ..Default::default() };
        let server = RpcServer::new(transport, agents, policy_dir, options)?;
        for (i, node) in self.nodes.iter().enumerate() {
            let mut ctx = NodeContext::new(node.identity.to_string(), collective);
            ctx.version = self.version_of(i).to_string();
            ctx.facts.insert("simulated".into(), true.into());
            ctx.facts.insert("group".into(), format!("g{}", i % 10).into());
            // Varied enough for filters to select real subsets: country, OS, size, role.
            let role = ["web", "db", "cache"][i % 3];
            ctx.facts.insert("country".into(), ["uk", "us", "de", "fr"][i % 4].into());
            let family = ["debian", "redhat"][(i / 7) % 2];
            ctx.facts.insert("os".into(), serde_json::json!({ "family": family }));
            ctx.facts.insert("cpus".into(), [2, 4, 8, 16, 32][i % 5].into());
            ctx.facts.insert("role".into(), role.into());
            ctx.classes = vec!["base".into(), format!("role::{role}")];
            ctx.provision_mode = self.config.component == chorus_schemas::lifecycle::PROVISION_MODE_COMPONENT;
            server.add_node(ctx, node.emitter.clone(), node.signing.clone()).await?;
        }
        Ok(server)
    }
}

impl Simulator {
    /// Hosts every simulated node as [`Simulator::host_rpc`] does, with the node side of
    /// enrolment (`chorus_provision`) too, the nodes trusting `issuers`: for nodes in
    /// provisioning mode. The returned enrollee tells what each node was configured with.
    pub async fn host_enrolment(
        &self,
        transport: Arc<dyn Transport>,
        collective: &str,
        policy_dir: Option<std::path::PathBuf>,
        issuers: chorus_identity::Issuers,
    ) -> Result<(RpcServer, Arc<crate::enrolment::SimulatedEnrollee>), ProducerError> {
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.identity.to_string(), (n.emitter.clone(), self.version_of(i).to_string())))
            .collect();
        let enrollee = Arc::new(crate::enrolment::SimulatedEnrollee::new(issuers, nodes));
        let provision: Arc<dyn Agent> = Arc::new(agents::Provision::new(enrollee.clone()));
        let server = self.host(transport, collective, policy_dir, None, vec![provision]).await?;
        Ok((server, enrollee))
    }

    /// Publishes every simulated node's registration (their metadata, for inventory
    /// discovery) through `server`, which must host them; returns how many were published.
    pub async fn register(&self, server: &RpcServer, collective: &str) -> Result<usize, ProducerError> {
        let identities = self.nodes.iter().map(|n| n.identity.to_string());
        Ok(crate::registration::register_all(server, collective, identities).await?)
    }
}

/// Resident memory of this process in bytes (Linux), for memory-per-node figures.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
