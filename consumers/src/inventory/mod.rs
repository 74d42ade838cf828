//! The inventory: every node the fleet has heard from, folded from `CHORUS_LIFECYCLE`.
//!
//! A node is keyed by its identity and carries its component, version, site, first and last
//! seen (event time), the last lifecycle event and its advertised alive interval. Lifecycle
//! events carry no facts, so the inventory has none; facts belong to a view of RPC inventory
//! replies.
//!
//! Status is **computed at query time** from the stored last-seen time and the clock, never
//! stored: a node that simply stops talking produces no event, so a status stored when the
//! last event was applied would say "alive" forever, and a rebuild would disagree with the
//! incremental view depending on when it ran. See [`StatusPolicy`] for the rules.
//!
//! Events are applied by **event time**: an event older than the node's last seen (an outbox
//! forwarding a backlog after a newer event arrived directly) only widens first seen and the
//! count, so a late, stale alive cannot resurrect a node that has since shut down. Ties keep
//! stream order. The fold is deterministic, so a rebuild gives the same state.
//!
//! Beside it, each node's latest registration (facts, classes, agents, collectives) is kept
//! from `CHORUS_REGISTRATION` ([`MetadataView`]), and [`Inventory::discover`] selects nodes
//! by a request's filter over it, with the nodes' own filter code.
//!
//! And the latest state of each node's autonomous-agent watchers, of every Choria watcher
//! type, with Scout-style check results for `nagios` watchers, from the machine stream
//! ([`WatchersView`], `GET /api/watchers`, `GET /api/checks`).
//!
//! Queries: [`Inventory`] (list with [`NodeFilter`], get, counts, versions per component,
//! [`Summary`], metadata, discovery); HTTP: [`router`] (`GET /api/nodes`,
//! `/api/nodes/{identity}`, `/api/summary`, `/api/metadata/{identity}`, `/api/watchers`,
//! `/api/checks`, `POST /api/discover`).

/// Name of the inventory view (store tree, `chorus.deadletter.inventory`).
pub const VIEW_NAME: &str = "inventory";

/// Key prefix of node records in the view.
const NODE_PREFIX: &[u8] = b"n/";

/// The view key of a node.
fn node_key(identity: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(NODE_PREFIX.len() + identity.len());
    key.extend_from_slice(NODE_PREFIX);
    key.extend_from_slice(identity.as_bytes());
    key
}

mod codec;
mod http;
mod metadata;
mod node;
mod query;
mod view;
mod watchers;

#[cfg(test)]
mod tests;

pub use http::{router, serve, DiscoverRequest};
pub use metadata::{AgentVersion, MetadataView, NodeMetadata, METADATA_VIEW};
pub use node::{Node, NodeView, Status, StatusPolicy};
pub use query::{glob_match, Discovered, Inventory, NodeFilter, StatusCounts, Summary};
pub use view::InventoryView;
pub use watchers::{CheckState, WatcherSummary, WatchersView, WATCHERS_VIEW};
