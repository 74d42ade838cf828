//! A node as the inventory stores it, and its status as computed at query time.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A node as stored: what its lifecycle events said. Status is not here; see [`NodeView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node identity (usually its FQDN).
    pub identity: String,
    /// Component of its latest event (`server`, `provision_mode_server`, ...).
    pub component: String,
    /// Version from its latest startup, alive or upgraded event; `None` until one arrives.
    pub version: Option<String>,
    /// Site of its latest event, when the producer set one.
    pub site: Option<String>,
    /// Event time of its oldest event.
    pub first_seen: DateTime<Utc>,
    /// Event time of its newest event.
    pub last_seen: DateTime<Utc>,
    /// Type of its newest event (`startup`, `alive`, `shutdown`, `provisioned`, `upgraded`).
    pub last_event: String,
    /// Event time of its newest startup.
    pub last_startup: Option<DateTime<Utc>>,
    /// Alive interval the node advertises, seconds (Chorus producers; Choria sends none).
    pub alive_interval: Option<u64>,
    /// Its newest event is a shutdown.
    pub shutdown: bool,
    /// Lifecycle events applied for it.
    pub events: u64,
    /// Stream sequence of its newest event.
    pub sequence: u64,
}

/// Where a node stands, as of a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Heard from within its missing threshold.
    Alive,
    /// Silent for longer than its missing threshold, not yet expired.
    Missing,
    /// Its newest event is a shutdown (and it has not expired).
    Shutdown,
    /// Silent for longer than the expiry threshold, whatever its last event.
    Expired,
}

impl Status {
    /// Every status, in display order.
    pub const ALL: [Status; 4] = [Status::Alive, Status::Missing, Status::Shutdown, Status::Expired];

    /// Lower-case name (`alive`, `missing`, `shutdown`, `expired`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Alive => "alive",
            Status::Missing => "missing",
            Status::Shutdown => "shutdown",
            Status::Expired => "expired",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}: expected alive, missing, shutdown or expired"))
    }
}

/// How a node's [`Status`] follows from its last seen time and the clock.
///
/// * **expired**: not seen for more than `expire_after` (default 24 h), whatever its last event,
///   so decommissioned nodes leave the fleet picture;
/// * **shutdown**: otherwise, when its newest event is a shutdown;
/// * **missing**: otherwise, when not seen for more than its missing threshold;
/// * **alive**: otherwise.
///
/// The missing threshold is `missing_after` when set; else `missing_intervals` (3) × the
/// alive interval the node advertises, or × `default_alive_interval` (30 min, Choria's alive
/// period) for nodes that advertise none. Scaling by each node's own interval means a node on
/// a 5 minute alive period is missing after 15 minutes, without marking Choria nodes on their
/// 30 minute period missing between two alive events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPolicy {
    /// Fixed missing threshold for every node, overriding the per-node interval rule.
    #[serde(default, with = "humantime_serde::option")]
    pub missing_after: Option<Duration>,
    /// Alive intervals of silence before a node is missing.
    pub missing_intervals: u32,
    /// Alive interval assumed for nodes that advertise none.
    #[serde(with = "humantime_serde")]
    pub default_alive_interval: Duration,
    /// Silence after which a node is expired.
    #[serde(with = "humantime_serde")]
    pub expire_after: Duration,
}

impl Default for StatusPolicy {
    fn default() -> Self {
        StatusPolicy {
            missing_after: None,
            missing_intervals: 3,
            default_alive_interval: Duration::from_secs(30 * 60),
            expire_after: Duration::from_secs(24 * 3600),
        }
    }
}

impl StatusPolicy {
    /// The silence after which `node` is missing.
    pub fn missing_after_for(&self, node: &Node) -> Duration {
        self.missing_after.unwrap_or_else(|| {
            let interval = node.alive_interval.map(Duration::from_secs).unwrap_or(self.default_alive_interval);
            interval.saturating_mul(self.missing_intervals)
        })
    }

    /// The status of `node` at `now`.
    pub fn status(&self, node: &Node, now: DateTime<Utc>) -> Status {
        // A last seen in the future (clock skew) counts as just now.
        let silent = (now - node.last_seen).to_std().unwrap_or(Duration::ZERO);
        if silent > self.expire_after {
            Status::Expired
        } else if node.shutdown {
            Status::Shutdown
        } else if silent > self.missing_after_for(node) {
            Status::Missing
        } else {
            Status::Alive
        }
    }
}

/// A node with its status at query time: what the API returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// The stored node.
    #[serde(flatten)]
    pub node: Node,
    /// Its status at the time of the query.
    pub status: Status,
}
