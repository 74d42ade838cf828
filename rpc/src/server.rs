//! The node side of RPC: [`RpcServer`] receives requests, decides which hosted nodes they
//! concern, authorizes them with the Action Policy, runs the agent, records request and
//! reply as events, and answers.
//!
//! One server hosts any number of nodes. A real node agent hosts one; the load simulator
//! hosts tens of thousands on one connection. Subscriptions are per *server*, not per node:
//! one per agent broadcast subject and collective, and for directed requests either one
//! exact subject per node (the default, what a node's NATS permissions normally allow) or
//! a single `<collective>.node.>` wildcard ([`ServerOptions::wildcard_directed`]), with
//! dispatch by identity. A broadcast is therefore decoded, TTL-checked and filter-compiled
//! once, then evaluated per node; per-node state is just a [`NodeContext`], an emitter and
//! seven counters.
//!
//! Processing of one request on one node, after Choria's `server/processor.go`:
//!
//! 1. TTL: accepted only if `now - ttl < time < now + ttl`; otherwise ignored and counted.
//! 2. Discovery filter: a node it does not select ignores the request silently.
//!    With [`ServerOptions::security`], a request whose caller is not proven (see
//!    [`crate::security`]), or that this node already ran, is then recorded, audited and
//!    refused (`Aborted`, with the code and reason); nothing else runs.
//! 3. Unknown agent or action: `UnknownAction`, the policy is not consulted.
//! 4. Action Policy: denied requests get Choria's `Aborted` reply with the reason.
//! 5. The request is recorded as an `RpcRequest` event. If that fails the action is not
//!    run: an action nobody can audit is not performed.
//! 6. The agent runs; the reply is recorded as an `RpcReply` event and then sent, signed by
//!    the node's key when the node has one.
//!
//! Malformed messages (bad JSON, oversized, on the wrong subject) are logged and counted,
//! never fatal.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use chorus_runtime::{Health, Service, ServiceError};
use chorus_schemas::registration::{
    AgentMetadata, BuildInfo, InventoryContent, MachineSummary, NodeStatus, Registration,
};
use chorus_schemas::rpc::JsonObject;
use chorus_schemas::{RpcReply, RpcRequest, StatusCode};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::agents::{ActionContext, Agent};
use super::filter::CompiledFilter;
use super::policy::{ActionPolicy, PolicySettings, Prepared};
use super::security::{Caller, Refusal, RequestSecurity, REPLY_SUBJECT_NOT_BOUND};
use super::signed::{ReplyEnvelope, RequestEnvelope};
use super::transport::{
    broadcast_subject, node_subject, validate_subject, Subscription, Transport, TransportMessage, MAX_PAYLOAD,
};
use super::{NodeContext, RpcError};
use chorus_identity::{Identity, Role};
use chorus_platform::Emitter;
use chorus_schemas::{AuditAction, AuditRecord};

/// How long a node's start waits for a transport that is still connecting.
const CONNECTING_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Tuning of an [`RpcServer`]. The defaults suit a real node agent.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Receive directed requests through one `<collective>.node.>` subscription instead of
    /// one per node. Right for a simulator hosting many nodes; wrong for a real node on a
    /// shared bus, which would then see every node's directed traffic (and usually lacks
    /// the permission to).
    pub wildcard_directed: bool,
    /// Requests handled at once; further messages wait in the subscription.
    pub max_in_flight: usize,
    /// Hosted nodes one request is processed on at once.
    pub node_concurrency: usize,
    /// How the policy directory is read (provider, default policy, unconfigured files).
    pub policy: PolicySettings,
    /// When set, only requests whose caller is proven are run, each once per node (see
    /// [`crate::security`]). Refused requests on a node the request selects are recorded,
    /// audited, answered `Aborted`, unauthorized, with the reason (`request refused
    /// (<code>): ...`) in the reply's `policy`, and counted as denied. Without it caller ids
    /// are taken on trust: the fleet is only as safe as its broker accounts.
    pub security: Option<Arc<RequestSecurity>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            wildcard_directed: false,
            max_in_flight: 256,
            node_concurrency: 256,
            policy: PolicySettings::default(),
            security: None,
        }
    }
}

/// Live counters; [`StatsSnapshot`] is their public face.
#[derive(Debug, Default)]
pub(crate) struct RpcStats {
    total: AtomicU64,
    passed: AtomicU64,
    filtered: AtomicU64,
    denied: AtomicU64,
    ttl_expired: AtomicU64,
    replies: AtomicU64,
    malformed: AtomicU64,
}

