//! What each node says it is: its latest registration (facts, classes, agents,
//! collectives), folded from `CHORUS_REGISTRATION`, and discovery over it.
//!
//! Registrations are applied by event time: an older one (an outbox forwarding a backlog)
//! never replaces a newer one. The record keeps when the node published it, so discovery
//! can say how old the metadata it selected on is.

use chorus_rpc::{CompiledFilter, NodeContext};
use chorus_schemas::{Event, EventRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::projection::{Txn, View, ViewError};

/// Name of the registration view (store tree, `chorus.deadletter.registration`).
pub const METADATA_VIEW: &str = "registration";

/// Key prefix of metadata records.
const PREFIX: &[u8] = b"m/";

pub(super) fn metadata_key(identity: &str) -> Vec<u8> {
    [PREFIX, identity.as_bytes()].concat()
}

/// A node's latest registration, as the inventory keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeMetadata {
    /// The node's identity.
    pub identity: String,
    /// Collectives it listens in.
    pub collectives: Vec<String>,
    /// Its facts.
    pub facts: Map<String, Value>,
    /// Its configuration-management classes.
    pub classes: Vec<String>,
    /// Its agents, by name, with their versions.
    pub agents: Vec<AgentVersion>,
    /// The software version it runs.
    pub version: String,
    /// Its autonomous agents.
    pub machines: Vec<String>,
    /// Whether it waits to be provisioned.
    pub provisioning_mode: bool,
    /// When it published this registration (the event's time).
    pub registered: DateTime<Utc>,
    /// Stream sequence of the registration.
    pub sequence: u64,
}

/// An agent a node runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentVersion {
    /// Agent name.
    pub name: String,
    /// Its version, as its description says.
    #[serde(default)]
    pub version: String,
}

impl NodeMetadata {
    /// Agent names, in registration order.
    pub fn agent_names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name.clone()).collect()
    }

    /// The node as a request's filter sees it, in `collective`.
    pub fn context(&self, collective: &str) -> NodeContext {
        let mut ctx = NodeContext::new(self.identity.clone(), collective);
        ctx.facts = self.facts.clone();
        ctx.classes = self.classes.clone();
        ctx.version = self.version.clone();
        ctx.machines = self.machines.clone();
        ctx.provision_mode = self.provisioning_mode;
        ctx
    }

    /// Whether `filter` selects this node in `collective`: the node's own check, so
    /// inventory discovery and the nodes agree on the same metadata.
    pub fn matches(&self, filter: &CompiledFilter, collective: &str) -> bool {
        self.collectives.iter().any(|c| c == collective)
            && filter.matches(&self.context(collective), &self.agent_names())
    }
}

/// The registration fold.
#[derive(Clone, Debug, Default)]
pub struct MetadataView;

impl View for MetadataView {
    fn name(&self) -> &str {
        METADATA_VIEW
    }

    fn apply(&mut self, sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        let Event::Registration(registration) = &record.data else {
            return Ok(());
        };
        let key = metadata_key(registration.identity());
        if let Some(stored) = txn.get_json::<NodeMetadata>(&key)? {
            if stored.registered > record.time {
                return Ok(());
            }
        }
        let content = &registration.content;
        let metadata = NodeMetadata {
            identity: registration.identity().to_owned(),
            collectives: content.collectives.clone(),
            facts: content.facts.clone(),
            classes: content.classes.clone(),
            agents: content
                .agents
                .iter()
                .map(|a| AgentVersion { name: a.name.clone(), version: a.version.clone() })
                .collect(),
            version: content.build_info.version.clone(),
            machines: content.machines.iter().map(|m| m.name.clone()).collect(),
            provisioning_mode: content.status.provisioning_mode,
            registered: record.time,
            sequence,
        };
        txn.insert_json(&key, &metadata)
    }
}
