//! `/metrics` (Prometheus text format) and `/healthz` (JSON; 503 when a copier has been
//! failing for a while) of a running replicator.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::metrics::Metrics;

/// The router; serve it with `axum::serve`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(prometheus)).route("/healthz", get(health)).with_state(metrics)
}

async fn prometheus(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode())
}

async fn health(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let copiers = m.health();
    let healthy = copiers.iter().all(|c| c.healthy);
    let code = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(serde_json::json!({ "healthy": healthy, "copiers": copiers })))
}
