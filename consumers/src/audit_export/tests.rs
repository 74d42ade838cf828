//! The exporter end to end on an embedded backbone: JSON lines and an HEC that goes down.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::Message;
use chorus_platform::to_message;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_schemas::subject::CHORUS_DEADLETTER;
use chorus_schemas::{AuditAction, AuditRecord, EventRecord, RpcReply, RpcRequest};
use futures::StreamExt;

use super::*;
use chorus_runtime::Service as _;

async fn backbone(dir: &std::path::Path) -> Arc<dyn Backbone> {
    let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir).unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    b
}

/// Publishes `n` audit records and `n` RPC requests with replies; returns their ids.
async fn publish(b: &dyn Backbone, n: usize, tag: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut messages = Vec::new();
    for i in 0..n {
        let decision = if i % 3 == 0 { AuditAction::Deny } else { AuditAction::Allow };
        let mut request = serde_json::Map::new();
        request.insert("agent".into(), "service".into());
        request.insert("action".into(), "restart".into());
        let audit = EventRecord::new(AuditRecord::new("aaa1", "london", format!("up={tag}{i}"), decision, request), 1)
            .with_site("london");
        let req =
            RpcRequest::new(format!("up={tag}{i}"), "client1", "choria", "service", "restart", Default::default());
        let reply = RpcReply::new(&req, "node1", chorus_schemas::StatusCode::Ok, Default::default());
        for r in [audit, EventRecord::new(req, 1), EventRecord::new(reply, 2)] {
            ids.insert(r.id.clone());
            messages.push(to_message(&r).unwrap());
        }
    }
    b.publish_batch(messages).await.unwrap();
    ids
}

/// How long the exporter gets to reach a state.
const WITHIN: Duration = Duration::from_secs(60);

async fn wait_until(what: &str, ok: impl FnMut() -> bool) {
    chorus_testkit::eventually_true(what, WITHIN, ok).await
}

fn lines_ids(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("each line is JSON")["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn fast(mut c: ExportConfig) -> ExportConfig {
    c.batch_size = 7;
    c.fetch_wait = Duration::from_millis(50);
    c.backoff = Backoff::doubling(Duration::from_millis(10), Duration::from_millis(100));
    c
}

#[tokio::test]
async fn jsonl_gets_every_record_and_malformed_ones_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let b = backbone(&dir.path().join("store")).await;
    let mut expected = publish(&*b, 20, "a").await;
    // A record that does not decode and one of a type the export does not take.
    b.publish(Message::new("bad-1", "chorus.audit.deny.london", &b"{not json"[..])).await.unwrap();
    let alive = EventRecord::new(chorus_schemas::lifecycle::Alive::new("n1", "server", "1", None), 1);
    b.publish(Message::new(alive.id.clone(), "chorus.rpc.request.choria.x", alive.encode())).await.unwrap();

    let path = dir.path().join("audit.jsonl");
    let config = fast(ExportConfig::new(SinkConfig::Jsonl(JsonlConfig { path: path.clone() })));
    let mut exporter = AuditExport::start(b.clone(), config.clone(), Shutdown::new()).await.unwrap();
    wait_until("all records", || lines_ids(&path).len() >= expected.len()).await;
    wait_until("dead letters", || exporter.stats().dead_lettered.get() == 2).await;
    exporter.stop().await.unwrap();

    // Restarted, it resumes: only the new records are appended.
    expected.extend(publish(&*b, 5, "b").await);
    let mut exporter = AuditExport::start(b.clone(), config, Shutdown::new()).await.unwrap();
    wait_until("new records", || lines_ids(&path).len() >= expected.len()).await;
    let stats = exporter.stats().snapshot();
    exporter.stop().await.unwrap();
    let got = lines_ids(&path);
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(got.len(), expected.len(), "no duplicates without failures");
    assert_eq!(stats.exported, 15);

    let mut letters = Vec::new();
    let mut replay = b.replay(CHORUS_DEADLETTER, Default::default()).await.unwrap();
    while let Some(m) = replay.next().await {
        letters.push(DeadLetter::from_message(&m.unwrap()).unwrap());
    }
    letters.sort_by_key(|l| l.stream.clone());
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!((letters[0].stream.as_str(), letters[0].code.as_str()), ("CHORUS_AUDIT", "not_json"));
    assert_eq!(letters[0].origin, "audit-export");
    assert_eq!(letters[0].payload.as_deref(), Some("{not json"));
    assert_eq!((letters[1].stream.as_str(), letters[1].code.as_str()), ("CHORUS_RPC", "unexpected_type"));
}

/// An HEC that is down for its first `down` requests, then stores events by id.
#[derive(Default)]
struct FlakyHec {
    down: AtomicUsize,
    ids: Mutex<Vec<String>>,
}

async fn flaky(
    axum::extract::State(hec): axum::extract::State<Arc<FlakyHec>>,
    body: String,
) -> (axum::http::StatusCode, &'static str) {
    if hec.down.load(Ordering::SeqCst) > 0 {
        hec.down.fetch_sub(1, Ordering::SeqCst);
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, r#"{"text":"Server is busy","code":9}"#);
    }
    for v in serde_json::Deserializer::from_str(&body).into_iter::<serde_json::Value>() {
        hec.ids.lock().unwrap().push(v.unwrap()["event"]["id"].as_str().unwrap().to_owned());
    }
    (axum::http::StatusCode::OK, r#"{"text":"Success","code":0}"#)
}

#[tokio::test]
async fn hec_outage_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = backbone(dir.path()).await;
    let hec = Arc::new(FlakyHec { down: AtomicUsize::new(5), ..Default::default() });
    let app =
        axum::Router::new().route("/services/collector/event", axum::routing::post(flaky)).with_state(hec.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let expected = publish(&*b, 10, "h").await;
    let mut exporter = AuditExport::start(
        b.clone(),
        fast(ExportConfig::new(SinkConfig::Hec(HecConfig::new(url, "t")))),
        Shutdown::new(),
    )
    .await
    .unwrap();
    wait_until("every record at HEC", || {
        hec.ids.lock().unwrap().iter().collect::<BTreeSet<_>>().len() >= expected.len()
    })
    .await;
    wait_until("every record acknowledged", || exporter.stats().exported.get() == expected.len() as u64).await;
    let stats = exporter.stats().snapshot();
    exporter.stop().await.unwrap();
    assert_eq!(hec.ids.lock().unwrap().iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(stats.retries >= 5, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0);
    assert!(stats.connects == 0 && stats.resent == 0);
    let metrics = ExportStats::default().encode();
    assert!(metrics.contains("chorus_audit_export_exported_total 0"), "{metrics}");
}

#[test]
fn recent_keys_are_bounded() {
    let mut r = Recent::new(2);
    let k = |s: u64| -> Key { (Arc::from("S"), s) };
    r.insert(k(1));
    r.insert(k(2));
    r.insert(k(2));
    assert!(r.contains(&k(1)) && r.contains(&k(2)));
    r.insert(k(3));
    assert!(!r.contains(&k(1)) && r.contains(&k(3)));
}
