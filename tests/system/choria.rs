//! Chorus beside a Choria broker with Choria Streams enabled (issue [10]): the broker already
//! has `CHORIA_EVENTS` (`choria.lifecycle.>`) and `CHORIA_MACHINE` (`choria.machine.>`), and
//! go-choria publishes without `Nats-Msg-Id`. Chorus's commands use those streams instead of
//! failing to create overlapping ones, change none of them, and every view applies each
//! event once, whoever published it and however often.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::time::Duration;

use bytes::Bytes;
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_testkit::eventually;
use chorus_testkit::nats::{free_port, NatsServer};

use crate::replicate::{count, js, link_yaml, spawn_replicator, try_http_get, wait_for_count};

fn chorus(args: &[&str]) -> String {
    let (ok, said) = crate::cli::chorus(args);
    assert!(ok, "chorus {args:?} failed: {said}");
    said
}

/// Runs `chorus ARGS`, which must succeed, and returns its standard output alone.
fn chorus_stdout(args: &[&str]) -> String {
    let output = Command::new(chorus_testkit::workspace_bin("chorus").expect("the chorus binary"))
        .args(args)
        .env("CHORUS_LOG", "warn")
        .output()
        .expect("chorus runs");
    assert!(output.status.success(), "chorus {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// A lifecycle event exactly as go-choria publishes it (its own JSON, no CloudEvents).
fn choria_event(kind: &str, identity: &str, id: &str, timestamp: i64, version: &str) -> (String, Vec<u8>) {
    let mut event = serde_json::json!({
        "protocol": format!("io.choria.lifecycle.v1.{kind}"),
        "id": id,
        "identity": identity,
        "component": "server",
        "timestamp": timestamp,
    });
    if kind != "shutdown" {
        event["version"] = version.into();
    }
    (format!("choria.lifecycle.event.{kind}.server"), serde_json::to_vec(&event).unwrap())
}

/// What the inventory must say of a node: events applied, last event, version.
type Oracle = BTreeMap<String, (u64, String, Option<String>)>;

/// The inventory as `chorus inventory list --json` prints it, in the oracle's terms.
fn as_oracle(nodes: &serde_json::Value) -> Oracle {
    nodes
        .as_array()
        .expect("a list of nodes")
        .iter()
        .map(|n| {
            let version = n["version"].as_str().map(String::from);
            (
                n["identity"].as_str().unwrap().to_string(),
                (n["events"].as_u64().unwrap(), n["last_event"].as_str().unwrap().to_string(), version),
            )
        })
        .collect()
}

fn spawn_dashboard(url: &str, listen: std::net::SocketAddr, data: &std::path::Path) -> Child {
    Command::new(chorus_testkit::workspace_bin("chorus").expect("the chorus binary"))
        .args(["dashboard", "--nats", url, "--listen", &listen.to_string(), "--data", data.to_str().unwrap()])
        .env("CHORUS_LOG", "warn")
        .spawn()
        .expect("spawn chorus dashboard")
}

async fn get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    let text = tokio::time::timeout(Duration::from_secs(5), try_http_get(addr, path))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| text.clone())?;
    Ok((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_choria_streams_every_event_is_applied_once_and_no_stream_is_changed() {
    let broker = NatsServer::start().unwrap();
    let url = broker.url();
    let dir = tempfile::tempdir().unwrap();

    // The dashboard starts before any stream exists: not ready, and says why.
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
    let mut dashboard = spawn_dashboard(&url, listen, &dir.path().join("dashboard"));
    eventually("the dashboard to say it is not ready", Duration::from_secs(5), || async move {
        match get(listen, "/healthz").await {
            Ok((503, body)) if body.contains("no stream holds the CHORUS_LIFECYCLE subjects") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Choria Streams, as go-choria's broker creates them (broker/network/network_jetstream.go).
    let client = async_nats::connect(&url).await.unwrap();
    let js_ctx = async_nats::jetstream::new(client);
    let day = Duration::from_secs(86_400);
    for (name, subjects) in [("CHORIA_EVENTS", "choria.lifecycle.>"), ("CHORIA_MACHINE", "choria.machine.>")] {
        js_ctx
            .create_stream(async_nats::jetstream::stream::Config {
                name: name.into(),
                subjects: vec![subjects.into()],
                max_age: day,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // go-choria's events: no Nats-Msg-Id; one twice; a changed copy under a known id; one
    // alive stamped ten years ahead, followed by the node's shutdown.
    let now = chrono::Utc::now().timestamp();
    let mut events = Vec::new();
    for i in 1..=5 {
        events.push(choria_event("startup", &format!("choria-{i}"), &format!("startup-{i}"), now - 100, "0.29.4"));
    }
    let twice = choria_event("alive", "choria-1", "alive-1", now - 50, "0.29.4");
    events.push(twice.clone());
    events.push(twice);
    events.push(choria_event("alive", "choria-2", "alive-2", now - 40, "0.29.4"));
    events.push(choria_event("alive", "choria-2", "alive-2", now - 40, "0.99.0")); // changed copy
    events.push(choria_event("alive", "choria-3", "alive-3", now + 10 * 365 * 86_400, "0.29.4"));
    // Shut down after the alive was stored (the broker's clock), seconds later.
    events.push(choria_event("shutdown", "choria-3", "shutdown-3", now + 3, ""));
    events.push(choria_event("shutdown", "choria-4", "shutdown-4", now - 20, ""));
    for (subject, payload) in &events {
        js_ctx.publish(subject.clone(), Bytes::from(payload.clone())).await.unwrap().await.unwrap();
    }
    // A Scout check result, as go-choria's nagios watcher publishes it (a CloudEvent).
    let nagios = serde_json::json!({
        "specversion": "1.0", "id": "7d0e6a3c-4c38-4b8e-9a55-3b7f0c1e2d4f", "source": "io.choria.machine",
        "type": "io.choria.machine.watcher.nagios.v1.state", "subject": "choria-1",
        "datacontenttype": "application/json", "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "data": {
            "protocol": "io.choria.machine.watcher.nagios.v1.state", "identity": "choria-1", "id": "machine-1",
            "version": "1.0.0", "timestamp": now, "type": "nagios", "machine": "scout", "name": "check_disk",
            "plugin": "/usr/lib/nagios/plugins/check_disk -w 10% -c 5%", "status": "CRITICAL", "status_code": 2,
            "output": "DISK CRITICAL - free space: / 3%", "check_time": now, "perfdata": [], "runtime": 0.05,
            "history": [], "annotations": {}
        }
    });
    js_ctx
        .publish("choria.machine.watcher.nagios.state", Bytes::from(serde_json::to_vec(&nagios).unwrap()))
        .await
        .unwrap()
        .await
        .unwrap();
    // And a key-value watcher's state, as go-choria's kv watcher publishes it.
    let kv = serde_json::json!({
        "specversion": "1.0", "id": "3b1f7c2e-9d4a-4f6b-8c1e-5a2d7e9f0b13", "source": "io.choria.machine",
        "type": "io.choria.machine.watcher.kv.v1.state", "subject": "choria-2",
        "datacontenttype": "application/json", "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "data": {
            "protocol": "io.choria.machine.watcher.kv.v1.state", "identity": "choria-2", "id": "machine-2",
            "version": "1.0.0", "timestamp": now, "type": "kv", "machine": "config", "name": "setpoint",
            "state": "changed", "key": "setpoint", "bucket": "HVAC", "mode": "poll"
        }
    });
    js_ctx
        .publish("choria.machine.watcher.kv.state", Bytes::from(serde_json::to_vec(&kv).unwrap()))
        .await
        .unwrap()
        .await
        .unwrap();

    // Chorus's own producers beside them: their streams are created where missing, the
    // lifecycle subjects go to CHORIA_EVENTS.
    chorus(&["simulate", "--nats", &url, "--nodes", "10", "--once"]);
    let b = js(&url).await;
    let names: Vec<String> = b.streams().await.unwrap().into_iter().map(|s| s.name).collect();
    assert!(!names.contains(&"CHORUS_LIFECYCLE".to_string()), "no overlapping stream was made: {names:?}");
    assert!(!names.contains(&"CHORUS_MACHINE".to_string()), "{names:?}");
    assert!(names.contains(&"CHORUS_RPC".to_string()), "{names:?}");
    for name in ["CHORIA_EVENTS", "CHORIA_MACHINE"] {
        let c = b.stream_config(name).await.unwrap();
        assert_eq!((c.max_age, c.replicas, c.dedupe_window), (Some(day), 1, Duration::from_secs(120)), "{name}");
    }
    let stored = count(&*b, "CHORIA_EVENTS").await;
    assert_eq!(stored, 22, "12 go-choria events and 10 startups of simulated nodes");

    // The oracle: each event once; the changed copy not applied; the future alive applied at
    // its store time, so the later shutdown wins.
    let mut oracle = Oracle::new();
    let v = |s: &str| Some(s.to_string());
    oracle.insert("choria-1".into(), (2, "alive".into(), v("0.29.4")));
    oracle.insert("choria-2".into(), (2, "alive".into(), v("0.29.4")));
    oracle.insert("choria-3".into(), (3, "shutdown".into(), v("0.29.4")));
    oracle.insert("choria-4".into(), (2, "shutdown".into(), v("0.29.4")));
    oracle.insert("choria-5".into(), (1, "startup".into(), v("0.29.4")));
    let simulated = as_oracle(
        &serde_json::from_str(&chorus_stdout(&[
            "inventory",
            "--nats",
            &url,
            "--data",
            dir.path().join("cli").to_str().unwrap(),
            "list",
            "--identity",
            "sim-*",
            "--json",
        ]))
        .unwrap(),
    );
    assert_eq!(simulated.len(), 10, "{simulated:?}");
    oracle.extend(simulated);

    let inventory = |data: &str| {
        as_oracle(
            &serde_json::from_str(&chorus_stdout(&["inventory", "--nats", &url, "--data", data, "list", "--json"]))
                .unwrap(),
        )
    };
    let cli = dir.path().join("cli");
    assert_eq!(inventory(cli.to_str().unwrap()), oracle, "chorus inventory");

    // The dashboard found CHORIA_EVENTS once it appeared, and is ready.
    let expected = oracle.clone();
    eventually("the dashboard to show the oracle", Duration::from_secs(30), || {
        let expected = expected.clone();
        async move {
            let (status, _) = get(listen, "/healthz").await?;
            let (_, body) = get(listen, "/api/nodes").await?;
            let nodes: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
            let seen = as_oracle(&nodes);
            if status == 200 && seen == expected {
                Ok(())
            } else {
                Err(format!("{status}: {seen:?}"))
            }
        }
    })
    .await;
    // The check is shown, counted, and found by `chorus events tail`.
    let body = eventually("the dashboard to show the check", Duration::from_secs(30), || async move {
        let (_, body) = get(listen, "/api/checks").await?;
        let checks: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if checks["counts"]["CRITICAL"] == 1 {
            Ok(checks)
        } else {
            Err(body)
        }
    })
    .await;
    assert_eq!(body["checks"][0]["check"], "check_disk", "{body}");
    let tail =
        chorus_stdout(&["events", "tail", "--nats", &url, "--kind", "watcher", "--type", "nagios", "--no-follow"]);
    assert!(tail.contains("scout check_disk CRITICAL DISK CRITICAL"), "{tail}");
    // Every watcher type is counted by type and state, and found by `events tail`.
    let (_, body) = get(listen, "/api/watchers").await.unwrap();
    let watchers: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(watchers["counts"]["kv"]["changed"], 1, "{body}");
    assert_eq!(watchers["counts"]["nagios"]["CRITICAL"], 1, "{body}");
    let tail = chorus_stdout(&["events", "tail", "--nats", &url, "--kind", "watcher", "--type", "kv", "--no-follow"]);
    assert!(tail.contains("config setpoint kv") && tail.contains("choria-2"), "{tail}");
    let (_, health) = get(listen, "/healthz").await.unwrap();
    assert!(health.contains(r#""stream":"CHORIA_EVENTS""#), "{health}");
    assert!(health.contains(r#""duplicates":1"#) && health.contains(r#""conflicts":1"#), "{health}");
    assert!(health.contains(r#""clock_skewed":1"#), "{health}");
    dashboard.kill().unwrap();
    dashboard.wait().unwrap();

    // The replicator beside it copies CHORIA_EVENTS to a hub; the hub's inventory is the same.
    let hub = NatsServer::start().unwrap();
    let hub_backbone = js(&hub.url()).await;
    chorus(&["streams", "create", "--nats", &hub.url()]);
    let config = dir.path().join("replicate.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nlinks:\n{}",
            dir.path().join("replicator").display(),
            link_yaml("choria", &url, &hub.url(), "CHORIA_EVENTS", 100)
        ),
    )
    .unwrap();
    let mut replicator = spawn_replicator(&config);
    wait_for_count(&*hub_backbone, CHORUS_LIFECYCLE, stored, Duration::from_secs(60)).await;
    replicator.kill().unwrap();
    replicator.wait().unwrap();
    assert_eq!(count(&*hub_backbone, CHORUS_LIFECYCLE).await, stored, "each stored message copied once");
    let hub_inventory = as_oracle(
        &serde_json::from_str(&chorus_stdout(&[
            "inventory",
            "--nats",
            &hub.url(),
            "--data",
            dir.path().join("hub").to_str().unwrap(),
            "list",
            "--json",
        ]))
        .unwrap(),
    );
    assert_eq!(hub_inventory, oracle, "the hub's inventory");
}

/// A dashboard started while its broker is down runs, says it is not ready and why, and
/// shows the fleet once the broker and its streams are there, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_started_with_its_broker_down_becomes_ready_by_itself() {
    let mut broker = NatsServer::start().unwrap();
    let url = broker.url();
    tokio::task::block_in_place(|| broker.stop()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
    let mut dashboard = spawn_dashboard(&url, listen, dir.path());
    eventually("the dashboard to say its broker is unreachable", Duration::from_secs(10), || async move {
        match get(listen, "/healthz").await {
            Ok((503, body)) if body.contains("the broker is unreachable") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    tokio::task::block_in_place(|| broker.restart()).unwrap();
    chorus(&["streams", "create", "--nats", &url]);
    chorus(&["simulate", "--nats", &url, "--nodes", "5", "--once"]);
    eventually("the dashboard to show the fleet", Duration::from_secs(60), || async move {
        let (status, _) = get(listen, "/healthz").await?;
        let (_, body) = get(listen, "/api/nodes").await?;
        let nodes: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        match (status, nodes.as_array().map(Vec::len)) {
            (200, Some(5)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(dashboard.try_wait().unwrap().is_none(), "still running");
    dashboard.kill().unwrap();
    dashboard.wait().unwrap();
}