impl RpcStats {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            total: get(&self.total),
            passed: get(&self.passed),
            filtered: get(&self.filtered),
            denied: get(&self.denied),
            ttl_expired: get(&self.ttl_expired),
            replies: get(&self.replies),
            malformed: get(&self.malformed),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// RPC counters of one node or a whole server, after Choria's `choria_server_*` metrics;
/// what `rpcutil daemon_stats` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests received (for a node: requests that reached it, whatever became of them).
    pub total: u64,
    /// Requests that passed TTL and discovery filter.
    pub passed: u64,
    /// Requests the discovery filter excluded (or whose filter was invalid).
    pub filtered: u64,
    /// Requests the Action Policy denied.
    pub denied: u64,
    /// Requests older (or further in the future) than their TTL.
    pub ttl_expired: u64,
    /// Replies sent.
    pub replies: u64,
    /// Messages that were not a valid request; counted per server, not per node, since
    /// such a message cannot be attributed.
    pub malformed: u64,
}

impl std::ops::AddAssign for StatsSnapshot {
    fn add_assign(&mut self, o: Self) {
        self.total += o.total;
        self.passed += o.passed;
        self.filtered += o.filtered;
        self.denied += o.denied;
        self.ttl_expired += o.ttl_expired;
        self.replies += o.replies;
        self.malformed += o.malformed;
    }
}

/// One hosted node.
pub(crate) struct HostedNode {
    pub(crate) ctx: NodeContext,
    pub(crate) emitter: Arc<Emitter>,
    /// Its key and credential: replies are signed with it.
    pub(crate) identity: Option<Identity>,
    /// Server-wide number, for the replay check.
    pub(crate) number: u64,
    /// Shared with the node's next context when [`RpcServer::update_node`] replaces it.
    pub(crate) stats: Arc<RpcStats>,
}

struct RegisteredAgent {
    agent: Arc<dyn Agent>,
    actions: HashSet<String>,
}

/// Where a request arrived, which decides the nodes it may concern.
enum Destination {
    Broadcast,
    Node(String),
}

/// One request as it reaches the hosted nodes: decoded, authenticated and its policy read
/// once for all of them.
struct Delivery {
    request: RpcRequest,
    /// The agents as they were when the request arrived.
    agents: Arc<AgentSet>,
    filter: CompiledFilter,
    reply_to: Option<String>,
    caller: Option<Result<Caller, Refusal>>,
    policy: Prepared,
    now: i64,
}

/// The agents a server's nodes have.
struct AgentSet {
    agents: HashMap<String, RegisteredAgent>,
    /// Sorted agent names, as reported by `rpcutil` and matched by agent filters.
    names: Vec<String>,
    /// The agents' DDL metadata, for `rpcutil agent_inventory` and registration.
    descriptions: std::collections::BTreeMap<String, crate::ddl::Metadata>,
}

impl AgentSet {
    fn new(agents: Vec<Arc<dyn Agent>>) -> Result<Self, RpcError> {
        let mut registered = HashMap::new();
        for agent in agents {
            let name = agent.name().to_string();
            validate_subject(&name, false).map_err(|e| RpcError::Invalid(format!("agent name: {e}")))?;
            if name.contains('.') {
                return Err(RpcError::Invalid(format!("agent name {name:?} contains a dot")));
            }
            let actions = agent.actions().into_iter().collect();
            if registered.insert(name.clone(), RegisteredAgent { agent, actions }).is_some() {
                return Err(RpcError::Invalid(format!("agent {name} registered twice")));
            }
        }
        let mut names: Vec<String> = registered.keys().cloned().collect();
        names.sort();
        let descriptions = registered
            .iter()
            .filter_map(|(name, r)| r.agent.ddl().map(|ddl| (name.clone(), ddl.metadata.clone())))
            .collect();
        Ok(AgentSet { agents: registered, names, descriptions })
    }
}

/// Hosted nodes a request reaches, above which their work is spread over the runtime's
/// worker threads (each node signs its records and reply: CPU work that one task would
/// otherwise do alone for a whole simulated fleet).
const SPREAD_ABOVE: usize = 64;

/// State shared by the server handle and its subscription tasks.
struct Core {
    transport: Arc<dyn Transport>,
    /// The agents; replaced whole by [`RpcServer::set_agents`], read once per request.
    agents: RwLock<Arc<AgentSet>>,
    /// Worker threads the hosted nodes' work is spread over (read once: on Linux it reads
    /// the cgroup's CPU limit from files).
    workers: usize,
    policy: ActionPolicy,
    /// collective → identity → node.
    nodes: RwLock<HashMap<String, HashMap<String, Arc<HostedNode>>>>,
    /// Server-wide counters not attributable to a node.
    stats: RpcStats,
    options: ServerOptions,
    in_flight: Arc<Semaphore>,
    started: i64,
}

