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
//! Queries: [`Inventory`] (list with [`NodeFilter`], get, counts, versions per component,
//! [`Summary`]); HTTP: [`router`] (`GET /api/nodes`, `/api/nodes/{identity}`, `/api/summary`).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chorus_backbone::Backbone;
use chorus_schemas::lifecycle::LifecycleType;
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_schemas::{Event, EventRecord, Lifecycle};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::projection::{
    Progress, ProgressSnapshot, ProjectionError, Projector, Store, Txn, View, ViewError, ViewState,
};

/// Name of the inventory view (store tree, `chorus.deadletter.inventory`).
pub const VIEW_NAME: &str = "inventory";

/// Key prefix of node records in the view.
const NODE_PREFIX: &[u8] = b"n/";

fn node_key(identity: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(NODE_PREFIX.len() + identity.len());
    key.extend_from_slice(NODE_PREFIX);
    key.extend_from_slice(identity.as_bytes());
    key
}

/// The stored form of a node: a small binary record, because the projection decodes and
/// re-encodes one per applied event and JSON (with RFC 3339 times) cost several times more
/// than the rest of applying an alive event. The identity is the key, so it is not repeated.
///
/// Layout (integers little-endian, strings as u32 length and UTF-8, times as i64 seconds and
/// u32 nanoseconds, optional fields as a flag byte and the value): format byte `1`, component,
/// version, site, first seen, last seen, last event, last startup, alive interval (u64),
/// shutdown (byte), events (u64), sequence (u64).
mod codec {
    use chrono::{DateTime, Utc};

    use super::Node;

    const FORMAT: u8 = 1;

    pub(super) fn encode(node: &Node, out: &mut Vec<u8>) {
        out.clear();
        out.push(FORMAT);
        string(out, &node.component);
        opt(out, node.version.as_deref(), string);
        opt(out, node.site.as_deref(), string);
        time(out, &node.first_seen);
        time(out, &node.last_seen);
        string(out, &node.last_event);
        opt(out, node.last_startup.as_ref(), time);
        opt(out, node.alive_interval, |out, v| out.extend_from_slice(&v.to_le_bytes()));
        out.push(node.shutdown as u8);
        out.extend_from_slice(&node.events.to_le_bytes());
        out.extend_from_slice(&node.sequence.to_le_bytes());
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn time(out: &mut Vec<u8>, t: &DateTime<Utc>) {
        out.extend_from_slice(&t.timestamp().to_le_bytes());
        out.extend_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
    }

    fn opt<T>(out: &mut Vec<u8>, v: Option<T>, f: impl FnOnce(&mut Vec<u8>, T)) {
        match v {
            Some(v) => {
                out.push(1);
                f(out, v);
            }
            None => out.push(0),
        }
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("record is truncated".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn u8(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
        }
        fn u64(&mut self) -> Result<u64, String> {
            Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
        }
        fn string(&mut self) -> Result<String, String> {
            let len = self.u32()? as usize;
            std::str::from_utf8(self.take(len)?).map(str::to_owned).map_err(|e| e.to_string())
        }
        fn time(&mut self) -> Result<DateTime<Utc>, String> {
            let secs = self.u64()? as i64;
            let nanos = self.u32()?;
            DateTime::from_timestamp(secs, nanos).ok_or_else(|| format!("time {secs}.{nanos} is out of range"))
        }
        fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<Option<T>, String> {
            match self.u8()? {
                0 => Ok(None),
                1 => f(self).map(Some),
                b => Err(format!("bad option flag {b}")),
            }
        }
    }

    pub(super) fn decode(identity: &str, bytes: &[u8]) -> Result<Node, String> {
        let mut r = Reader(bytes);
        let format = r.u8()?;
        if format != FORMAT {
            return Err(format!("unknown record format {format}"));
        }
        let node = Node {
            identity: identity.to_owned(),
            component: r.string()?,
            version: r.opt(Reader::string)?,
            site: r.opt(Reader::string)?,
            first_seen: r.time()?,
            last_seen: r.time()?,
            last_event: r.string()?,
            last_startup: r.opt(Reader::time)?,
            alive_interval: r.opt(Reader::u64)?,
            shutdown: r.u8()? != 0,
            events: r.u64()?,
            sequence: r.u64()?,
        };
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the record", r.0.len()));
        }
        Ok(node)
    }
}

fn read_node(key: &[u8], value: &[u8]) -> Result<Node, ViewError> {
    let corrupt = |reason: String| ViewError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason };
    let identity = std::str::from_utf8(&key[NODE_PREFIX.len()..]).map_err(|e| corrupt(e.to_string()))?;
    codec::decode(identity, value).map_err(corrupt)
}

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

