//! What a node agent shows outside: its health (`/healthz`, and the agent's own
//! [`Service::health`](chorus_runtime::Service::health)) and its metrics (`/metrics` with
//! `chorus agent --listen`), from one cloneable view of the running agent.
//!
//! Metrics follow Choria's server metrics where Choria has one (`choria_server_*` request
//! counters become `chorus_agent_rpc_*`); every metric is registered from the start, at zero
//! until something happens, so dashboards and alerts see a series rather than a gap.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chorus_platform::Outbox;
use chorus_rpc::RpcServer;
use chorus_runtime::{BoxError, Health, Observable, TaskMonitor};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::machine::MachineRemote;
use crate::registration::RegistrationStatus;

/// A running agent seen from outside; cheap to clone, shared with the ops server.
#[derive(Clone)]
pub struct AgentMonitor {
    pub(super) tasks: TaskMonitor,
    pub(super) delivery: TaskMonitor,
    pub(super) outbox: Outbox,
    pub(super) machines: Vec<MachineRemote>,
    pub(super) rpc: Option<Arc<RpcServer>>,
    pub(super) registration: Option<Arc<RegistrationStatus>>,
    /// Why callers are not authenticated, when they are not.
    pub(super) insecure: Option<String>,
    /// External agents left out, and why (kept current by the reload loop).
    pub(super) skipped_agents: Arc<Mutex<Vec<String>>>,
    /// When the node credential expires (Unix seconds), and from when health warns about it:
    /// after expiry peers refuse the node's replies and events.
    pub(super) credential_expires: Option<(i64, i64)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MachineLabels {
    machine: String,
    version: String,
    state: String,
}

impl AgentMonitor {
    /// Healthy while every task runs, the outbox stores and forwards, registration publishes
    /// and the node credential is not about to expire.
    pub fn health(&self) -> Health {
        let health = self
            .tasks
            .health()
            .and(self.delivery.health())
            .and(self.outbox.health())
            .with("machines", self.machines.len());
        let health = match &self.insecure {
            Some(warning) => health.with("security", format!("INSECURE: {warning}")),
            None => health.with("security", "callers authenticated"),
        };
        let health = match &self.registration {
            None => health,
            Some(r) => match r.problem() {
                None => health.with("registrations", r.published()),
                Some(p) => {
                    health.with("registrations", r.published()).and(Health::failing(format!("registration: {p}")))
                }
            },
        };
        let skipped = self.skipped_agents.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let health = if skipped.is_empty() { health } else { health.with("external_agents_left_out", &skipped) };
        let Some((expires, warn_from)) = self.credential_expires else { return health };
        let now = chrono::Utc::now().timestamp();
        let health = health.with("credential_expires", expires);
        if now >= expires {
            health.and(Health::failing("the node credential has expired: peers refuse its replies and events"))
        } else if now >= warn_from {
            health.and(Health::failing(format!("the node credential expires in {}s: renew it", expires - now)))
        } else {
            health
        }
    }

    /// Registers the agent's metrics, as they are now, under `chorus_agent_`, and its
    /// outbox's under `chorus_outbox_`.
    pub fn register(&self, registry: &mut Registry) {
        self.outbox.register(registry);
        let registry = registry.sub_registry_with_prefix("chorus_agent");
        let rpc = self.rpc.as_ref().map(|r| r.stats()).unwrap_or_default();
        let registrations = self.registration.as_ref().map_or(0, |r| r.published());
        chorus_runtime::register_counters(
            registry,
            &[
                ("rpc_requests", "RPC requests received", rpc.total),
                ("rpc_passed", "RPC requests that passed TTL and the discovery filter", rpc.passed),
                ("rpc_filtered", "RPC requests the discovery filter excluded", rpc.filtered),
                ("rpc_denied", "RPC requests the Action Policy denied", rpc.denied),
                ("rpc_ttl_expired", "RPC requests older (or further ahead) than their TTL", rpc.ttl_expired),
                ("rpc_replies", "RPC replies sent", rpc.replies),
                ("rpc_malformed", "Messages on the RPC subjects that were not a valid request", rpc.malformed),
                ("registrations", "Registration payloads published", registrations),
            ],
        );
        let skipped = self.skipped_agents.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        chorus_runtime::register_gauges(
            registry,
            &[
                ("machines", "Autonomous agents running", self.machines.len() as u64),
                ("external_agents_left_out", "External agents not loaded (see /healthz for why)", skipped),
                ("healthy", "1 while the agent is healthy, else 0", u64::from(self.health().healthy)),
            ],
        );
        let states = Family::<MachineLabels, Gauge>::default();
        for m in &self.machines {
            let i = m.instance();
            states
                .get_or_create(&MachineLabels {
                    machine: i.machine.clone(),
                    version: i.version.clone(),
                    state: m.state(),
                })
                .set(1);
        }
        registry.register("machine_state", "1 for each autonomous agent's current state", states);
    }
}

#[async_trait]
impl Observable for AgentMonitor {
    fn name(&self) -> &str {
        self.tasks.service()
    }

    fn health(&self) -> Health {
        AgentMonitor::health(self)
    }

    async fn collect(&self, registry: &mut Registry) -> Result<(), BoxError> {
        self.register(registry);
        Ok(())
    }
}
