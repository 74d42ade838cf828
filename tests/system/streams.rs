//! Operators own the streams: `chorus streams create|info|edit` size them on purpose, and no
//! other Chorus command changes an existing stream (issue [10]).

use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::Backbone;
use chorus_platform::{ensure_platform_streams, platform_streams, StreamLimits};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_testkit::nats::NatsCluster;

fn chorus(args: &[&str]) -> String {
    let (ok, said) = crate::cli::chorus(args);
    assert!(ok, "chorus {args:?} failed: {said}");
    said
}

/// Every platform stream's replicas and max age, as the broker has them.
async fn sizes(b: &dyn Backbone) -> Vec<(String, usize, Option<Duration>)> {
    let mut out = Vec::new();
    for cfg in platform_streams(&StreamLimits::default()) {
        let c = b.stream_config(&cfg.name).await.unwrap();
        out.push((c.name, c.replicas, c.max_age));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_sized_by_the_operator_keep_their_replicas_after_every_chorus_command() {
    let cluster = NatsCluster::start(3).unwrap();
    let urls = cluster.url_list();
    let said = chorus(&["streams", "create", "--nats", &urls, "--replicas", "3", "--max-age", "30d"]);
    assert_eq!(said.matches(": created (replicas 3, max age 30days").count(), 7, "{said}");
    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::from_url_list(&urls)).await.unwrap());
    let month = Some(Duration::from_secs(30 * 86_400));
    let sized = sizes(&*b).await;
    assert!(sized.iter().all(|(_, r, age)| *r == 3 && *age == month), "{sized:?}");

    // Every command that sets up streams, with its defaults (1 replica, no max age).
    chorus(&["simulate", "--nats", &urls, "--nodes", "20", "--once"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lifecycle.jsonl");
    chorus(&["replay", CHORUS_LIFECYCLE, "--nats", &urls, "--out", file.to_str().unwrap()]);
    chorus(&["restore", file.to_str().unwrap(), "--nats", &urls]);
    let said = chorus(&["streams", "create", "--nats", &urls]);
    assert_eq!(said.matches("exists, adopted as it is").count(), 7, "{said}");
    assert!(said.contains("replicas 3 here, 1 asked"), "{said}");
    let drifts = ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap().drifts;
    assert_eq!(drifts.iter().filter(|d| d.field == "replicas").count(), 7, "reported: {drifts:?}");
    chorus_platform::deadletter::ensure_stream(&*b).await.unwrap();
    assert_eq!(sizes(&*b).await, sized, "no command changed a stream");

    // Only `streams edit` changes one, and only what it is given.
    let said = chorus(&["streams", "edit", "CHORUS_AUDIT", "--nats", &urls, "--max-age", "400d"]);
    assert!(said.contains("CHORUS_AUDIT: replicas 3, max age 30days"), "{said}");
    let audit = b.stream_config("CHORUS_AUDIT").await.unwrap();
    assert_eq!((audit.replicas, audit.max_age), (3, Some(Duration::from_secs(400 * 86_400))));
    let info = chorus(&["streams", "info", "--nats", &urls, "--json"]);
    let lines: Vec<serde_json::Value> = info.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(lines.len(), 7, "{info}");
    assert!(lines.iter().all(|l| l["config"]["replicas"] == 3 && l["exists"] == true), "{info}");
    let lifecycle = lines.iter().find(|l| l["stream"] == CHORUS_LIFECYCLE).unwrap();
    assert_eq!(lifecycle["messages"], 20, "the startup storm, restored once: {info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_commands_say_what_is_missing_and_refuse_what_they_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let said = chorus(&["streams", "info", "--data", data]);
    assert_eq!(said.matches("missing: `chorus streams create` creates it").count(), 7, "{said}");
    let (ok, said) = crate::cli::chorus(&["streams", "edit", "CHORUS_AUDIT", "--data", data]);
    assert!(!ok && said.contains("nothing to change"), "{said}");
    let (ok, said) = crate::cli::chorus(&["streams", "edit", "NOPE", "--data", data, "--max-age", "1d"]);
    assert!(!ok && said.contains("NOPE is not a platform stream (CHORUS_LIFECYCLE"), "{said}");
    let (ok, said) = crate::cli::chorus(&["streams", "edit", "CHORUS_AUDIT", "--data", data, "--max-age", "1d"]);
    assert!(!ok && said.contains("CHORUS_AUDIT does not exist"), "{said}");
    chorus(&["streams", "create", "--data", data, "--max-age", "7d"]);
    let said = chorus(&["streams", "edit", "all", "--data", data, "--max-age", "14d"]);
    assert_eq!(said.matches("max age 7days").count(), 7, "{said}");
    let info = chorus(&["streams", "info", "--data", data]);
    assert_eq!(info.matches("14days").count(), 7, "{info}");
}
