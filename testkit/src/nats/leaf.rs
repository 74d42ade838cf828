//! Sites joined to a hub by leafnode connections, each with its own JetStream domain: the
//! multi-site shape Choria deployments use, and what native JetStream mirrors need to reach
//! a stream on another server.

use super::{free_port, NatsServer};
use crate::Result;

/// A hub server and site servers that connect to it as leafnodes.
///
/// The hub runs JetStream in domain `hub`, site `i` in domain `site<i>` (or the names given),
/// so `$JS.<domain>.API` reaches each site's streams from the hub and back. Subject interest
/// crosses the leafnode in the global account, so streams on the two sides must not capture
/// the same subjects unless that is wanted.
#[derive(Debug)]
pub struct LeafnodeSites {
    /// The hub server (JetStream domain `hub`), accepting leafnodes on `leaf_port`.
    pub hub: NatsServer,
    /// The site servers, in the order of their names.
    pub sites: Vec<NatsServer>,
    /// Loopback port on which the hub accepts leafnode connections.
    pub leaf_port: u16,
}

impl LeafnodeSites {
    /// Starts a hub and `sites` leafnode sites (domains `site0`, `site1`, ...).
    pub fn start(sites: usize) -> Result<Self> {
        let names: Vec<String> = (0..sites).map(|i| format!("site{i}")).collect();
        Self::start_named(&names, &[])
    }

    /// Starts a hub and one leafnode site per name; each name is also its JetStream domain.
    /// Subjects in `isolated` do not cross the leafnodes (`deny_imports`/`deny_exports`), so
    /// every site can keep its own stream on them: only the JetStream API and what is not
    /// isolated flows between sites, as in a deployment where a replicator federates events.
    pub fn start_named(names: &[String], isolated: &[&str]) -> Result<Self> {
        let deny = serde_json::to_string(isolated).expect("strings serialize");
        let leaf_port = free_port()
            .map_err(|source| crate::HarnessError::Io { context: "picking a leafnode port".into(), source })?;
        let hub = NatsServer::builder()
            .server_name("hub")
            .jetstream_extra("domain: hub")
            .extra_config(&format!("leafnodes {{\n  listen: \"127.0.0.1:{leaf_port}\"\n}}\n"))
            .start()?;
        let mut sites = Vec::with_capacity(names.len());
        for name in names {
            sites.push(
                NatsServer::builder()
                    .server_name(name.clone())
                    .jetstream_extra(&format!("domain: {name}"))
                    .extra_config(&format!(
                        "leafnodes {{\n  remotes: [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\", deny_imports: {deny}, deny_exports: {deny} }} ]\n}}\n"
                    ))
                    .start()?,
            );
        }
        Ok(LeafnodeSites { hub, sites, leaf_port })
    }

    /// Waits until the hub reports every site's leafnode connection.
    pub fn wait_connected(&self, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let leafz = self.hub.monitor_json("/leafz")?;
            let n = leafz.get("leafnodes").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
            if n >= self.sites.len() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(crate::HarnessError::NotReady {
                    server: self.hub.server_name().to_string(),
                    waited: timeout,
                    problem: format!("hub sees {n} of {} leafnode connections", self.sites.len()),
                    log_tail: String::new(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
