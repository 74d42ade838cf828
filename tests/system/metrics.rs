//! `/metrics` as monitoring stacks take it: the Prometheus text format unless the scraper
//! asks for OpenMetrics, accepted by `promtool check metrics` (Debian's `prometheus`).

use std::process::{Command, Stdio};
use std::time::Duration;

use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_testkit::eventually;
use chorus_testkit::nats::NatsServer;

use crate::replicate::{js, publish_all, replicator_process, startups, wait_for_count};

/// `GET /metrics` with an `Accept` header: content type and body.
async fn scrape(addr: std::net::SocketAddr, accept: &str) -> Result<(String, String), String> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .header("Accept", accept)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    Ok((kind, response.text().await.map_err(|e| e.to_string())?))
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package, installed by scripts/setup)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// Scrapes `addr` until `wanted` is exposed, then checks both formats.
async fn check_endpoint(addr: std::net::SocketAddr, wanted: &str) {
    let (kind, text) = eventually(&format!("{wanted} on {addr}/metrics"), Duration::from_secs(60), || async move {
        let (kind, text) = scrape(addr, "text/plain").await?;
        if text.contains(wanted) {
            Ok((kind, text))
        } else {
            Err(text)
        }
    })
    .await;
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    promtool(&text).unwrap_or_else(|e| panic!("promtool check metrics refuses {addr}/metrics: {e}\n{text}"));
    let (kind, open) = scrape(addr, "application/openmetrics-text; version=1.0.0").await.unwrap();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(open.ends_with("# EOF\n"), "{open}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metrics_endpoint_serves_prometheus_text_that_promtool_accepts() {
    // chorus up: the dashboard, inventory and the platform's services in one process.
    let data = tempfile::tempdir().unwrap();
    let port = chorus_testkit::nats::free_port().unwrap();
    let mut up = Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
        .args(["up", "--nodes", "20", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data.path())
        .env("CHORUS_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    check_endpoint(format!("127.0.0.1:{port}").parse().unwrap(), "chorus_nodes").await;
    up.kill().unwrap();
    up.wait().unwrap();

    // The replicator, whose counters OpenMetrics names differently.
    let (src, dst) = (NatsServer::start().unwrap(), NatsServer::start().unwrap());
    let (source, target) = (js(&src.url()).await, js(&dst.url()).await);
    ensure_platform_streams(&*source, &StreamLimits::default()).await.unwrap();
    ensure_platform_streams(&*target, &StreamLimits::default()).await.unwrap();
    publish_all(&*source, startups("m", 0..100, None)).await;
    let (_state, mut replicator, ops) = replicator_process(&src.url(), &dst.url());
    wait_for_count(&*target, CHORUS_LIFECYCLE, 100, Duration::from_secs(60)).await;
    check_endpoint(ops, "chorus_replicator_copied_total").await;
    replicator.kill().unwrap();
    replicator.wait().unwrap();
}
