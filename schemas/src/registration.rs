//! Node registration: what a node is (facts, classes, agents, collectives, version,
//! autonomous agents), published at start, on change and on an interval, in Choria's
//! `choria:registration:inventorycontent:1` format (go-choria
//! `providers/registration/inventory_content.go`), so Choria's registration consumers and
//! adapters read Chorus nodes and Chorus reads Choria's.
//!
//! Choria compresses the content by default (`zcontent`: base64 of gzip); Chorus publishes it
//! plain (`content`) inside a CloudEvent and accepts either on decode.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rpc::JsonObject;

/// CloudEvents `source` of registration events.
pub const SOURCE: &str = "io.choria.registration";

/// One node's metadata, as its registration publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Registration {
    /// Protocol identifier, `choria:registration:inventorycontent:1`; equal to the
    /// CloudEvents `type`.
    pub protocol: String,
    /// What the node is.
    pub content: InventoryContent,
    /// When the node published it, Unix seconds (UTC). Not in Choria, whose message carries
    /// its time outside the document; 0 when absent.
    #[serde(default)]
    pub timestamp: i64,
}

/// Choria's `InventoryData`: the fields its registration consumers read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct InventoryContent {
    /// The agents the node runs, with their descriptions' metadata.
    #[serde(default)]
    pub agents: Vec<AgentMetadata>,
    /// Configuration-management classes.
    #[serde(default)]
    pub classes: Vec<String>,
    /// The node's facts.
    #[serde(default)]
    pub facts: JsonObject,
    /// Who the node is and how it is doing.
    pub status: NodeStatus,
    /// Collectives the node listens in.
    #[serde(default)]
    pub collectives: Vec<String>,
    /// The software the node runs.
    #[serde(default)]
    pub build_info: BuildInfo,
    /// Autonomous agents (machines) the node runs.
    #[serde(default)]
    pub machines: Vec<MachineSummary>,
}

/// An agent's metadata, as its description (DDL) declares it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct AgentMetadata {
    /// Agent name.
    pub name: String,
    /// Agent version.
    #[serde(default)]
    pub version: String,
    /// Licence.
    #[serde(default)]
    pub license: String,
    /// Author.
    #[serde(default)]
    pub author: String,
    /// Seconds an action may run.
    #[serde(default)]
    pub timeout: u64,
    /// Where to read about it.
    #[serde(default)]
    pub url: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// How it runs (`golang`, `external`, ...), when not built in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// Choria's registration `status`: the node's identity and its counters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct NodeStatus {
    /// The node's identity; the event's node and the last tokens of its subject.
    #[schemars(length(min = 1))]
    pub identity: String,
    /// Seconds since the node started.
    #[serde(default)]
    pub uptime: u64,
    /// The broker the node is connected to, when known.
    #[serde(default)]
    pub connected_server: String,
    /// Unix time of the last message the node handled.
    #[serde(default)]
    pub last_message: i64,
    /// Whether the node waits to be provisioned.
    #[serde(default)]
    pub provisioning_mode: bool,
}

/// Choria's `build_info`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct BuildInfo {
    /// Version of the software.
    #[serde(default)]
    pub version: String,
    /// Commit it was built from, when known.
    #[serde(default)]
    pub sha: String,
}

/// One autonomous agent in a registration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct MachineSummary {
    /// Machine name.
    pub name: String,
    /// Machine version.
    #[serde(default)]
    pub version: String,
    /// Its current state.
    #[serde(default)]
    pub state: String,
}

impl Registration {
    /// Protocol string and CloudEvents `type`, as Choria spells it.
    pub const PROTOCOL: &'static str = "choria:registration:inventorycontent:1";

    /// A registration of `content`, made now.
    pub fn new(content: InventoryContent) -> Self {
        Registration { protocol: Self::PROTOCOL.into(), content, timestamp: crate::util::now_unix() }
    }

    /// The node it describes.
    pub fn identity(&self) -> &str {
        &self.content.status.identity
    }

    /// Reads a registration as Choria publishes it outside CloudEvents: `content` plain or
    /// `zcontent` (base64 of gzip), the form Choria uses by default.
    pub fn from_choria(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Wire {
            protocol: String,
            #[serde(default)]
            content: Option<serde_json::Value>,
            #[serde(default)]
            zcontent: Option<String>,
        }
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| format!("registration: {e}"))?;
        if wire.protocol != Self::PROTOCOL {
            return Err(format!("registration: protocol {:?}, expected {}", wire.protocol, Self::PROTOCOL));
        }
        let content = match (wire.content, wire.zcontent) {
            (Some(content), _) => serde_json::from_value(content).map_err(|e| format!("registration content: {e}"))?,
            (None, Some(z)) => {
                use base64::Engine as _;
                use std::io::Read as _;
                let gz = base64::engine::general_purpose::STANDARD
                    .decode(z.trim())
                    .map_err(|e| format!("registration zcontent: not base64: {e}"))?;
                let mut json = Vec::new();
                flate2::read::GzDecoder::new(&gz[..])
                    .take(crate::MAX_EVENT_BYTES as u64 * 16)
                    .read_to_end(&mut json)
                    .map_err(|e| format!("registration zcontent: not gzip: {e}"))?;
                serde_json::from_slice(&json).map_err(|e| format!("registration zcontent: {e}"))?
            }
            (None, None) => return Err("registration: neither content nor zcontent".into()),
        };
        Ok(Registration { protocol: Self::PROTOCOL.into(), content, timestamp: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use std::io::Write as _;

    const CONTENT: &str = r#"{"agents":[{"license":"Apache-2.0","author":"R.I.Pienaar","timeout":10,"name":"rpcutil","version":"0.19.0","url":"https://choria.io","description":"General helpful actions"}],"classes":["one"],"facts":{"country":"mt"},"status":{"identity":"dev1.example.net","uptime":3,"connected_server":"nats://broker:4222","last_message":1,"provisioning_mode":false,"stats":{"total":1}},"collectives":["mcollective"],"build_info":{"version":"0.29.0","sha":"abc"},"machines":[]}"#;

    #[test]
    fn choria_registrations_decode_plain_and_compressed() {
        let plain = format!(r#"{{"protocol":"choria:registration:inventorycontent:1","content":{CONTENT}}}"#);
        let a = Registration::from_choria(plain.as_bytes()).unwrap();
        assert_eq!(a.identity(), "dev1.example.net");
        assert_eq!(a.content.facts["country"], "mt");
        assert_eq!(a.content.agents[0].name, "rpcutil");

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(CONTENT.as_bytes()).unwrap();
        let z = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let compressed = format!(r#"{{"protocol":"choria:registration:inventorycontent:1","zcontent":"{z}"}}"#);
        assert_eq!(Registration::from_choria(compressed.as_bytes()).unwrap(), a);

        let wrong = r#"{"protocol":"choria:registration:filecontent:1","content":{}}"#;
        assert!(Registration::from_choria(wrong.as_bytes()).unwrap_err().contains("protocol"));
        let bad = r#"{"protocol":"choria:registration:inventorycontent:1","zcontent":"bm90IGd6aXA="}"#;
        assert!(Registration::from_choria(bad.as_bytes()).unwrap_err().contains("not gzip"));
    }
}
