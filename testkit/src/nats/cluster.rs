//! An n-node JetStream cluster on loopback: [`NatsCluster`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{self, PORT_ATTEMPTS};
use super::server::{append_line_block, Membership, NatsServer, Ports, Settings};
use crate::error::{HarnessError, Result};

/// How long a cluster start or [`NatsCluster::wait_ready`] waits by default. A meta leader
/// election takes a few seconds (Raft election timeouts), more on a loaded 2-core CI box.
pub const DEFAULT_CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);

const POLL_INTERVAL: Duration = Duration::from_millis(100);
const ERROR_LOG_LINES: usize = 15;

/// Configures a [`NatsCluster`]. Obtain one with [`NatsCluster::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .start() is called"]
pub struct NatsClusterBuilder {
    nodes: usize,
    cluster_name: String,
    extra_config: String,
    jetstream_extra: String,
    ready_timeout: Duration,
    binary: Option<PathBuf>,
}

impl NatsClusterBuilder {
    /// The cluster name (default `chorus`); nodes are named `<cluster>-0` .. `<cluster>-(n-1)`.
    pub fn cluster_name(mut self, name: impl Into<String>) -> Self {
        self.cluster_name = name.into();
        self
    }

    /// Config text appended to every node's config; see
    /// [`NatsServerBuilder::extra_config`](super::NatsServerBuilder::extra_config).
    pub fn extra_config(mut self, text: &str) -> Self {
        append_line_block(&mut self.extra_config, text);
        self
    }

    /// Config text inside every node's `jetstream { }` block.
    pub fn jetstream_extra(mut self, text: &str) -> Self {
        append_line_block(&mut self.jetstream_extra, text);
        self
    }

    /// How long start, [`NatsCluster::wait_ready`] and node restarts wait (default 60 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The `nats-server` binary to run instead of [`super::nats_server_binary`]'s choice.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Starts all nodes, routed to each other, and waits until every node is healthy and
    /// all agree on a JetStream meta leader. A port conflict on any node restarts the
    /// whole cluster on fresh ports (every node's routes name every other node's port).
    pub fn start(self) -> Result<NatsCluster> {
        if self.nodes < 2 {
            return Err(HarnessError::Invalid(format!(
                "a JetStream cluster needs at least 2 nodes, not {} (nats-server refuses \
                 clustered JetStream without routes); use NatsServer for one server",
                self.nodes
            )));
        }
        let binary = match &self.binary {
            Some(binary) => binary.clone(),
            None => super::nats_server_binary()?,
        };
        let mut last_conflict = None;
        for attempt in 1..=PORT_ATTEMPTS {
            match self.try_start(&binary) {
                Ok(cluster) => return Ok(cluster),
                Err(err) if err.is_port_conflict() => {
                    tracing::debug!(attempt, %err, "cluster port conflict; new ports");
                    last_conflict = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_conflict.expect("PORT_ATTEMPTS is at least 1"))
    }

    fn try_start(&self, binary: &Path) -> Result<NatsCluster> {
        let n = self.nodes;
        let ports = process::free_ports(3 * n).map_err(|e| HarnessError::io("allocating free loopback ports", e))?;
        let node_ports: Vec<Ports> =
            ports.chunks(3).map(|p| Ports { client: p[0], monitor: p[1], cluster: Some(p[2]) }).collect();
        let mut nodes = Vec::with_capacity(n);
        for (index, own) in node_ports.iter().enumerate() {
            let settings = Settings {
                server_name: format!("{}-{index}", self.cluster_name),
                jetstream: true,
                jetstream_extra: self.jetstream_extra.clone(),
                extra_config: self.extra_config.clone(),
                base_config: String::new(),
                ready_timeout: self.ready_timeout,
                membership: Some(Membership {
                    cluster_name: self.cluster_name.clone(),
                    route_ports: node_ports
                        .iter()
                        .filter(|other| *other != own)
                        .filter_map(|other| other.cluster)
                        .collect(),
                }),
            };
            let mut node = NatsServer::prepare(settings, binary.to_path_buf(), *own)?;
            node.spawn()?;
            nodes.push(node);
        }
        let cluster = NatsCluster { name: self.cluster_name.clone(), nodes, ready_timeout: self.ready_timeout };
        let deadline = Instant::now() + self.ready_timeout;
        for node in &cluster.nodes {
            node.wait_until_ready(deadline)?;
        }
        cluster.wait_ready_until(deadline)?;
        Ok(cluster)
    }
}

/// An n-node JetStream cluster of [`NatsServer`]s on loopback.
///
/// Every node has its own ports, store directory and log, is named `<cluster>-<index>`,
/// and has routes to all the others. Nodes can be killed and restarted by index to test
/// failover and recovery; [`wait_ready`](NatsCluster::wait_ready) waits until the
/// nodes that are up agree on a meta leader among themselves again. Dropping the cluster
/// kills every node.
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    nodes: Vec<NatsServer>,
    ready_timeout: Duration,
}

/// Why a readiness check did not pass.
enum NotYet {
    /// Keep polling.
    Pending(String),
    /// Polling cannot help (a node crashed, or every node is down).
    Fatal(HarnessError),
}

impl NatsCluster {
    /// Starts an `n`-node cluster with default settings (`n >= 2`); see
    /// [`NatsCluster::builder`].
    pub fn start(n: usize) -> Result<Self> {
        Self::builder(n).start()
    }

