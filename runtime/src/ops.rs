//! The operations endpoints every Chorus service serves: `/metrics` (the Prometheus text
//! format, or OpenMetrics where the scraper's `Accept` asks for it; see
//! [`crate::exposition`]) and `/healthz` (JSON; 503 while any part is unhealthy).
//!
//! A service hands [`Ops`] the parts it is made of, each an [`Observable`]: its health, and
//! the metrics it adds to a registry built fresh at every scrape (so values computed from a
//! store or the clock, such as nodes by status, are as of the scrape). A process running
//! several services (`chorus up`) serves them all from one router.
//!
//! `/healthz` answers
//!
//! ```json
//! {"healthy": false, "services": [{"name": "provisioner", "healthy": false, "reason": "task consume: ...", "caught_up": true}]}
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::service::{BoxError, Health, Shutdown};

/// The content type of `/metrics` in OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str = crate::exposition::OPENMETRICS;

/// A part of a service seen from outside: its health and its metrics.
#[async_trait]
pub trait Observable: Send + Sync {
    /// The name `/healthz` lists it under.
    fn name(&self) -> &str;

    /// Its health now.
    fn health(&self) -> Health;

    /// Adds its metrics, as they are now, to `registry` (a fresh one per scrape). The
    /// default adds none.
    async fn collect(&self, _registry: &mut Registry) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Registers monotonic counts, as they are now, as counters of `registry`: the one way a
/// part turns its counters snapshot into metrics.
pub fn register_counters(registry: &mut Registry, counters: &[(&str, &str, u64)]) {
    for (name, help, value) in counters {
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        counter.inc_by(*value);
        registry.register(*name, *help, counter);
    }
}

/// Registers values as they are now (queues, backlogs, counts of things) as gauges of
/// `registry`: the one way a part turns a level into a metric.
pub fn register_gauges(registry: &mut Registry, gauges: &[(&str, &str, u64)]) {
    for (name, help, value) in gauges {
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        gauge.set(i64::try_from(*value).unwrap_or(i64::MAX));
        registry.register(*name, *help, gauge);
    }
}

/// The parts one `/metrics` and `/healthz` serve. Clones share the list, so a process can
/// add the parts it starts later (`chorus up`) to a router already serving.
#[derive(Clone, Default)]
pub struct Ops {
    parts: Arc<std::sync::RwLock<Vec<Arc<dyn Observable>>>>,
}

#[derive(Serialize)]
struct PartHealth<'a> {
    name: &'a str,
    #[serde(flatten)]
    health: Health,
}

impl Ops {
    /// No parts yet: healthy, no metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a part.
    pub fn with(self, part: Arc<dyn Observable>) -> Self {
        self.add(part);
        self
    }

    /// Adds a part, also to every clone of this `Ops` (and so to a router serving it).
    pub fn add(&self, part: Arc<dyn Observable>) {
        self.parts.write().unwrap_or_else(|e| e.into_inner()).push(part);
    }

    /// The parts as they are now.
    fn parts(&self) -> Vec<Arc<dyn Observable>> {
        self.parts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every part's health, and whether all are healthy.
    pub fn health(&self) -> (bool, Vec<(String, Health)>) {
        let all: Vec<(String, Health)> = self.parts().iter().map(|p| (p.name().to_string(), p.health())).collect();
        (all.iter().all(|(_, h)| h.healthy), all)
    }

    /// The metrics exposition of every part, in the OpenMetrics text format.
    pub async fn encode(&self) -> Result<String, BoxError> {
        let mut registry = Registry::default();
        for part in &self.parts() {
            part.collect(&mut registry).await?;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }

    /// `/metrics` and `/healthz`; merge a service's own routes into it.
    pub fn router(&self) -> Router {
        Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(self.clone())
    }

    /// Serves [`Ops::router`] (merged with `extra`) on `listener` until `shutdown`.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        extra: Router,
        shutdown: Shutdown,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router().merge(extra)).with_graceful_shutdown(shutdown.requested_owned()).await
    }
}

async fn metrics(State(ops): State<Ops>, headers: axum::http::HeaderMap) -> Response {
    use crate::exposition::{prometheus_text, wants_openmetrics, PROMETHEUS_TEXT};
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match ops.encode().await {
        Ok(text) if wants_openmetrics(accept) => {
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response()
        }
        Ok(text) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], prometheus_text(&text)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz(State(ops): State<Ops>) -> Response {
    let (healthy, parts) = ops.health();
    let services: Vec<PartHealth<'_>> = parts.iter().map(|(name, h)| PartHealth { name, health: h.clone() }).collect();
    let code = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(serde_json::json!({ "healthy": healthy, "services": services }))).into_response()
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    struct Part {
        name: &'static str,
        healthy: bool,
        count: u64,
    }

    #[async_trait]
    impl Observable for Part {
        fn name(&self) -> &str {
            self.name
        }
        fn health(&self) -> Health {
            if self.healthy {
                Health::ok().with("lag", 0)
            } else {
                Health::failing("stream missing")
            }
        }
        async fn collect(&self, registry: &mut Registry) -> Result<(), BoxError> {
            let c = Counter::<u64>::default();
            c.inc_by(self.count);
            registry.sub_registry_with_prefix("chorus").register(format!("{}_events", self.name), "Events", c);
            Ok(())
        }
    }

    async fn get(ops: &Ops, path: &str) -> (StatusCode, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let server = tokio::spawn({
            let ops = ops.clone();
            let shutdown = shutdown.clone();
            async move { ops.serve(listener, Router::new(), shutdown).await }
        });
        let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let body = response.text().await.unwrap();
        shutdown.request();
        server.await.unwrap().unwrap();
        (status, body)
    }

    #[tokio::test]
    async fn metrics_of_every_part_and_health_that_fails_with_any_part() {
        let good = Arc::new(Part { name: "views", healthy: true, count: 3 });
        let ops = Ops::new().with(good.clone()).with(Arc::new(Part { name: "copier", healthy: true, count: 5 }));
        let (status, text) = get(&ops, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("chorus_views_events_total 3"), "{text}");
        assert!(text.contains("chorus_copier_events_total 5"), "{text}");
        assert!(text.contains("# TYPE chorus_views_events_total counter"), "{text}");
        assert!(!text.contains("# EOF"), "plain text unless OpenMetrics is asked for: {text}");
        let (status, body) = get(&ops, "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["services"][0], serde_json::json!({"name": "views", "healthy": true, "lag": 0}));

        let ops = ops.with(Arc::new(Part { name: "broken", healthy: false, count: 0 }));
        let (status, body) = get(&ops, "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["healthy"], false);
        assert_eq!(body["services"][2]["reason"], "stream missing");
    }
}
