//! Reading the inventory: filters, counts, summaries.

use std::collections::BTreeMap;
use std::sync::Arc;

use chorus_backbone::Backbone;
use chorus_platform::StreamMap;
use chorus_schemas::subject::{CHORUS_LIFECYCLE, CHORUS_MACHINE, CHORUS_REGISTRATION};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::codec::read_node;
use super::metadata::{metadata_key, MetadataView, NodeMetadata, METADATA_VIEW};
use super::node::{Node, NodeView, Status, StatusPolicy};
use super::view::InventoryView;
use super::watchers::{CheckState, WatcherSummary, WatchersView, CHECK_PREFIX, WATCHERS_VIEW, WATCHER_PREFIX};
use super::{node_key, VIEW_NAME};
use crate::projection::{Progress, ProgressSnapshot, ProjectionError, Projector, Store, ViewState};
use chorus_rpc::CompiledFilter;

/// Which nodes to list. Every set field must match. Deserializes from URL query parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeFilter {
    /// Only nodes with this status.
    pub status: Option<Status>,
    /// Only nodes whose component is this.
    pub component: Option<String>,
    /// Only nodes running this version.
    pub version: Option<String>,
    /// Only identities matching this glob (`*` any run of characters, `?` one character).
    pub identity: Option<String>,
    /// At most this many nodes (in identity order).
    pub limit: Option<usize>,
}

impl NodeFilter {
    fn matches(&self, node: &Node, status: Status) -> bool {
        self.status.is_none_or(|s| s == status)
            && self.component.as_deref().is_none_or(|c| c == node.component)
            && self.version.as_deref().is_none_or(|v| node.version.as_deref() == Some(v))
            && self.identity.as_deref().is_none_or(|g| glob_match(g, &node.identity))
    }
}

/// `*` matches any run of characters (including none), `?` exactly one; everything else
/// itself. Iterative with one backtrack point, so it is linear-ish and cannot blow up.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Nodes per status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounts {
    /// See [`Status::Alive`].
    pub alive: u64,
    /// See [`Status::Missing`].
    pub missing: u64,
    /// See [`Status::Shutdown`].
    pub shutdown: u64,
    /// See [`Status::Expired`].
    pub expired: u64,
}

impl StatusCounts {
    fn add(&mut self, status: Status) {
        match status {
            Status::Alive => self.alive += 1,
            Status::Missing => self.missing += 1,
            Status::Shutdown => self.shutdown += 1,
            Status::Expired => self.expired += 1,
        }
    }

    /// The count of one status.
    pub fn get(&self, status: Status) -> u64 {
        match status {
            Status::Alive => self.alive,
            Status::Missing => self.missing,
            Status::Shutdown => self.shutdown,
            Status::Expired => self.expired,
        }
    }
}

/// `{component: {version: nodes}}`; nodes without a version count under `"unknown"`.
pub type Versions = BTreeMap<String, BTreeMap<String, u64>>;

/// The fleet at a glance: what `GET /api/summary` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Nodes in the inventory, whatever their status.
    pub total: u64,
    /// Nodes per status.
    pub status: StatusCounts,
    /// Versions per component, over nodes that are not expired.
    pub versions: Versions,
    /// Last stream sequence applied to the inventory.
    pub checkpoint: u64,
    /// When the statuses were computed.
    pub at: DateTime<Utc>,
    /// The projector's progress, when this process runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<ProgressSnapshot>,
}

/// Read handle on the inventory: cheap to clone, safe to use while a projector updates it.
#[derive(Clone)]
pub struct Inventory {
    state: ViewState,
    /// The registration view, when this inventory has one.
    metadata: Option<ViewState>,
    /// The watcher view, when this inventory has one.
    watchers: Option<ViewState>,
    policy: StatusPolicy,
    progress: Option<Arc<Progress>>,
}

/// What inventory discovery found: what `POST /api/discover` returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Discovered {
    /// Identities the filter selects, in identity order.
    pub nodes: Vec<String>,
    /// Nodes with a registration in the collective, whether selected or not.
    pub registered: u64,
    /// Selected nodes left out because the inventory knows them to be shut down or expired.
    pub down: Vec<String>,
    /// The oldest registration among the selected nodes: how stale the selection may be.
    pub oldest: Option<DateTime<Utc>>,
    /// Last stream sequence applied to the registration view.
    pub checkpoint: u64,
    /// When the selection was made.
    pub at: DateTime<Utc>,
}