    /// A builder for an `n`-node cluster.
    pub fn builder(n: usize) -> NatsClusterBuilder {
        NatsClusterBuilder {
            nodes: n,
            cluster_name: "chorus".into(),
            extra_config: String::new(),
            jetstream_extra: String::new(),
            ready_timeout: DEFAULT_CLUSTER_READY_TIMEOUT,
            binary: None,
        }
    }

    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of nodes, up or down.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least two nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's client URL, including nodes that are down (clients skip those).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// [`urls`](NatsCluster::urls) joined with commas, the form NATS clients accept as one
    /// server address.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Node `index`.
    ///
    /// # Panics
    /// If `index >= self.len()`, like slice indexing.
    pub fn node(&self, index: usize) -> &NatsServer {
        &self.nodes[index]
    }

    /// All nodes, in index order.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// SIGKILLs node `index` (a crash). Does not wait for the others to re-elect; call
    /// [`wait_ready`](NatsCluster::wait_ready) for that.
    pub fn kill_node(&mut self, index: usize) -> Result<()> {
        self.node_mut(index)?.kill()
    }

    /// Stops node `index` gracefully (SIGTERM).
    pub fn stop_node(&mut self, index: usize) -> Result<()> {
        self.node_mut(index)?.stop()
    }

    /// Restarts node `index` on its ports with its store, then waits until the cluster is
    /// ready again (the node is healthy and agrees with the others on the meta leader).
    pub fn restart_node(&mut self, index: usize) -> Result<()> {
        self.node_mut(index)?.restart()?;
        self.wait_ready()
    }

    /// Waits until every node that is up is healthy and they all name the same JetStream
    /// meta leader, which is itself up. Nodes deliberately killed or stopped are skipped;
    /// a node that died on its own fails the wait at once, with its log, and so does a
    /// cluster with fewer than a majority of nodes up (no leader can be elected). Fails with
    /// [`HarnessError::ClusterNotReady`] when the nodes do not agree in time.
    pub fn wait_ready(&self) -> Result<()> {
        self.wait_ready_until(Instant::now() + self.ready_timeout)
    }

    /// The name of the current meta leader, if the nodes that are up agree on one now
    /// (one check, no waiting).
    pub fn meta_leader(&self) -> Result<String> {
        self.check().map_err(|not_yet| match not_yet {
            NotYet::Fatal(err) => err,
            NotYet::Pending(problem) => {
                HarnessError::ClusterNotReady { waited: Duration::ZERO, problem, log_tails: String::new() }
            }
        })
    }

    /// The index of the node named `server_name`.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.server_name() == server_name)
    }

    fn node_mut(&mut self, index: usize) -> Result<&mut NatsServer> {
        let len = self.nodes.len();
        self.nodes.get_mut(index).ok_or(HarnessError::NoSuchNode { index, len })
    }

