//! The version dashboard, loaded in headless Chromium, shows the versions of simulated nodes:
//! simulator → embedded streams → inventory projection → dashboard page, JSON API and metrics.

use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::Backbone;
use chorus_consumers::dashboard::{Views, ViewsOptions};
use chorus_consumers::inventory::StatusPolicy;
use chorus_platform::BackboneSink;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_producers::simulator::{SimConfig, Simulator};
use chorus_runtime::{Service as _, Shutdown};
use chorus_testkit::chromium::wait_for_dom;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium_shows_the_versions_of_simulated_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let backbone: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("streams")).unwrap());
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let options = ViewsOptions {
        state: dir.path().join("views"),
        listen: "127.0.0.1:0".parse().unwrap(),
        rebuild: false,
        policy: StatusPolicy::default(),
        streams: Default::default(),
    };
    let mut views = Views::start(backbone.clone(), &options, None, Shutdown::new()).await.unwrap();
    let url = views.url().to_string();

    // 700 nodes over three versions, one of them an odd string the page must not mangle.
    let mut config = SimConfig::new(700);
    config.versions = vec!["1.4.2".into(), "1.5.0".into(), "2.0.0-rc.1+build.7".into()];
    let sim = Simulator::new(config, Arc::new(BackboneSink(backbone.clone()))).unwrap();
    sim.startup_storm().await.unwrap();
    let expected: Vec<(String, usize)> = ["1.4.2", "1.5.0", "2.0.0-rc.1+build.7"]
        .iter()
        .map(|v| (v.to_string(), (0..700).filter(|&i| sim.version_of(i) == *v).count()))
        .collect();

    let (dom, ok) = tokio::task::spawn_blocking({
        let url = url.clone();
        let expected = expected.clone();
        move || {
            wait_for_dom(&url, Duration::from_secs(60), |dom| {
                dom.contains(r#"id="total">700<"#)
                    && expected.iter().all(|(v, n)| dom.contains(&format!(r#"data-version="{v}" data-count="{n}""#)))
            })
        }
    })
    .await
    .unwrap()
    .expect("chromium runs");
    assert!(ok, "the page never showed 700 nodes with {expected:?}:\n{dom}");
    assert!(dom.contains(r#"id="status-alive">700<"#), "{dom}");
    assert!(dom.contains(r#"data-stream="CHORUS_LIFECYCLE""#), "event rates are shown:\n{dom}");

    // The same figures through /metrics.
    let metrics = http_get(&url, "metrics").await;
    for (v, n) in &expected {
        assert!(
            metrics.contains(&format!(r#"chorus_node_versions{{component="server",version="{v}"}} {n}"#)),
            "{metrics}"
        );
    }
    assert!(metrics.contains(r#"chorus_nodes{status="alive"} 700"#), "{metrics}");
    let health = http_get(&url, "healthz").await;
    assert!(health.starts_with("HTTP/1.1 200") && health.contains(r#""healthy":true"#), "{health}");

    views.stop().await.unwrap();
}

async fn http_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