impl Inventory {
    /// Queries over `state` (the inventory view's state) with `policy` deciding statuses.
    pub fn new(state: ViewState, policy: StatusPolicy) -> Self {
        Inventory { state, metadata: None, watchers: None, policy, progress: None }
    }

    /// Queries over the inventory kept in `store`: lifecycle and registrations.
    pub fn open(store: &Store, policy: StatusPolicy) -> Result<Self, ProjectionError> {
        let mut inventory = Self::new(store.state(VIEW_NAME)?, policy);
        inventory.metadata = Some(store.state(METADATA_VIEW)?);
        inventory.watchers = Some(store.state(WATCHERS_VIEW)?);
        Ok(inventory)
    }

    /// A projector that builds the inventory in `store` from `CHORUS_LIFECYCLE`.
    pub fn projector(backbone: Arc<dyn Backbone>, store: &Store) -> Result<Projector<InventoryView>, ProjectionError> {
        Self::projector_on(backbone, &StreamMap::default(), store)
    }

    /// A projector that builds the inventory in `store` from the stream that holds the
    /// lifecycle subjects in `streams` (Choria's `CHORIA_EVENTS` beside a Choria broker).
    pub fn projector_on(
        backbone: Arc<dyn Backbone>,
        streams: &StreamMap,
        store: &Store,
    ) -> Result<Projector<InventoryView>, ProjectionError> {
        Projector::new(backbone, streams.get(CHORUS_LIFECYCLE), store, InventoryView::default())
    }

    /// A projector that keeps each node's latest registration in `store`, from
    /// `CHORUS_REGISTRATION`: what inventory discovery selects on.
    pub fn registration_projector(
        backbone: Arc<dyn Backbone>,
        store: &Store,
    ) -> Result<Projector<MetadataView>, ProjectionError> {
        Self::registration_projector_on(backbone, &StreamMap::default(), store)
    }

    /// [`Inventory::registration_projector`] from the stream that holds the registration
    /// subjects in `streams`.
    pub fn registration_projector_on(
        backbone: Arc<dyn Backbone>,
        streams: &StreamMap,
        store: &Store,
    ) -> Result<Projector<MetadataView>, ProjectionError> {
        Projector::new(backbone, streams.get(CHORUS_REGISTRATION), store, MetadataView)
    }

    /// A projector that keeps the latest state of every node's watchers (and the results of
    /// its `nagios` checks) in `store`, from the stream that holds the machine subjects in
    /// `streams`.
    pub fn watchers_projector_on(
        backbone: Arc<dyn Backbone>,
        streams: &StreamMap,
        store: &Store,
    ) -> Result<Projector<WatchersView>, ProjectionError> {
        Projector::new(backbone, streams.get(CHORUS_MACHINE), store, WatchersView)
    }

    /// The latest check results, by node, machine and check; only those of nodes matching
    /// the `node` glob when given.
    pub fn checks(&self, node: Option<&str>) -> Result<Vec<CheckState>, ProjectionError> {
        self.scan_watchers(CHECK_PREFIX, node, |c: &CheckState| &c.identity)
    }

    /// The latest state of every watcher, by node, machine and watcher; only those of nodes
    /// matching the `node` glob when given.
    pub fn watchers(&self, node: Option<&str>) -> Result<Vec<WatcherSummary>, ProjectionError> {
        self.scan_watchers(WATCHER_PREFIX, node, |w: &WatcherSummary| &w.identity)
    }