/// The inventory fold. Everything is in the view store; the view only keeps a scratch buffer.
#[derive(Clone, Debug, Default)]
pub struct InventoryView {
    buf: Vec<u8>,
}

impl View for InventoryView {
    fn name(&self) -> &str {
        VIEW_NAME
    }

    fn apply(&mut self, sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        let Event::Lifecycle(event) = &record.data else {
            return Ok(());
        };
        // Governor events describe a concurrency slot (often taken from a CLI host), not the
        // node's life.
        if event.lifecycle_type() == LifecycleType::Governor {
            return Ok(());
        }
        let key = node_key(event.identity());
        let time = record.time;
        let mut node = match txn.get(&key)? {
            Some(value) => read_node(&key, &value)?,
            None => Node {
                identity: event.identity().to_owned(),
                component: String::new(),
                version: None,
                site: None,
                first_seen: time,
                last_seen: time,
                last_event: String::new(),
                last_startup: None,
                alive_interval: None,
                shutdown: false,
                events: 0,
                sequence: 0,
            },
        };
        node.events += 1;
        node.first_seen = node.first_seen.min(time);
        if time >= node.last_seen || node.events == 1 {
            node.last_seen = time;
            node.sequence = sequence;
            let last_event = event.lifecycle_type().as_str();
            if node.last_event != last_event {
                node.last_event = last_event.to_owned();
            }
            // A provisioned event names the provisioner that sent it, not what the node runs.
            let from_node = !matches!(event, Lifecycle::Provisioned(_));
            if from_node && node.component != event.component() {
                node.component = event.component().to_owned();
            }
            if record.site.is_some() && node.site != record.site {
                node.site.clone_from(&record.site);
            }
            node.shutdown = false;
            match event {
                Lifecycle::Startup(s) => {
                    set_version(&mut node, &s.version);
                    node.last_startup = Some(time);
                }
                Lifecycle::Alive(a) => {
                    set_version(&mut node, &a.version);
                    if a.interval.is_some() {
                        node.alive_interval = a.interval;
                    }
                }
                Lifecycle::Upgraded(u) => set_version(&mut node, &u.new_version),
                Lifecycle::Shutdown(_) => node.shutdown = true,
                Lifecycle::Provisioned(_) | Lifecycle::Governor(_) => {}
            }
        }
        codec::encode(&node, &mut self.buf);
        txn.insert(&key, &self.buf[..])
    }
}

fn set_version(node: &mut Node, version: &str) {
    if node.version.as_deref() != Some(version) {
        node.version = Some(version.to_owned());
    }
}

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
    policy: StatusPolicy,
    progress: Option<Arc<Progress>>,
}

impl Inventory {
    /// Queries over `state` (the inventory view's state) with `policy` deciding statuses.
    pub fn new(state: ViewState, policy: StatusPolicy) -> Self {
        Inventory { state, policy, progress: None }
    }

    /// Queries over the inventory kept in `store`.
    pub fn open(store: &Store, policy: StatusPolicy) -> Result<Self, ProjectionError> {
        Ok(Self::new(store.state(VIEW_NAME)?, policy))
    }

    /// A projector that builds the inventory in `store` from `CHORUS_LIFECYCLE`.
    pub fn projector(backbone: Arc<dyn Backbone>, store: &Store) -> Result<Projector<InventoryView>, ProjectionError> {
        Projector::new(backbone, CHORUS_LIFECYCLE, store, InventoryView::default())
    }

    /// Reports `progress` (from the projector feeding this store) in [`Summary::projection`].
    pub fn with_progress(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
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

/// The inventory's JSON API:
///
/// * `GET /api/nodes?status=&component=&version=&identity=&limit=` — [`Inventory::list`]
/// * `GET /api/nodes/{identity}` — [`Inventory::get`], 404 when unknown
/// * `GET /api/summary` — [`Inventory::summary`]
///
/// Queries scan the store, so they run on the blocking pool, not on the async workers.
pub fn router(inventory: Inventory) -> Router {
    Router::new()
        .route("/api/nodes", get(list_nodes))
        .route("/api/nodes/{identity}", get(show_node))
        .route("/api/summary", get(summary))
        .with_state(inventory)
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    inventory: Inventory,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(inventory)).with_graceful_shutdown(shutdown).await
}

/// An API failure as `{"error": "..."}` with its HTTP status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

async fn query<T: Send + 'static>(
    inventory: Inventory,
    f: impl FnOnce(&Inventory, DateTime<Utc>) -> Result<T, ProjectionError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || f(&inventory, Utc::now()))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn list_nodes(
    State(inv): State<Inventory>,
    Query(filter): Query<NodeFilter>,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    query(inv, move |inv, now| inv.list(&filter, now)).await.map(Json)
}