/// An RPC server hosting one or many nodes. Dropping it stops its subscriptions; requests
/// already being processed finish.
pub struct RpcServer {
    core: Arc<Core>,
    /// Subscription listeners by subject.
    listeners: Mutex<HashMap<String, JoinHandle<()>>>,
    /// Serializes [`RpcServer::add_node`], which subscribes across awaits.
    adding: tokio::sync::Mutex<()>,
    /// Numbers handed to added nodes.
    numbers: AtomicU64,
}

impl RpcServer {
    /// Starts a server for the single node `ctx`, recording its events through `emitter`.
    /// `policy_dir` of `None` denies every request.
    pub async fn start(
        transport: Arc<dyn Transport>,
        ctx: NodeContext,
        agents: Vec<Arc<dyn Agent>>,
        policy_dir: Option<std::path::PathBuf>,
        emitter: Arc<Emitter>,
    ) -> Result<Self, RpcError> {
        let server = Self::new(transport, agents, policy_dir, ServerOptions::default())?;
        server.add_node(ctx, emitter, None).await?;
        Ok(server)
    }

    /// A server hosting no node yet; add them with [`RpcServer::add_node`]. Every hosted
    /// node has the same `agents` and Action Policy.
    pub fn new(
        transport: Arc<dyn Transport>,
        agents: Vec<Arc<dyn Agent>>,
        policy_dir: Option<std::path::PathBuf>,
        options: ServerOptions,
    ) -> Result<Self, RpcError> {
        let core = Core {
            transport,
            agents: RwLock::new(Arc::new(AgentSet::new(agents)?)),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            policy: ActionPolicy::new(policy_dir, options.policy.clone()),
            nodes: RwLock::new(HashMap::new()),
            stats: RpcStats::default(),
            in_flight: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
            options,
            started: chrono::Utc::now().timestamp(),
        };
        Ok(RpcServer {
            core: Arc::new(core),
            listeners: Mutex::new(HashMap::new()),
            adding: tokio::sync::Mutex::new(()),
            numbers: AtomicU64::new(0),
        })
    }

    /// Flushes new subscriptions, so publishers elsewhere reach them once this returns. A
    /// transport still connecting gets a moment; a broker that stays unreachable must not
    /// hold a node's start (it runs offline, its events go to its outbox, and a SIGTERM
    /// stops it): the subscriptions are sent first when the connection is made.
    async fn flush_subscriptions(&self) -> Result<(), RpcError> {
        if self.core.transport.connected() {
            return self.core.transport.flush().await;
        }
        if tokio::time::timeout(CONNECTING_GRACE, self.core.transport.flush()).await.is_err() {
            tracing::info!("broker unreachable: RPC requests reach the node once it connects");
        }
        Ok(())
    }

    /// Hosts another node, recording its events through `emitter` (normally one emitter
    /// per node, since each node numbers its own events) and signing its replies as
    /// `identity` (its key and node credential) when given. Returns once the node's
    /// subscriptions are in place, so a request published afterwards reaches it.
    pub async fn add_node(
        &self,
        ctx: NodeContext,
        emitter: Arc<Emitter>,
        identity: Option<Identity>,
    ) -> Result<(), RpcError> {
        if let Some(identity) = &identity {
            let credential = identity.credential();
            if credential.role() != Role::Node || credential.subject() != ctx.identity {
                return Err(RpcError::Invalid(format!(
                    "node {}: its credential is a {} credential for {:?}",
                    ctx.identity,
                    credential.role(),
                    credential.subject()
                )));
            }
            if !credential.allows_collective(&ctx.collective) {
                return Err(RpcError::Invalid(format!(
                    "node {}: its credential does not cover collective {}",
                    ctx.identity, ctx.collective
                )));
            }
        }
        let _adding = self.adding.lock().await;
        let directed = node_subject(&ctx.collective, &ctx.identity);
        validate_subject(&directed, false)?;
        if ctx.collective.contains('.') {
            return Err(RpcError::Invalid(format!("collective {:?} contains a dot", ctx.collective)));
        }
        if self.core.nodes_read().get(&ctx.collective).is_some_and(|c| c.contains_key(&ctx.identity)) {
            return Err(RpcError::DuplicateNode(ctx.identity));
        }

        let mut subjects: Vec<String> =
            self.core.agent_set().names.iter().map(|agent| broadcast_subject(&ctx.collective, agent)).collect();
        subjects.push(if self.core.options.wildcard_directed {
            format!("{}.node.>", ctx.collective)
        } else {
            directed
        });
        let mut added = false;
        for subject in subjects {
            if self.lock_listeners().contains_key(&subject) {
                continue;
            }
            let subscription = self.core.transport.subscribe(&subject).await?;
            let task = tokio::spawn(listen(Arc::clone(&self.core), subject.clone(), subscription));
            self.lock_listeners().insert(subject, task);
            added = true;
        }
        if added {
            self.flush_subscriptions().await?;
        }

        let number = self.numbers.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(HostedNode { ctx, emitter, identity, number, stats: Arc::default() });
        let mut nodes = self.core.nodes.write().unwrap_or_else(|e| e.into_inner());
        nodes.entry(node.ctx.collective.clone()).or_default().insert(node.ctx.identity.clone(), node);
        Ok(())
    }