    fn scan_watchers<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
        node: Option<&str>,
        identity: impl Fn(&T) -> &str,
    ) -> Result<Vec<T>, ProjectionError> {
        let Some(state) = &self.watchers else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in state.scan_json::<T>(prefix) {
            let item = item?;
            if node.is_none_or(|n| glob_match(n, identity(&item))) {
                out.push(item);
            }
        }
        Ok(out)
    }

    /// A node's latest registration, `None` when it never registered (or this inventory
    /// keeps no registrations).
    pub fn metadata(&self, identity: &str) -> Result<Option<NodeMetadata>, ProjectionError> {
        let Some(state) = &self.metadata else { return Ok(None) };
        Ok(state.get_json(&metadata_key(identity))?)
    }

    /// The registered nodes of `collective` that `filter` selects, checked with the nodes'
    /// own filter code against their latest registrations. Nodes the inventory knows to be
    /// shut down or expired are left out (and named): they would not answer.
    pub fn discover(
        &self,
        filter: &CompiledFilter,
        collective: &str,
        now: DateTime<Utc>,
    ) -> Result<Discovered, ProjectionError> {
        let mut found =
            Discovered { nodes: Vec::new(), registered: 0, down: Vec::new(), oldest: None, checkpoint: 0, at: now };
        let Some(state) = &self.metadata else { return Ok(found) };
        found.checkpoint = state.checkpoint()?;
        for metadata in state.scan_json::<NodeMetadata>(&metadata_key("")) {
            let metadata = metadata?;
            if !metadata.collectives.iter().any(|c| c == collective) {
                continue;
            }
            found.registered += 1;
            if !metadata.matches(filter, collective) {
                continue;
            }
            let down = self
                .get(&metadata.identity, now)?
                .is_some_and(|n| matches!(n.status, Status::Shutdown | Status::Expired));
            if down {
                found.down.push(metadata.identity);
            } else {
                found.oldest = Some(found.oldest.map_or(metadata.registered, |o| o.min(metadata.registered)));
                found.nodes.push(metadata.identity);
            }
        }
        Ok(found)
    }

    /// Reports `progress` (from the projector feeding this store) in [`Summary::projection`].
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The projector's progress, when one reports to this inventory.
    pub fn progress(&self) -> Option<ProgressSnapshot> {
        self.progress.as_ref().map(|p| p.snapshot())
    }

    /// The status rules.
    pub fn policy(&self) -> &StatusPolicy {
        &self.policy
    }

    /// Last stream sequence applied.
    pub fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.state.checkpoint()
    }

    fn view(&self, node: Node, now: DateTime<Utc>) -> NodeView {
        let status = self.policy.status(&node, now);
        NodeView { node, status }
    }

    /// Every stored node in identity order, without status.
    pub fn nodes(&self) -> impl Iterator<Item = Result<Node, ProjectionError>> + '_ {
        self.nodes_with_prefix("")
    }

    fn nodes_with_prefix(&self, identity_prefix: &str) -> impl Iterator<Item = Result<Node, ProjectionError>> + '_ {
        self.state.scan_prefix(&node_key(identity_prefix)).map(|kv| {
            let (key, value) = kv?;
            Ok(read_node(&key, &value)?)
        })
    }

    /// One node, `None` when the inventory never heard of it.
    pub fn get(&self, identity: &str, now: DateTime<Utc>) -> Result<Option<NodeView>, ProjectionError> {
        let key = node_key(identity);
        match self.state.get(&key)? {
            Some(value) => Ok(Some(self.view(read_node(&key, &value)?, now))),
            None => Ok(None),
        }
    }

    /// Nodes matching `filter`, in identity order.
    pub fn list(&self, filter: &NodeFilter, now: DateTime<Utc>) -> Result<Vec<NodeView>, ProjectionError> {
        // The literal start of an identity glob narrows the scan.
        let prefix = filter.identity.as_deref().map(|g| &g[..g.find(['*', '?']).unwrap_or(g.len())]).unwrap_or("");
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for node in self.nodes_with_prefix(prefix) {
            if out.len() >= limit {
                break;
            }
            let view = self.view(node?, now);
            if filter.matches(&view.node, view.status) {
                out.push(view);
            }
        }
        Ok(out)
    }

    /// Nodes per status.
    pub fn counts(&self, now: DateTime<Utc>) -> Result<StatusCounts, ProjectionError> {
        Ok(self.summary(now)?.status)
    }

    /// Versions per component over the nodes that are not expired.
    pub fn versions(&self, now: DateTime<Utc>) -> Result<Versions, ProjectionError> {
        Ok(self.summary(now)?.versions)
    }

    /// Totals, counts by status and versions per component, in one pass.
    pub fn summary(&self, now: DateTime<Utc>) -> Result<Summary, ProjectionError> {
        let checkpoint = self.state.checkpoint()?;
        let mut total = 0;
        let mut status = StatusCounts::default();
        let mut versions = Versions::new();
        for node in self.nodes() {
            let node = node?;
            let st = self.policy.status(&node, now);
            total += 1;
            status.add(st);
            if st != Status::Expired {
                let version = node.version.unwrap_or_else(|| "unknown".into());
                *versions.entry(node.component).or_default().entry(version).or_default() += 1;
            }
        }
        Ok(Summary {
            total,
            status,
            versions,
            checkpoint,
            at: now,
            projection: self.progress.as_ref().map(|p| p.snapshot()),
        })
    }
}
