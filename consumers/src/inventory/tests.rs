use std::sync::Arc;
use std::time::Duration;

use super::codec;
use super::node::*;
use super::query::*;
use super::view::*;
use super::*;
use crate::projection::{ProjectorOptions, Store, Txn, View};
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::Backbone;
use chorus_schemas::lifecycle::{Alive, Governor, GovernorEventType, Provisioned, Shutdown, Startup, Upgraded};
use chorus_schemas::{Event, EventRecord, Lifecycle};
use chrono::{DateTime, Utc};
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
        stopped.await.ok();
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
    chorus_platform::ensure_platform_streams(&*b, &Default::default()).await.unwrap();
    let records = [
        ev(Startup::new("a", "server", "1"), 0),
        ev(Alive::new("a", "server", "1", Some(60)), 60),
        ev(Startup::new("b", "server", "2"), 0),
    ];
    let messages = records.iter().map(|r| chorus_platform::to_message(r).unwrap()).collect();
    b.publish_batch(messages).await.unwrap();
    let store = Store::temporary().unwrap();
    // The fixture's times (T0) are ahead of the real clock that stores the events.
    let trust_the_fixture =
        ProjectorOptions { max_clock_skew: Duration::from_secs(10 * 365 * 86_400), ..Default::default() };
    let mut p = Inventory::projector(b.clone(), &store).unwrap().with_options(trust_the_fixture);
    assert_eq!(p.catch_up().await.unwrap().checkpoint, 3);
    let inv = Inventory::open(&store, StatusPolicy::default()).unwrap().with_progress(p.progress());
    let s = inv.summary(at(100)).unwrap();
    assert_eq!((s.total, s.status.alive, s.checkpoint), (2, 2, 3));
    assert_eq!(s.projection.unwrap().lag, 0);
}