    /// Stops hosting a node; returns whether it was hosted. Its per-node directed
    /// subscription (if any) ends; shared subscriptions stay.
    pub fn remove_node(&self, collective: &str, identity: &str) -> bool {
        let removed = {
            let mut nodes = self.core.nodes.write().unwrap_or_else(|e| e.into_inner());
            nodes.get_mut(collective).and_then(|c| c.remove(identity)).is_some()
        };
        if removed && !self.core.options.wildcard_directed {
            if let Some(task) = self.lock_listeners().remove(&node_subject(collective, identity)) {
                task.abort();
            }
        }
        removed
    }

    /// Number of nodes hosted.
    pub fn node_count(&self) -> usize {
        self.core.nodes_read().values().map(HashMap::len).sum()
    }

    /// Counters summed over every hosted node, plus the server's own `malformed`.
    pub fn stats(&self) -> StatsSnapshot {
        let mut sum = self.core.stats.snapshot();
        for node in self.core.nodes_read().values().flat_map(HashMap::values) {
            sum += node.stats.snapshot();
        }
        sum
    }

    /// One hosted node's counters (with the server's `malformed`).
    pub fn node_stats(&self, collective: &str, identity: &str) -> Option<StatsSnapshot> {
        let nodes = self.core.nodes_read();
        let node = nodes.get(collective)?.get(identity)?;
        Some(self.core.node_snapshot(node))
    }

    /// Names of the agents every hosted node has, sorted.
    pub fn agents(&self) -> Vec<String> {
        self.core.agent_set().names.clone()
    }

    /// Replaces the agents every hosted node has (external agents added, changed or removed
    /// while the node runs): requests that arrive afterwards see the new set. Broadcast
    /// subscriptions follow: new agents are subscribed in every hosted collective before
    /// the swap, those of removed agents end after it.
    pub async fn set_agents(&self, agents: Vec<Arc<dyn Agent>>) -> Result<(), RpcError> {
        let set = Arc::new(AgentSet::new(agents)?);
        let _adding = self.adding.lock().await;
        let collectives: Vec<String> = self.core.nodes_read().keys().cloned().collect();
        let wanted: HashSet<String> =
            collectives.iter().flat_map(|c| set.names.iter().map(move |agent| broadcast_subject(c, agent))).collect();
        let mut added = false;
        for subject in &wanted {
            if self.lock_listeners().contains_key(subject) {
                continue;
            }
            let subscription = self.core.transport.subscribe(subject).await?;
            let task = tokio::spawn(listen(Arc::clone(&self.core), subject.clone(), subscription));
            self.lock_listeners().insert(subject.clone(), task);
            added = true;
        }
        if added {
            self.flush_subscriptions().await?;
        }
        *self.core.agents.write().unwrap_or_else(|e| e.into_inner()) = set;
        let broadcast = |s: &str| s.split('.').nth(1) == Some("broadcast");
        self.lock_listeners().retain(|subject, task| {
            let keep = !broadcast(subject) || wanted.contains(subject);
            if !keep {
                task.abort();
            }
            keep
        });
        Ok(())
    }

    /// A hosted node's context, as requests see it now.
    pub fn node(&self, collective: &str, identity: &str) -> Option<NodeContext> {
        Some(self.hosted(collective, identity)?.ctx.clone())
    }