    fn wait_ready_until(&self, deadline: Instant) -> Result<()> {
        let started = Instant::now();
        loop {
            let problem = match self.check() {
                Ok(leader) => {
                    tracing::debug!(cluster = %self.name, %leader, "NATS cluster ready");
                    return Ok(());
                }
                Err(NotYet::Fatal(err)) => return Err(err),
                Err(NotYet::Pending(problem)) => problem,
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::ClusterNotReady {
                    waited: started.elapsed(),
                    problem,
                    log_tails: self.log_tails(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// One readiness check; the agreed meta leader on success.
    fn check(&self) -> std::result::Result<String, NotYet> {
        let mut up = Vec::new();
        for node in &self.nodes {
            if let Some(status) = node.exit_status() {
                return Err(NotYet::Fatal(node.exited_error(status)));
            }
            if node.has_process() {
                up.push(node);
            }
        }
        let quorum = self.nodes.len() / 2 + 1;
        if up.len() < quorum {
            // Raft cannot elect anyone; a lone former leader may even keep claiming the
            // role for a while. Waiting cannot help until nodes are restarted.
            return Err(NotYet::Fatal(HarnessError::ClusterNotReady {
                waited: Duration::ZERO,
                problem: format!(
                    "only {} of {} nodes of cluster {} are up; a JetStream meta leader \
                     needs a majority of {quorum}",
                    up.len(),
                    self.nodes.len(),
                    self.name
                ),
                log_tails: self.log_tails(),
            }));
        }
        let mut agreed: Option<String> = None;
        for node in &up {
            let name = node.server_name();
            node.probe().map_err(|problem| NotYet::Pending(format!("{name}: {problem}")))?;
            let jsz = node.monitor_json("/jsz").map_err(|err| NotYet::Pending(format!("{name}: {err}")))?;
            let leader = jsz["meta_cluster"]["leader"]
                .as_str()
                .filter(|leader| !leader.is_empty())
                .ok_or_else(|| NotYet::Pending(format!("{name} sees no JetStream meta leader yet")))?;
            if !up.iter().any(|candidate| candidate.server_name() == leader) {
                return Err(NotYet::Pending(format!("{name} still follows meta leader {leader}, which is down")));
            }
            match &agreed {
                None => agreed = Some(leader.to_string()),
                Some(first) if first != leader => {
                    return Err(NotYet::Pending(format!(
                        "nodes disagree on the meta leader ({first} vs {leader} at {name})"
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(agreed.expect("at least one node is up"))
    }

    fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "--- {} (running: {}) log tail:\n{}",
                    node.server_name(),
                    node.is_running(),
                    node.run_log_tail(ERROR_LOG_LINES)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(node: &NatsServer) -> serde_json::Value {
        node.monitor_json("/jsz").unwrap()["meta_cluster"].clone()
    }

    #[test]
    fn three_node_cluster_survives_losing_a_node() {
        let mut cluster = NatsCluster::start(3).unwrap();
        assert_eq!(cluster.len(), 3);
        let urls = cluster.urls();
        assert_eq!(urls.len(), 3);
        assert_eq!(cluster.url_list(), urls.join(","));
        for (i, node) in cluster.nodes().iter().enumerate() {
            assert_eq!(node.server_name(), format!("chorus-{i}"));
            let meta = meta(node);
            assert_eq!(meta["name"], "chorus");
            assert_eq!(meta["cluster_size"], 3, "{meta}");
            let routez = node.monitor_json("/routez").unwrap();
            assert_eq!(routez["num_routes"], 2, "{routez}");
        }
        let dirs: std::collections::HashSet<_> = cluster.nodes().iter().map(|n| n.store_dir()).collect();
        assert_eq!(dirs.len(), 3, "each node has its own store");

        // Kill the meta leader: the hardest node to lose.
        let leader = cluster.meta_leader().unwrap();
        let victim = cluster.index_of(&leader).unwrap();
        cluster.kill_node(victim).unwrap();
        assert!(!cluster.node(victim).is_running());
        cluster.wait_ready().unwrap();
        let new_leader = cluster.meta_leader().unwrap();
        assert_ne!(new_leader, leader);
        for (i, node) in cluster.nodes().iter().enumerate() {
            if i != victim {
                assert_eq!(meta(node)["leader"], new_leader.as_str());
                assert!(node.monitor_get("/healthz?js-enabled-only=true").is_ok());
            }
        }

        // The node comes back on its ports, rejoins, and follows the new leader.
        let port = cluster.node(victim).port();
        cluster.restart_node(victim).unwrap();
        assert!(cluster.node(victim).is_running());
        assert_eq!(cluster.node(victim).port(), port);
        assert_eq!(meta(cluster.node(victim))["leader"], new_leader.as_str());
        let routez = cluster.node(victim).monitor_json("/routez").unwrap();
        assert_eq!(routez["num_routes"], 2, "{routez}");
    }

    #[test]
    fn one_node_is_not_a_cluster() {
        let err = NatsCluster::start(1).unwrap_err();
        assert!(matches!(err, HarnessError::Invalid(_)), "{err}");
    }

    #[test]
    fn losing_the_majority_is_reported_at_once() {
        let mut cluster = NatsCluster::builder(3).cluster_name("minority").start().unwrap();
        assert!(matches!(cluster.kill_node(7), Err(HarnessError::NoSuchNode { index: 7, len: 3 })));
        cluster.kill_node(0).unwrap();
        cluster.stop_node(1).unwrap();
        let started = Instant::now();
        let err = cluster.wait_ready().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let HarnessError::ClusterNotReady { problem, log_tails, .. } = &err else {
            panic!("unexpected error {err}");
        };
        assert!(problem.contains("only 1 of 3"), "{err}");
        assert!(log_tails.contains("minority-2"), "{err}");

        // Bringing one node back restores the quorum.
        cluster.restart_node(0).unwrap();
        let leader = cluster.meta_leader().unwrap();
        assert_ne!(cluster.index_of(&leader), Some(1));
    }
}