async fn show_node(State(inv): State<Inventory>, Path(identity): Path<String>) -> Result<Json<NodeView>, ApiError> {
    let id = identity.clone();
    query(inv, move |inv, now| inv.get(&id, now))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("node {identity:?} is not in the inventory")))
}

async fn summary(State(inv): State<Inventory>) -> Result<Json<Summary>, ApiError> {
    query(inv, |inv, now| inv.summary(now)).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_backbone::embedded::EmbeddedBackbone;
    use chorus_schemas::lifecycle::{Alive, Governor, GovernorEventType, Provisioned, Shutdown, Startup, Upgraded};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T0: i64 = 1_800_000_000;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(T0 + secs, 0).unwrap()
    }

    /// Builds an event with a fixed event time.
    fn ev(data: impl Into<Event>, secs: i64) -> EventRecord {
        let mut data = data.into();
        if let Event::Lifecycle(l) = &mut data {
            match l {
                Lifecycle::Startup(e) => e.timestamp = T0 + secs,
                Lifecycle::Alive(e) => e.timestamp = T0 + secs,
                Lifecycle::Shutdown(e) => e.timestamp = T0 + secs,
                Lifecycle::Provisioned(e) => e.timestamp = T0 + secs,
                Lifecycle::Upgraded(e) => e.timestamp = T0 + secs,
                Lifecycle::Governor(e) => e.timestamp = T0 + secs,
            }
        }
        EventRecord::new(data, 1)
    }

    fn apply_all(events: &[EventRecord]) -> (Store, Inventory) {
        let store = Store::temporary().unwrap();
        let state = store.state(VIEW_NAME).unwrap();
        let mut txn = Txn::for_tests(&state);
        let mut view = InventoryView::default();
        for (i, e) in events.iter().enumerate() {
            view.apply(i as u64 + 1, e, &mut txn).unwrap();
        }
        txn.commit_for_tests(events.len() as u64);
        let inv = Inventory::new(state, StatusPolicy::default());
        (store, inv)
    }

    #[test]
    fn lifecycle_events_fold_into_nodes() {
        let (_s, inv) = apply_all(&[
            ev(Startup::new("a", "provision_mode_server", "0.1"), 0),
            ev(Provisioned::new("a", "provision_mode_server"), 10),
            ev(Startup::new("a", "server", "0.2"), 20),
            ev(Alive::new("a", "server", "0.2", Some(300)), 320),
            ev(Upgraded::new("a", "server", "0.2", "0.3"), 400),
            ev(Governor::new("a", "CLI", "g", 1, GovernorEventType::Enter), 500),
            ev(Startup::new("b", "server", "0.2"), 0),
            ev(Shutdown::new("b", "server"), 60),
        ]);
        let a = inv.get("a", at(400)).unwrap().unwrap();
        assert_eq!(a.node.component, "server");
        assert_eq!(a.node.version.as_deref(), Some("0.3"));
        assert_eq!((a.node.first_seen, a.node.last_seen), (at(0), at(400)), "governor events are not the node's life");
        assert_eq!(a.node.last_event, "upgraded");
        assert_eq!(a.node.last_startup, Some(at(20)));
        assert_eq!((a.node.alive_interval, a.node.events, a.node.sequence), (Some(300), 5, 5));
        assert_eq!(a.status, Status::Alive);
        let b = inv.get("b", at(100)).unwrap().unwrap();
        assert_eq!((b.status, b.node.shutdown), (Status::Shutdown, true));
        assert!(inv.get("c", at(0)).unwrap().is_none());
    }

    #[test]
    fn a_stale_event_does_not_resurrect_a_node() {
        let (_s, inv) = apply_all(&[
            ev(Alive::new("a", "server", "1", Some(60)), 100),
            ev(Shutdown::new("a", "server"), 200),
            // Forwarded late from an outbox: older than the shutdown.
            ev(Alive::new("a", "server", "0", Some(60)), 150),
            ev(Startup::new("a", "server", "1"), 50),
        ]);
        let a = inv.get("a", at(210)).unwrap().unwrap();
        assert_eq!((a.status, a.node.version.as_deref(), a.node.events), (Status::Shutdown, Some("1"), 4));
        assert_eq!((a.node.first_seen, a.node.last_seen, a.node.last_event.as_str()), (at(50), at(200), "shutdown"));
    }

    #[test]
    fn status_follows_the_clock_and_the_policy() {
        let mut node = Node {
            identity: "a".into(),
            component: "server".into(),
            version: None,
            site: None,
            first_seen: at(0),
            last_seen: at(0),
            last_event: "alive".into(),
            last_startup: None,
            alive_interval: Some(300),
            shutdown: false,
            events: 1,
            sequence: 1,
        };
        let p = StatusPolicy::default();
        assert_eq!(p.status(&node, at(-100)), Status::Alive, "clock skew");
        assert_eq!(p.status(&node, at(900)), Status::Alive, "3 × 300 s is the limit");
        assert_eq!(p.status(&node, at(901)), Status::Missing);
        assert_eq!(p.status(&node, at(86_401)), Status::Expired);
        node.alive_interval = None;
        assert_eq!(p.status(&node, at(901)), Status::Alive, "Choria nodes: 3 × 30 min");
        assert_eq!(p.status(&node, at(5_401)), Status::Missing);
        let fixed = StatusPolicy { missing_after: Some(Duration::from_secs(60)), ..Default::default() };
        assert_eq!(fixed.status(&node, at(61)), Status::Missing);
        node.shutdown = true;
        assert_eq!(p.status(&node, at(10_000)), Status::Shutdown, "shutdown wins over missing");
        assert_eq!(p.status(&node, at(86_401)), Status::Expired, "expiry wins over shutdown");
    }

    #[test]
    fn node_records_round_trip() {
        let mut node = Node {
            identity: "web1.example.net".into(),
            component: "server".into(),
            version: Some("1.2.3".into()),
            site: Some("london".into()),
            first_seen: DateTime::from_timestamp(T0, 123_456_789).unwrap(),
            last_seen: at(60),
            last_event: "alive".into(),
            last_startup: Some(at(1)),
            alive_interval: Some(300),
            shutdown: true,
            events: 42,
            sequence: u64::MAX,
        };
        let mut buf = Vec::new();
        for _ in 0..2 {
            codec::encode(&node, &mut buf);
            assert_eq!(codec::decode(&node.identity, &buf).unwrap(), node);
            for cut in 0..buf.len() {
                assert!(codec::decode("x", &buf[..cut]).is_err(), "truncated at {cut}");
            }
            node.version = None;
            node.site = None;
            node.last_startup = None;
            node.alive_interval = None;
            node.component = "ü".repeat(3);
        }
        buf.push(0);
        assert!(codec::decode("x", &buf).is_err(), "trailing bytes");
        assert!(codec::decode("x", &[2]).is_err(), "unknown format");
    }

    #[test]
    fn globs() {
        for (g, t, m) in [
            ("*", "", true),
            ("web*", "web1.example.net", true),
            ("web?.example.net", "web1.example.net", true),
            ("web?.example.net", "web12.example.net", false),
            ("*.example.net", "db.example.net", true),
            ("*.example.org", "db.example.net", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(g, t), m, "{g} {t}");
        }
    }

    fn fleet() -> (Store, Inventory) {
        apply_all(&[
            ev(Alive::new("web1.example.net", "server", "1.0", Some(300)), 1000),
            ev(Alive::new("web2.example.net", "server", "1.1", Some(300)), 1000),
            ev(Alive::new("web3.example.net", "server", "1.1", Some(300)), 100),
            ev(Startup::new("db1.example.net", "provision_mode_server", "0.9"), 1000),
            ev(Shutdown::new("db2.example.net", "server"), 1000),
            ev(Alive::new("old.example.net", "server", "0.1", Some(300)), -90_000),
        ])
    }

    #[test]
    fn list_filters_counts_and_versions() {
        let (_s, inv) = fleet();
        let now = at(1100);
        let ids = |f: NodeFilter| inv.list(&f, now).unwrap().into_iter().map(|n| n.node.identity).collect::<Vec<_>>();
        assert_eq!(ids(NodeFilter::default()).len(), 6);
        assert_eq!(
            ids(NodeFilter { status: Some(Status::Alive), ..Default::default() }),
            ["db1.example.net", "web1.example.net", "web2.example.net"]
        );
        assert_eq!(ids(NodeFilter { status: Some(Status::Missing), ..Default::default() }), ["web3.example.net"]);
        assert_eq!(
            ids(NodeFilter { version: Some("1.1".into()), ..Default::default() }),
            ["web2.example.net", "web3.example.net"]
        );
        assert_eq!(
            ids(NodeFilter { component: Some("provision_mode_server".into()), ..Default::default() }),
            ["db1.example.net"]
        );
        assert_eq!(
            ids(NodeFilter { identity: Some("web*".into()), limit: Some(2), ..Default::default() }),
            ["web1.example.net", "web2.example.net"]
        );
        assert_eq!(
            ids(NodeFilter { identity: Some("*2.example.net".into()), ..Default::default() }),
            ["db2.example.net", "web2.example.net"]
        );
        let s = inv.summary(now).unwrap();
        assert_eq!(s.total, 6);
        assert_eq!(s.status, StatusCounts { alive: 3, missing: 1, shutdown: 1, expired: 1 });
        assert_eq!(s.checkpoint, 6);
        let v = serde_json::to_value(&s.versions).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"server": {"1.0": 1, "1.1": 2, "unknown": 1}, "provision_mode_server": {"0.9": 1}}),
            "expired nodes are not in the versions"
        );
        assert_eq!(inv.counts(now).unwrap().get(Status::Expired), 1);
    }

    async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let status: u16 = text[9..12].parse().unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        // Bodies may be chunked; axum's JSON responses carry a content-length.
        assert!(head.to_ascii_lowercase().contains("content-length"), "{head}");
        (status, serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.into())))
    }

    #[tokio::test]
    async fn http_api_serves_nodes_and_summary() {
        let (_s, inv) = fleet();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, inv, async {
            let _ = stopped.await;
        }));
        // Handlers compute statuses with the real clock, so check shapes and the filters that
        // do not depend on it; statuses are covered above with a fixed clock.
        let (code, body) = http_get(addr, "/api/nodes?component=provision_mode_server").await;
        assert_eq!(code, 200);
        assert_eq!(body[0]["identity"], "db1.example.net");
        assert_eq!(body[0]["version"], "0.9");
        assert!(body[0]["status"].is_string());
        let (code, body) = http_get(addr, "/api/nodes?identity=web*&version=1.1").await;
        assert_eq!(code, 200);
        assert_eq!(body.as_array().unwrap().len(), 2);
        let (code, body) = http_get(addr, "/api/nodes/db2.example.net").await;
        assert_eq!((code, body["shutdown"].as_bool()), (200, Some(true)));
        let (code, body) = http_get(addr, "/api/nodes/nope").await;
        assert_eq!(code, 404);
        assert!(body["error"].as_str().unwrap().contains("nope"));
        let (code, _) = http_get(addr, "/api/nodes?status=sleeping").await;
        assert_eq!(code, 400);
        let (code, body) = http_get(addr, "/api/summary").await;
        assert_eq!(code, 200);
        assert_eq!(body["total"], 6);
        assert_eq!(body["checkpoint"], 6);
        assert!(body["status"]["alive"].is_u64() && body["versions"]["server"].is_object());
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn projector_builds_the_inventory_from_the_lifecycle_stream() {
        let dir = tempfile::tempdir().unwrap();
        let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("bb")).unwrap());
        chorus_producers::streams::ensure_platform_streams(&*b, &Default::default()).await.unwrap();
        let records = [
            ev(Startup::new("a", "server", "1"), 0),
            ev(Alive::new("a", "server", "1", Some(60)), 60),
            ev(Startup::new("b", "server", "2"), 0),
        ];
        let messages = records.iter().map(|r| chorus_producers::emitter::to_message(r).unwrap()).collect();
        b.publish_batch(messages).await.unwrap();
        let store = Store::temporary().unwrap();
        let mut p = Inventory::projector(b.clone(), &store).unwrap();
        assert_eq!(p.catch_up().await.unwrap().checkpoint, 3);
        let inv = Inventory::open(&store, StatusPolicy::default()).unwrap().with_progress(p.progress());
        let s = inv.summary(at(100)).unwrap();
        assert_eq!((s.total, s.status.alive, s.checkpoint), (2, 2, 3));
        assert_eq!(s.projection.unwrap().lag, 0);
    }
}