    /// Replaces a hosted node's context (new facts or classes, say): requests that arrive
    /// afterwards are filtered and judged against it. Its counters, emitter and key stay.
    pub fn update_node(&self, ctx: NodeContext) -> Result<(), RpcError> {
        let mut nodes = self.core.nodes.write().unwrap_or_else(|e| e.into_inner());
        let slot = nodes
            .get_mut(&ctx.collective)
            .and_then(|c| c.get_mut(&ctx.identity))
            .ok_or_else(|| RpcError::Invalid(format!("node {} is not hosted in {}", ctx.identity, ctx.collective)))?;
        let old = Arc::clone(slot);
        *slot = Arc::new(HostedNode {
            ctx,
            emitter: old.emitter.clone(),
            identity: old.identity.clone(),
            number: old.number,
            stats: old.stats.clone(),
        });
        Ok(())
    }

    /// What a hosted node is, in Choria's registration format: its facts, classes,
    /// collective, version and machines, the agents it runs with their descriptions'
    /// metadata, and its counters. `None` when the node is not hosted here.
    pub fn registration(&self, collective: &str, identity: &str) -> Option<InventoryContent> {
        self.hosted(collective, identity).map(|node| self.registration_of(&node))
    }

    fn hosted(&self, collective: &str, identity: &str) -> Option<Arc<HostedNode>> {
        Some(Arc::clone(self.core.nodes_read().get(collective)?.get(identity)?))
    }

    fn registration_of(&self, node: &HostedNode) -> InventoryContent {
        let set = self.core.agent_set();
        let agents = set
            .names
            .iter()
            .map(|name| match set.descriptions.get(name) {
                Some(m) => AgentMetadata {
                    name: name.clone(),
                    version: m.version.clone(),
                    license: m.license.clone(),
                    author: m.author.clone(),
                    timeout: m.timeout,
                    url: m.url.clone(),
                    description: m.description.clone(),
                    provider: m.provider.clone(),
                },
                None => AgentMetadata { name: name.clone(), ..Default::default() },
            })
            .collect();
        let ctx = &node.ctx;
        InventoryContent {
            agents,
            classes: ctx.classes.clone(),
            facts: ctx.facts.clone(),
            status: NodeStatus {
                identity: ctx.identity.clone(),
                uptime: (chrono::Utc::now().timestamp() - self.core.started).max(0) as u64,
                connected_server: String::new(),
                last_message: 0,
                provisioning_mode: ctx.provision_mode,
            },
            collectives: vec![ctx.collective.clone()],
            build_info: BuildInfo { version: ctx.version.clone(), sha: String::new() },
            machines: ctx.machines.iter().map(|m| MachineSummary { name: m.clone(), ..Default::default() }).collect(),
        }
    }

