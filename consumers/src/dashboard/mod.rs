//! The version dashboard: one web page (versions per component as a chart, node counts by
//! status, event rates), its JSON API and Prometheus `/metrics`, all read from the inventory
//! view and the streams' counters.
//!
//! The page is self-contained (inline CSS, JavaScript and SVG; no CDN), because Chorus runs on
//! management networks without internet access, and it polls the JSON API so it keeps
//! filling while nodes arrive.
//!
//! Routes: `/` (page), `/api/summary`, `/api/nodes`, `/api/nodes/{identity}` (from
//! [`crate::inventory::router`]), `/api/rates`, `/api/events`; `/metrics` and `/healthz` come
//! from the runtime's ops router ([`Views`] serves them together). Where the platform gives
//! the dashboard an RPC client (`chorus up`), [`Actions`] adds `/rpc`, a page to run an
//! action on a filter and watch the replies arrive.

mod actions;
mod rates;
mod views;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::inventory::{Inventory, Status};
pub use actions::{ActionRequest, Actions};
pub use rates::{RateSample, StreamRates};
pub use views::{Views, ViewsError, ViewsOptions};

/// What the dashboard reads.
#[derive(Clone)]
pub struct Dashboard {
    inventory: Inventory,
    rates: StreamRates,
    backbone: Option<std::sync::Arc<dyn chorus_backbone::Backbone>>,
}

impl Dashboard {
    /// The dashboard of `inventory`, with the rates of `rates`.
    pub fn new(inventory: Inventory, rates: StreamRates) -> Self {
        Dashboard { inventory, rates, backbone: None }
    }

    /// Also serves `/api/events` (filtered events as JSON lines, optionally following) from
    /// `backbone`: how `chorus events tail --url` reads a running `chorus up`, whose embedded
    /// store no second process can open.
    pub fn with_events(mut self, backbone: std::sync::Arc<dyn chorus_backbone::Backbone>) -> Self {
        self.backbone = Some(backbone);
        self
    }

    /// The inventory it shows.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// The dashboard's own routes (page and JSON API); `/metrics` and `/healthz` are the
    /// ops router's ([`Views`]).
    pub fn router(&self) -> Router {
        let own = Router::new()
            .route("/", get(page))
            .route("/api/rates", get(rates))
            .route("/api/events", get(events))
            .with_state(self.clone());
        own.merge(crate::inventory::router(self.inventory.clone()))
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// Query of `/api/events`: `kind` and `type` comma separated, `node` a glob, `since` an
/// RFC 3339 time or a duration back from now (`10m`), `follow` true to keep streaming.
#[derive(serde::Deserialize)]
struct EventsQuery {
    kind: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
    node: Option<String>,
    since: Option<String>,
    #[serde(default)]
    follow: bool,
}

fn split(list: Option<String>) -> Vec<String> {
    list.map(|l| l.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()).unwrap_or_default()
}

async fn events(State(d): State<Dashboard>, axum::extract::Query(q): axum::extract::Query<EventsQuery>) -> Response {
    let Some(backbone) = d.backbone.clone() else {
        return (StatusCode::NOT_FOUND, "events are not served here").into_response();
    };
    let since = match q.since.as_deref().map(crate::events::parse_since).transpose() {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let filter =
        crate::events::EventFilter { kinds: split(q.kind), types: split(q.ty), node: q.node, since, follow: q.follow };
    if let Err(e) = filter.validate() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    let stream = match crate::events::tail(backbone, filter).await {
        Ok(s) => s,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    use futures::StreamExt;
    let lines = stream.map(|item| {
        item.map(|e| {
            let mut line = serde_json::to_vec(&e).unwrap_or_default();
            line.push(b'\n');
            bytes::Bytes::from(line)
        })
    });
    ([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(lines)).into_response()
}

async fn rates(State(d): State<Dashboard>) -> Json<Vec<RateSample>> {
    Json(d.rates.snapshot())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    component: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: String,
}

impl Dashboard {
    /// Registers the dashboard's metrics as they are now, computed at scrape time from the
    /// inventory (statuses depend on the clock, so they cannot be kept as counters).
    pub async fn register_metrics(&self, registry: &mut Registry) -> Result<(), chorus_runtime::BoxError> {
        let inventory = self.inventory.clone();
        let summary = tokio::task::spawn_blocking(move || inventory.summary(Utc::now())).await??;
        let registry = registry.sub_registry_with_prefix("chorus");
        let nodes = Family::<StatusLabel, Gauge>::default();
        for status in [Status::Alive, Status::Missing, Status::Shutdown, Status::Expired] {
            nodes.get_or_create(&StatusLabel { status: status.as_str().into() }).set(summary.status.get(status) as i64);
        }
        registry.register("nodes", "Nodes in the inventory by status", nodes);
        let versions = Family::<VersionLabels, Gauge>::default();
        for (component, by_version) in &summary.versions {
            for (version, n) in by_version {
                versions
                    .get_or_create(&VersionLabels { component: component.clone(), version: version.clone() })
                    .set(*n as i64);
            }
        }
        registry.register("node_versions", "Nodes (not expired) per component and version", versions);
        let checkpoint = Gauge::<i64>::default();
        checkpoint.set(summary.checkpoint as i64);
        registry.register(
            "inventory_checkpoint",
            "Last CHORUS_LIFECYCLE sequence applied to the inventory",
            checkpoint,
        );
        let messages = Family::<StreamLabel, Gauge>::default();
        let per_second = Family::<StreamLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        for r in self.rates.snapshot() {
            let l = StreamLabel { stream: r.stream.clone() };
            messages.get_or_create(&l).set(r.last_sequence as i64);
            per_second.get_or_create(&l).set(r.per_second);
        }
        registry.register("stream_last_sequence", "Highest sequence stored per stream", messages);
        registry.register(
            "stream_events_per_second",
            "Events stored per second, per stream, over the last minute",
            per_second,
        );
        Ok(())
    }
}
