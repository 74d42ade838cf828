//! `/metrics` (Prometheus text format) and `/healthz` of a running provisioner, so a platform
//! team can alert on failing attempts, a growing queue or a stopped provisioner.
//!
//! Metric names are `chorus_provisioner_<field of StatsSnapshot>` (counters with `_total`)
//! plus `chorus_provisioner_nodes{status}` from the state store.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Monitor, StatsSnapshot, StatusCounts};

/// The router; serve it with `axum::serve`.
pub fn router(monitor: Monitor) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/healthz", get(health)).with_state(monitor)
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    monitor: Monitor,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(monitor)).with_graceful_shutdown(shutdown).await
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// The exposition of `stats` and `counts`, in the OpenMetrics text format.
pub fn encode(stats: &StatsSnapshot, counts: &StatusCounts) -> String {
    let mut registry = Registry::with_prefix("chorus_provisioner");
    let counters: [(&str, &str, u64); 10] = [
        ("startups", "Provisioning-mode startup events read", stats.startups),
        ("duplicate_startups", "Startups skipped: their event was already served", stats.duplicate_startups),
        ("stale_startups", "Startups skipped: older than the node's state", stats.stale_startups),
        ("reprovisions", "Provisioned nodes that came back in provisioning mode", stats.reprovisions),
        ("provisioned_events", "Provisioned events read from the stream", stats.provisioned_events),
        ("provisioned", "Nodes this process provisioned", stats.provisioned),
        ("failed", "Attempts that failed", stats.failed),
        ("retries", "Attempts on nodes that had failed before", stats.retries),
        ("steps_ok", "Steps that succeeded", stats.steps_ok),
        ("dead_lettered", "Messages dead-lettered", stats.dead_lettered),
    ];
    for (name, help, value) in counters {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }
    let gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    registry.register("in_flight", "Nodes being provisioned now", gauge(stats.in_flight));
    registry.register("queued", "Nodes due and waiting for a free slot", gauge(stats.queued));
    let nodes = Family::<StatusLabel, Gauge>::default();
    for (status, n) in [("pending", counts.pending), ("failed", counts.failed), ("provisioned", counts.provisioned)] {
        nodes.get_or_create(&StatusLabel { status }).set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    registry.register("nodes", "Nodes in the provisioner's state by status", nodes);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

async fn counts(monitor: Monitor) -> Result<StatusCounts, Response> {
    match tokio::task::spawn_blocking(move || monitor.counts()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
    }
}

async fn metrics(State(monitor): State<Monitor>) -> Response {
    let stats = monitor.stats();
    match counts(monitor).await {
        Ok(c) => {
            ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], encode(&stats, &c))
                .into_response()
        }
        Err(r) => r,
    }
}

/// 200 while the provisioner runs, 503 once it stopped (a state store failure stops it).
/// `caught_up` tells whether it has read the stream's backlog (before that nothing is
/// provisioned, which is normal right after a start).
async fn health(State(monitor): State<Monitor>) -> Response {
    let running = monitor.running();
    let body = serde_json::json!({
        "healthy": running,
        "running": running,
        "caught_up": monitor.caught_up(),
        "in_flight": monitor.stats().in_flight,
        "queued": monitor.stats().queued,
    });
    let code = if running { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}