    /// Publishes a hosted node's [`registration`](Self::registration) through its own
    /// emitter (so it is signed and numbered like its other events). `Ok(None)` when the
    /// node is not hosted here.
    pub async fn register(
        &self,
        collective: &str,
        identity: &str,
    ) -> Result<Option<chorus_schemas::EventRecord>, chorus_platform::PlatformError> {
        let Some(node) = self.hosted(collective, identity) else {
            return Ok(None);
        };
        node.emitter.emit(Registration::new(self.registration_of(&node))).await.map(Some)
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a stopping server waits for requests it is processing.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

#[async_trait::async_trait]
impl Service for RpcServer {
    fn name(&self) -> &str {
        "rpc server"
    }

    /// Healthy while every subscription is read; a subscription that ended (its connection
    /// closed for good) leaves the nodes deaf to its requests.
    fn health(&self) -> Health {
        let ended: Vec<String> =
            self.lock_listeners().iter().filter(|(_, task)| task.is_finished()).map(|(s, _)| s.clone()).collect();
        let health = if ended.is_empty() {
            Health::ok()
        } else {
            Health::failing(format!("subscriptions ended: {}", ended.join(", ")))
        };
        health.with("nodes", self.node_count())
    }

    /// See [`RpcServer::close`].
    async fn stop(&mut self) -> Result<(), ServiceError> {
        self.close().await;
        Ok(())
    }
}

impl RpcServer {
    /// Stops reading requests, then waits (up to 10 s) for those being processed: their
    /// replies and records are sent. Takes `&self` so a server shared with its node's
    /// registration loop can be stopped.
    pub async fn close(&self) {
        for (_, task) in self.lock_listeners().drain() {
            task.abort();
        }
        let all = self.core.options.max_in_flight.max(1) as u32;
        if tokio::time::timeout(STOP_GRACE, self.core.in_flight.acquire_many(all)).await.is_err() {
            tracing::warn!("rpc server stopped with requests still being processed");
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        for (_, task) in self.lock_listeners().drain() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer").field("agents", &self.agents()).field("nodes", &self.node_count()).finish()
    }
}

/// Reads one subscription until it ends, handing each message to its own task (bounded by
/// [`ServerOptions::max_in_flight`]) so a slow action does not hold up other requests.
async fn listen(core: Arc<Core>, subject: String, mut subscription: Subscription) {
    while let Some(message) = subscription.next().await {
        let Ok(permit) = Arc::clone(&core.in_flight).acquire_owned().await else {
            return;
        };
        let core = Arc::clone(&core);
        tokio::spawn(async move {
            core.handle(message).await;
            drop(permit);
        });
    }
    tracing::debug!(%subject, "RPC subscription ended");
}

impl Core {
    fn agent_set(&self) -> Arc<AgentSet> {
        Arc::clone(&self.agents.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn nodes_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, HashMap<String, Arc<HostedNode>>>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn node_snapshot(&self, node: &HostedNode) -> StatsSnapshot {
        let mut s = node.stats.snapshot();
        s.malformed = self.stats.malformed.load(Ordering::Relaxed);
        s
    }

    fn malformed(&self, message: &TransportMessage, why: &str) {
        RpcStats::bump(&self.stats.malformed);
        // Decode errors quote the input; a hostile message must not flood the log.
        let mut end = why.len().min(200);
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        let ellipsis = if end < why.len() { "…" } else { "" };
        tracing::warn!(subject = %message.subject, "ignoring malformed RPC request: {}{ellipsis}", &why[..end]);
    }

    /// Handles one message on every hosted node it may concern.
    async fn handle(self: &Arc<Self>, message: TransportMessage) {
        if message.payload.len() > MAX_PAYLOAD {
            return self.malformed(&message, "larger than the maximum payload");
        }
        let envelope = match serde_json::from_slice::<RequestEnvelope>(&message.payload) {
            Ok(envelope) => envelope,
            Err(e) => return self.malformed(&message, &e.to_string()),
        };
        let now = chrono::Utc::now().timestamp();
        let caller = self
            .options
            .security
            .as_deref()
            .map(|security| security.authenticate(&envelope, message.reply.as_deref(), now));
        let request = envelope.request;
        let destination = if message.subject == broadcast_subject(&request.collective, &request.agent) {
            Destination::Broadcast
        } else if let Some(identity) = message.subject.strip_prefix(&format!("{}.node.", request.collective)) {
            Destination::Node(identity.to_string())
        } else {
            return self.malformed(
                &message,
                &format!(
                    "request for agent {} in collective {} on the wrong subject",
                    request.agent, request.collective
                ),
            );
        };
        let targets: Vec<Arc<HostedNode>> = {
            let nodes = self.nodes_read();
            let Some(collective) = nodes.get(&request.collective) else {
                return;
            };
            match &destination {
                Destination::Broadcast => collective.values().cloned().collect(),
                Destination::Node(identity) => collective.get(identity).cloned().into_iter().collect(),
            }
        };
        if targets.is_empty() {
            return;
        }

        let ttl = i64::try_from(request.ttl).unwrap_or(i64::MAX);
        if !(now.saturating_sub(ttl) < request.time && request.time < now.saturating_add(ttl)) {
            tracing::debug!(requestid = %request.requestid, time = request.time, ttl, "RPC request outside its TTL; ignored");
            for node in &targets {
                RpcStats::bump(&node.stats.total);
                RpcStats::bump(&node.stats.ttl_expired);
            }
            return;
        }

        let filter = match CompiledFilter::new(&request.filter) {
            Ok(filter) => filter,
            Err(e) => {
                tracing::warn!(requestid = %request.requestid, "RPC request with an invalid filter ignored: {e}");
                for node in &targets {
                    RpcStats::bump(&node.stats.total);
                    RpcStats::bump(&node.stats.filtered);
                }
                return;
            }
        };

        if let Some(Err(refusal)) = &caller {
            tracing::warn!(requestid = %request.requestid, callerid = %request.callerid, code = refusal.code, "refusing RPC request: {}", refusal.reason);
        }
        // The policy files are read once for every node this request reaches.
        let policy = self.policy.prepare(&request.agent);
        if !policy.problems().is_empty() {
            self.report_policy_problems(&targets[0], &request, &policy).await;
        }
        let agents = self.agent_set();
        let delivery = Arc::new(Delivery { request, agents, filter, reply_to: message.reply, caller, policy, now });
        let workers = self.workers;
        let concurrency = self.options.node_concurrency.max(1);
        if targets.len() <= SPREAD_ABOVE || workers == 1 {
            return self.process_all(targets, &delivery, concurrency).await;
        }
        let share = targets.len().div_ceil(workers);
        let mut targets = targets;
        let mut parts = Vec::with_capacity(workers);
        while !targets.is_empty() {
            let rest = targets.split_off(share.min(targets.len()));
            let part = std::mem::replace(&mut targets, rest);
            let (core, delivery) = (Arc::clone(self), Arc::clone(&delivery));
            let concurrency = concurrency.div_ceil(workers);
            parts.push(tokio::spawn(async move { core.process_all(part, &delivery, concurrency).await }));
        }
        for part in parts {
            if let Err(e) = part.await {
                tracing::error!(requestid = %delivery.request.requestid, error = %e, "RPC processing task failed");
            }
        }
    }

    async fn process_all(&self, targets: Vec<Arc<HostedNode>>, delivery: &Delivery, concurrency: usize) {
        futures::stream::iter(targets)
            .for_each_concurrent(concurrency, |node| async move { self.process(&node, delivery).await })
            .await;
    }

    /// Audits the policy lines that cannot be used, once per change of the file.
    async fn report_policy_problems(&self, node: &HostedNode, request: &RpcRequest, policy: &Prepared) {
        let site = node.emitter.site().unwrap_or("local");
        for problem in policy.problems() {
            let mut audit = AuditRecord::new(
                node.ctx.identity.clone(),
                site,
                request.callerid.clone(),
                AuditAction::Unknown,
                JsonObject::new(),
            );
            audit.reason = Some(problem.to_string());
            audit.code = Some("policy_line_unusable".into());
            if let Err(e) = node.emitter.emit(audit).await {
                tracing::error!(identity = %node.ctx.identity, error = %e, "cannot record a policy problem");
            }
        }
    }

    /// Steps 2 to 6 on one node.
    async fn process(&self, node: &HostedNode, delivery: &Delivery) {
        let Delivery { request, agents, filter, reply_to, caller, policy, now } = delivery;
        let (reply_to, caller, now) = (reply_to.as_deref(), caller.as_ref(), *now);
        let stats = &node.stats;
        RpcStats::bump(&stats.total);
        if !filter.matches(&node.ctx, &agents.names) {
            RpcStats::bump(&stats.filtered);
            return;
        }
        RpcStats::bump(&stats.passed);
        let identity = node.ctx.identity.as_str();

        // Caller not proven, or a request this node already ran: recorded, audited and
        // refused, the policy not consulted.
        if let (Some(caller), Some(security)) = (caller, self.options.security.as_deref()) {
            let refusal = match caller {
                Err(refusal) => Some(refusal.clone()),
                Ok(_) if !security.first(request, node.number, now) => Some(Refusal {
                    code: "replayed",
                    reason: format!("request {} was already run on this node", request.requestid),
                }),
                Ok(_) => None,
            };
            if let Some(refusal) = refusal {
                return self.refuse(node, request, refusal, reply_to).await;
            }
        }

        let registered = agents.agents.get(&request.agent).filter(|a| a.actions.contains(&request.action));
        let reply = match registered {
            None => {
                let mut reply = RpcReply::new(request, identity, StatusCode::UnknownAction, JsonObject::new());
                reply.statusmsg = if agents.agents.contains_key(&request.agent) {
                    format!("Unknown action {} for agent {}", request.action, request.agent)
                } else {
                    format!("Unknown agent {}", request.agent)
                };
                reply.authorized = false;
                reply.policy = Some("not evaluated: unknown agent or action".into());
                // Nothing runs, so a failure to record (already logged) changes nothing.
                self.record_request(node, request).await.ok();
                reply
            }
            Some(registered) => {
                let decision = policy.decide(request, &node.ctx, &agents.names);
                let recorded = self.record_request(node, request).await;
                if !decision.allowed {
                    RpcStats::bump(&stats.denied);
                    RpcReply::denied(request, identity, decision.reason)
                } else if let Err(e) = recorded {
                    let mut reply = RpcReply::new(request, identity, StatusCode::Aborted, JsonObject::new());
                    reply.statusmsg = format!("not run: the request could not be recorded: {e}");
                    reply.policy = Some(decision.reason);
                    reply
                } else if let Some(Err((code, message))) = registered
                    .agent
                    .ddl()
                    .and_then(|ddl| ddl.action(&request.action))
                    .map(|action| action.validate(&request.data))
                {
                    let mut reply = RpcReply::new(request, identity, code, JsonObject::new());
                    reply.statusmsg = message;
                    reply.policy = Some(decision.reason);
                    reply
                } else {
                    let ctx = ActionContext {
                        request,
                        node: &node.ctx,
                        agents: &agents.names,
                        descriptions: &agents.descriptions,
                        stats: self.node_snapshot(node),
                        started: self.started,
                    };
                    let outcome = registered.agent.handle(&request.action, &request.data, &ctx).await;
                    let mut reply = RpcReply::new(request, identity, outcome.status, outcome.data);
                    reply.statusmsg = outcome.message;
                    reply.policy = Some(decision.reason);
                    reply
                }
            }
        };
        self.answer(node, reply, reply_to).await;
    }

    /// Refuses a request whose caller is not proven: counted as denied, recorded, audited
    /// with the code and reason, and answered.
    async fn refuse(&self, node: &HostedNode, request: &RpcRequest, refusal: Refusal, reply_to: Option<&str>) {
        RpcStats::bump(&node.stats.denied);
        // Refused either way; a failure to record is logged by record_request.
        self.record_request(node, request).await.ok();
        let site = node.emitter.site().unwrap_or("local");
        let document = serde_json::to_value(request).ok().and_then(|v| v.as_object().cloned()).unwrap_or_default();
        let mut audit =
            AuditRecord::new(node.ctx.identity.clone(), site, request.callerid.clone(), AuditAction::Deny, document);
        audit.reason = Some(refusal.reason.clone());
        audit.code = Some(refusal.code.to_string());
        if let Err(e) = node.emitter.emit(audit).await {
            tracing::error!(identity = %node.ctx.identity, requestid = %request.requestid, error = %e, "cannot record the audit event of a refused request");
        }
        let reason = format!("request refused ({}): {}", refusal.code, refusal.reason);
        // A request asking for replies on another caller's subject gets none: the refusal
        // is recorded and audited, not sent where its sender could not read it anyway.
        let reply_to = reply_to.filter(|_| refusal.code != REPLY_SUBJECT_NOT_BOUND);
        self.answer(node, RpcReply::denied(request, &node.ctx.identity, reason), reply_to).await;
    }

    /// Records the request on the node's event stream.
    async fn record_request(&self, node: &HostedNode, request: &RpcRequest) -> Result<(), String> {
        node.emitter.record(request.clone()).await.map_err(|e| {
            tracing::error!(identity = %node.ctx.identity, requestid = %request.requestid, error = %e, "cannot record RPC request");
            e.to_string()
        })
    }

    /// Records the reply, then sends it (if the caller asked for replies), signed by the
    /// node's key when it has one.
    async fn answer(&self, node: &HostedNode, mut reply: RpcReply, reply_to: Option<&str>) {
        let mut payload = match encode_reply(node, &reply) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(identity = %node.ctx.identity, error = %e, "cannot sign or encode RPC reply");
                return;
            }
        };
        if payload.len() > MAX_PAYLOAD {
            reply.statuscode = StatusCode::UnknownError;
            reply.statusmsg = format!("reply of {} bytes exceeds the maximum payload", payload.len());
            reply.data = JsonObject::new();
            payload = encode_reply(node, &reply).unwrap_or_default();
        }
        // Encoded above, so the record takes the reply itself.
        let requestid = reply.requestid.clone();
        if let Err(e) = node.emitter.record(reply).await {
            tracing::error!(identity = %node.ctx.identity, %requestid, error = %e, "cannot record RPC reply");
        }
        let Some(reply_to) = reply_to else { return };
        match self.transport.publish(reply_to, None, Bytes::from(payload)).await {
            Ok(()) => RpcStats::bump(&node.stats.replies),
            Err(e) => {
                tracing::warn!(identity = %node.ctx.identity, error = %e, "cannot send RPC reply")
            }
        }
    }
}

/// The reply as sent: signed with its node credential when the node has a key, else bare.
fn encode_reply(node: &HostedNode, reply: &RpcReply) -> Result<Vec<u8>, String> {
    match &node.identity {
        Some(identity) => {
            let envelope = ReplyEnvelope::signed(reply.clone(), identity).map_err(|e| e.to_string())?;
            serde_json::to_vec(&envelope).map_err(|e| e.to_string())
        }
        None => serde_json::to_vec(reply).map_err(|e| e.to_string()),
    }
}
