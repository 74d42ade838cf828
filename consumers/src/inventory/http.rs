//! The inventory's JSON API.

use std::future::Future;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};

use super::node::NodeView;
use super::query::{Inventory, NodeFilter, Summary};
use crate::projection::ProjectionError;

/// The inventory's JSON API:
///
/// * `GET /api/nodes?status=&component=&version=&identity=&limit=` — [`Inventory::list`]
/// * `GET /api/nodes/{identity}` — [`Inventory::get`], 404 when unknown
/// * `GET /api/summary` — [`Inventory::summary`]
/// * `GET /api/metadata/{identity}` — [`Inventory::metadata`], 404 when it never registered
/// * `POST /api/discover` with [`DiscoverRequest`] — [`Inventory::discover`]; a filter that
///   does not compile is a 400 naming the problem
///
/// Queries scan the store, so they run on the blocking pool, not on the async workers.
pub fn router(inventory: Inventory) -> Router {
    Router::new()
        .route("/api/nodes", get(list_nodes))
        .route("/api/nodes/{identity}", get(show_node))
        .route("/api/summary", get(summary))
        .route("/api/metadata/{identity}", get(show_metadata))
        .route("/api/checks", get(list_checks))
        .route("/api/watchers", get(list_watchers))
        .route("/api/discover", axum::routing::post(discover))
        .with_state(inventory)
}

/// Query of `/api/checks`: `status` (`CRITICAL`, ...), `node` (a glob).
#[derive(serde::Deserialize)]
struct ChecksQuery {
    status: Option<String>,
    node: Option<String>,
}

/// The latest result of every check, with counts by status: `{"counts": {...}, "checks": [...]}`.
async fn list_checks(
    State(inventory): State<Inventory>,
    axum::extract::Query(q): axum::extract::Query<ChecksQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let all =
        inventory.checks(q.node.as_deref()).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for c in &all {
        *counts.entry(c.status.clone()).or_default() += 1;
    }
    let checks: Vec<_> =
        all.into_iter().filter(|c| q.status.as_deref().is_none_or(|s| c.status.eq_ignore_ascii_case(s))).collect();
    Ok(Json(serde_json::json!({ "counts": counts, "checks": checks })))
}

/// Query of `/api/watchers`: `type` (`kv`, `nagios`, ...), `node` (a glob).
#[derive(serde::Deserialize)]
struct WatchersQuery {
    #[serde(rename = "type")]
    watcher_type: Option<String>,
    node: Option<String>,
}

/// The latest state of every watcher, with counts by type and state:
/// `{"counts": {"kv": {"changed": 3}, ...}, "watchers": [...]}`.
async fn list_watchers(
    State(inventory): State<Inventory>,
    axum::extract::Query(q): axum::extract::Query<WatchersQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let all = inventory
        .watchers(q.node.as_deref())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut counts = std::collections::BTreeMap::<String, std::collections::BTreeMap<String, u64>>::new();
    for w in &all {
        *counts.entry(w.watcher_type.clone()).or_default().entry(w.state.clone()).or_default() += 1;
    }
    let watchers: Vec<_> =
        all.into_iter().filter(|w| q.watcher_type.as_deref().is_none_or(|t| w.watcher_type == t)).collect();
    Ok(Json(serde_json::json!({ "counts": counts, "watchers": watchers })))
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

/// The body of `POST /api/discover`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverRequest {
    /// The request's filter, as it travels with the request.
    #[serde(default)]
    pub filter: chorus_schemas::rpc::Filter,
    /// The collective to discover in (default `choria`).
    #[serde(default = "default_collective")]
    pub collective: String,
}

fn default_collective() -> String {
    "choria".into()
}

async fn show_metadata(
    State(inv): State<Inventory>,
    Path(identity): Path<String>,
) -> Result<Json<super::NodeMetadata>, ApiError> {
    let id = identity.clone();
    query(inv, move |inv, _| inv.metadata(&id))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("node {identity:?} has not registered")))
}

async fn discover(
    State(inv): State<Inventory>,
    Json(request): Json<DiscoverRequest>,
) -> Result<Json<super::Discovered>, ApiError> {
    let filter = chorus_rpc::CompiledFilter::checked(&request.filter)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    query(inv, move |inv, now| inv.discover(&filter, &request.collective, now)).await.map(Json)
}
