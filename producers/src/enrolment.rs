//! Nodes' side of enrolment ([`chorus_rpc::agents::provision`]) for simulated nodes: keys,
//! trust and what configuration did, kept in memory, so a provisioner can be tried against
//! thousands of nodes in one process.

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
