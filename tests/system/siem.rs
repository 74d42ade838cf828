//! Audit export to SIEM against a real rsyslog: every audit and RPC record arrives (the exact
//! set of event ids), over plain TCP and over TLS, across an rsyslog restart in the middle of
//! the export with records published while it is down; and a JSON lines file.
//!
//! Duplicates are allowed (at-least-once: a reconnect re-sends what had not settled) and are
//! reported on stderr; losses and unknown ids fail the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::jetstream::{JetStreamBackbone, NatsConfig};
use chorus_backbone::{Backbone, Message};
use chorus_consumers::audit_export::{
    AuditExport, Backoff, ExportConfig, JsonlConfig, SinkConfig, SyslogConfig, TlsClientConfig,
};
use chorus_platform::deadletter::DeadLetter;
use chorus_platform::to_message;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_runtime::{Service as _, Shutdown};
use chorus_schemas::subject::CHORUS_DEADLETTER;
use chorus_schemas::{AuditAction, AuditRecord, EventRecord, RpcReply, RpcRequest, StatusCode};
use chorus_testkit::conformance::read_all;
use chorus_testkit::nats::NatsServer;
use chorus_testkit::pki::Pki;
use chorus_testkit::rsyslog::{Received, Rsyslog, RsyslogTls};

/// What a published record must look like at the collector.
#[derive(Clone, Debug)]
struct Expect {
    pri: u8,
    host: String,
    msgid: &'static str,
}

#[derive(Default)]
struct Published {
    records: BTreeMap<String, Expect>,
}

impl Published {
    fn ids(&self) -> BTreeSet<String> {
        self.records.keys().cloned().collect()
    }
}

/// Publishes `n` rounds of an audit record (every third a deny), an RPC request and its reply
/// (every fourth denied by the node's policy), tagged so callers are unique.
async fn publish(b: &dyn Backbone, n: usize, tag: &str, into: &mut Published) {
    let mut messages = Vec::new();
    for i in 0..n {
        let caller = format!("up={tag}-{i}");
        let decision = if i % 3 == 0 { AuditAction::Deny } else { AuditAction::Allow };
        let mut request = serde_json::Map::new();
        request.insert("agent".into(), "service".into());
        request.insert("action".into(), "restart".into());
        // Characters that must be escaped in SD-PARAM values, and non-ASCII.
        request.insert("note".into(), "quote \" backslash \\ bracket ] é".into());
        let mut audit = AuditRecord::new("aaa1.example.net", "london", caller.clone(), decision, request);
        if decision == AuditAction::Deny {
            audit.reason = Some("policy \"deny\" [all]".into());
        }
        let audit = EventRecord::new(audit, 1).with_site("london");
        let req = RpcRequest::new(caller, "client.example.net", "choria", "service", "restart", Default::default());
        let reply = if i % 4 == 0 {
            RpcReply::denied(&req, "node1.example.net", "policy service.policy: deny")
        } else {
            RpcReply::new(&req, "node1.example.net", StatusCode::Ok, Default::default())
        };
        let reply_pri = if reply.authorized { 4 * 8 + 6 } else { 4 * 8 + 4 };
        let audit_pri = if decision == AuditAction::Deny { 4 * 8 + 4 } else { 4 * 8 + 6 };
        let records = [
            (audit, audit_pri, "aaa1.example.net", "audit"),
            (EventRecord::new(req, 1), 4 * 8 + 6, "client.example.net", "rpc_request"),
            (EventRecord::new(reply, 2), reply_pri, "node1.example.net", "rpc_reply"),
        ];
        for (r, pri, host, msgid) in records {
            into.records.insert(r.id.clone(), Expect { pri, host: host.into(), msgid });
            messages.push(to_message(&r).unwrap());
        }
    }
    b.publish_batch(messages).await.unwrap();
}

fn exporter_config(sink: SinkConfig) -> ExportConfig {
    let mut c = ExportConfig::new(sink);
    c.batch_size = 20;
    c.fetch_wait = Duration::from_millis(200);
    c.backoff = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(1));
    c
}

async fn wait_until(what: &str, limit: Duration, ok: impl FnMut() -> bool) {
    chorus_testkit::eventually_true(what, limit, ok).await
}

/// The CloudEvent id of a received message, from the MSG (the CloudEvent JSON).
fn id_of(r: &Received) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&r.msg).unwrap_or_else(|e| panic!("MSG is not the CloudEvent JSON ({e}): {}", r.raw));
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {}", r.msg)).to_owned()
}

fn received_ids(rsyslog: &Rsyslog) -> Vec<String> {
    rsyslog.received().iter().map(id_of).collect()
}

/// Checks the collector's view: every published id, nothing else, each message well formed
/// as rsyslog parsed it. Returns the number of duplicates.
fn check_received(rsyslog: &Rsyslog, published: &Published) -> usize {
    let received = rsyslog.received();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &received {
        let id = id_of(r);
        let expect = published.records.get(&id).unwrap_or_else(|| panic!("unknown id {id} received: {}", r.raw));
        assert_eq!(r.pri, expect.pri, "PRI of {}", r.raw);
        assert_eq!(
            (r.hostname.as_str(), r.app_name.as_str(), r.msgid.as_str()),
            (expect.host.as_str(), "chorus", expect.msgid),
            "{}",
            r.raw
        );
        assert!(
            r.structured_data.starts_with(&format!("[chorus@32473 id=\"{id}\" type=\"")),
            "structured data of {}: {}",
            id,
            r.structured_data
        );
        assert!(r.structured_data.ends_with(']'), "{}", r.structured_data);
        assert!(r.raw.starts_with(&format!("<{}>1 ", expect.pri)), "{}", r.raw);
        *counts.entry(id).or_default() += 1;
    }
    let got: BTreeSet<String> = counts.keys().cloned().collect();
    let missing: Vec<_> = published.ids().difference(&got).cloned().collect();
    assert!(
        missing.is_empty(),
        "{} of {} records lost, e.g. {:?}",
        missing.len(),
        published.records.len(),
        &missing[..missing.len().min(5)]
    );
    received.len() - counts.len()
}

/// The restart scenario, for any backbone and any syslog sink.
async fn export_across_restart(backbone: Arc<dyn Backbone>, mut rsyslog: Rsyslog, sink: SyslogConfig, name: &str) {
    let mut published = Published::default();
    publish(&*backbone, 40, "before", &mut published).await;
    let mut exporter =
        AuditExport::start(backbone.clone(), exporter_config(SinkConfig::Syslog(sink)), Shutdown::new()).await.unwrap();

    // Keep publishing while the export runs, so the collector goes away mid-export.
    let publisher = {
        let backbone = backbone.clone();
        tokio::spawn(async move {
            let mut p = Published::default();
            for round in 0..30 {
                publish(&*backbone, 5, &format!("during-{round}"), &mut p).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            p
        })
    };
    // Some records acknowledged (settled) and more in flight: both must survive the stop.
    wait_until("the first records acknowledged", Duration::from_secs(60), || {
        exporter.stats().exported.get() >= 30 && received_ids(&rsyslog).len() >= 60
    })
    .await;
    rsyslog.stop().unwrap();
    let at_stop = received_ids(&rsyslog).len();
    let acked_at_stop = exporter.stats().exported.get();

    // While it is down: more records, and the exporter notices and keeps retrying.
    publish(&*backbone, 30, "down", &mut published).await;
    let retries = exporter.stats().retries.get();
    wait_until("the exporter retrying", Duration::from_secs(60), || exporter.stats().retries.get() >= retries + 3)
        .await;
    let during = publisher.await.unwrap();
    published.records.extend(during.records);

    rsyslog.restart().unwrap();
    publish(&*backbone, 20, "after", &mut published).await;

    let expected = published.ids();
    wait_until("every record at rsyslog", Duration::from_secs(120), || {
        received_ids(&rsyslog).into_iter().collect::<BTreeSet<_>>().is_superset(&expected)
    })
    .await;
    wait_until("every record acknowledged", Duration::from_secs(60), || {
        exporter.stats().exported.get() == expected.len() as u64
    })
    .await;
    let stats = exporter.stats().snapshot();
    exporter.stop().await.unwrap();

    let duplicates = check_received(&rsyslog, &published);
    eprintln!(
        "{name}: {} records published, {} received ({at_stop} before the stop, {acked_at_stop} acknowledged then), {duplicates} duplicates; stats {stats:?}",
        expected.len(),
        rsyslog.received().len(),
    );
    assert_eq!(stats.exported, expected.len() as u64);
    assert_eq!(stats.dead_lettered, 0);
    assert!(stats.connects >= 2, "reconnected after the restart: {stats:?}");
    assert!(stats.retries > 0);
}

fn embedded(dir: &Path) -> Arc<dyn Backbone> {
    Arc::new(EmbeddedBackbone::open_path(dir).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tcp_every_record_across_rsyslog_restart() {
    let dir = tempfile::tempdir().unwrap();
    let backbone = embedded(dir.path());
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let rsyslog = Rsyslog::start().unwrap();
    let sink = SyslogConfig::new(rsyslog.address());
    export_across_restart(backbone, rsyslog, sink, "syslog over TCP, embedded backbone").await;
}

fn pki(dir: &Path) -> Pki {
    chorus_testkit::pki::generate(dir, "audit-export.example.net")
}

/// TLS (RFC 5425) with a client certificate the collector verifies, JetStream as the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tls_every_record_across_rsyslog_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let nats = NatsServer::start().unwrap();
    let backbone: Arc<dyn Backbone> =
        Arc::new(JetStreamBackbone::connect(&NatsConfig::new([nats.url()])).await.unwrap());
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let rsyslog = Rsyslog::builder()
        .tls(RsyslogTls {
            ca_file: pki.ca.clone(),
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            auth_mode: "x509/certvalid".into(),
        })
        .start()
        .unwrap();
    let mut sink = SyslogConfig::new(rsyslog.address());
    sink.tls = Some(TlsClientConfig {
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
        server_name: Some("localhost".into()),
        ..TlsClientConfig::with_ca(pki.ca.clone())
    });
    export_across_restart(backbone, rsyslog, sink, "syslog over TLS, JetStream backbone").await;
}

/// A server certificate the exporter does not trust is an error it keeps retrying, not a
/// reason to drop records; nothing reaches the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tls_refuses_an_untrusted_collector() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = pki(&dir.path().join("a").tap_mkdir());
    let other = pki(&dir.path().join("b").tap_mkdir());
    let backbone = embedded(&dir.path().join("store"));
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let rsyslog = Rsyslog::builder()
        .tls(RsyslogTls {
            ca_file: other.ca.clone(),
            cert_file: other.server_cert.clone(),
            key_file: other.server_key.clone(),
            auth_mode: "anon".into(),
        })
        .start()
        .unwrap();
    let mut published = Published::default();
    publish(&*backbone, 3, "x", &mut published).await;
    let mut sink = SyslogConfig::new(rsyslog.address());
    sink.tls = Some(TlsClientConfig::with_ca(trusted.ca.clone()));
    let mut exporter =
        AuditExport::start(backbone, exporter_config(SinkConfig::Syslog(sink)), Shutdown::new()).await.unwrap();
    wait_until("retries", Duration::from_secs(60), || exporter.stats().retries.get() >= 3).await;
    let stats = exporter.stats().snapshot();
    exporter.stop().await.unwrap();
    assert_eq!((stats.exported, stats.dead_lettered), (0, 0), "{stats:?}");
    assert!(rsyslog.received().is_empty());
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// JSON lines: every record once, each line a CloudEvent; a malformed record is dead-lettered
/// with its reason and the export goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_every_record_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let backbone = embedded(&dir.path().join("store"));
    ensure_platform_streams(&*backbone, &StreamLimits::default()).await.unwrap();
    let mut published = Published::default();
    publish(&*backbone, 50, "a", &mut published).await;
    backbone.publish(Message::new("garbage-1", "chorus.audit.allow.london", &b"\xff\xfe not json"[..])).await.unwrap();
    publish(&*backbone, 50, "b", &mut published).await;

    let path = dir.path().join("out").tap_mkdir().join("audit.jsonl");
    let config = exporter_config(SinkConfig::Jsonl(JsonlConfig { path: path.clone() }));
    let mut exporter = AuditExport::start(backbone.clone(), config, Shutdown::new()).await.unwrap();
    let expected = published.ids();
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line is not JSON ({e}): {l}")))
            .collect()
    };
    wait_until("every record in the file", Duration::from_secs(60), || lines().len() >= expected.len()).await;
    wait_until("the dead letter", Duration::from_secs(60), || exporter.stats().dead_lettered.get() == 1).await;
    // A record is written before it is counted: wait for the count to catch up with the file.
    let written = expected.len() as u64;
    wait_until("every record counted", Duration::from_secs(60), || exporter.stats().exported.get() >= written).await;
    let stats = exporter.stats().snapshot();
    exporter.stop().await.unwrap();

    let got = lines();
    let ids: Vec<String> = got.iter().map(|v| v["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(ids.len(), expected.len(), "no duplicates without failures");
    for v in &got {
        assert_eq!(v["specversion"], "1.0");
        assert!(EventRecord::decode(v.to_string().as_bytes()).is_ok(), "{v}");
    }
    assert_eq!(stats.exported, expected.len() as u64);

    let letters: Vec<DeadLetter> =
        read_all(&*backbone, CHORUS_DEADLETTER).await.iter().map(|m| DeadLetter::from_message(m).unwrap()).collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].origin.as_str(), letters[0].stream.as_str(), letters[0].code.as_str()),
        ("audit-export", "CHORUS_AUDIT", "not_json")
    );
    assert_eq!(letters[0].event_id, "garbage-1");
    assert_eq!(letters[0].payload_hex.as_deref().map(|h| &h[..4]), Some("fffe"));
}

/// `chorus audit-export` started before its streams exist (on a broker without them): it
/// runs, `/healthz` is 503 within 5 s naming the missing streams and what to run, and once
/// the streams exist it is healthy and exports every record, from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_started_before_its_streams_exist_waits_then_exports_everything() {
    let server = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("audit.jsonl");
    let config = dir.path().join("export.yaml");
    std::fs::write(&config, format!("batch_size: 50\nsink: {{kind: jsonl, path: {}}}\n", out.display())).unwrap();
    let ops: std::net::SocketAddr =
        format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap();
    let mut child = std::process::Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
        .args(["audit-export", "--config", config.to_str().unwrap(), "--listen", &ops.to_string()])
        .args(["--nats", &server.url()])
        .env("CHORUS_LOG", "warn")
        .spawn()
        .unwrap();
    let health = |want: &'static str| async move {
        match tokio::time::timeout(Duration::from_secs(5), crate::replicate::try_http_get(ops, "/healthz")).await {
            Ok(Ok(body)) if body.starts_with(want) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    };
    // 503 from the start ("starting"), then with the reason once the first attempt failed.
    let reason = || async move {
        let body = health("HTTP/1.1 503").await?;
        if body.contains("CHORUS_AUDIT") && body.contains("chorus streams create") {
            Ok(body)
        } else {
            Err(body)
        }
    };
    chorus_testkit::eventually("503 naming the missing streams", Duration::from_secs(5), reason).await;
    assert!(child.try_wait().unwrap().is_none(), "the exporter keeps running");

    let b: Arc<dyn Backbone> = Arc::new(JetStreamBackbone::connect(&NatsConfig::new([server.url()])).await.unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    let mut published = Published::default();
    publish(&*b, 40, "late", &mut published).await;
    chorus_testkit::eventually("200 once it reads", Duration::from_secs(30), || health("HTTP/1.1 200")).await;
    let expected = published.ids();
    let ids = || -> BTreeSet<String> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect()
    };
    wait_until("every record exported", Duration::from_secs(60), || ids() == expected).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

/// AAA decisions reach the SIEM in OCSF and in ECS with the client's address: a real AAA
/// service refuses a wrong password from this test's HTTP client and accepts the right one,
/// and `chorus audit-export` with `format: ocsf` (then `format: ecs`) writes both, the refusal
/// as a failed authentication from 127.0.0.1, the CloudEvent kept whole in each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaa_decisions_are_exported_as_ocsf_and_ecs_with_the_client_address() {
    let server = NatsServer::start().unwrap();
    let b = crate::aaa::site(&server).await;
    let aaa = crate::aaa::start_aaa(NatsConfig::new([server.url()])).await;
    assert!(aaa.login("alice", "wrong").await.is_err());
    aaa.login("alice", "alice-pw").await.unwrap();
    chorus_testkit::eventually("both decisions in CHORUS_AUDIT", Duration::from_secs(30), || {
        let b = b.clone();
        async move {
            let n = read_all(&*b, "CHORUS_AUDIT").await.len();
            if n == 2 {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    for format in ["ocsf", "ecs"] {
        let out = dir.path().join(format!("{format}.jsonl"));
        let config = dir.path().join(format!("{format}.yaml"));
        std::fs::write(
            &config,
            format!(
                "consumer: siem-{format}\nstreams: [CHORUS_AUDIT]\nformat: {format}\nsink: {{kind: jsonl, path: {}}}\n",
                out.display()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
            .args(["audit-export", "--nats", &server.url(), "--config", config.to_str().unwrap()])
            .env("CHORUS_LOG", "warn")
            .spawn()
            .unwrap();
        let lines = chorus_testkit::eventually(&format!("two {format} lines"), Duration::from_secs(30), || {
            let out = out.clone();
            async move {
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                let lines: Vec<serde_json::Value> =
                    text.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
                if lines.len() == 2 {
                    Ok(lines)
                } else {
                    Err(format!("{} lines", lines.len()))
                }
            }
        })
        .await;
        child.kill().unwrap();
        child.wait().unwrap();
        let (denied, allowed) = (&lines[0], &lines[1]);
        match format {
            "ocsf" => {
                assert_eq!(denied["class_uid"], 3002, "{denied}");
                assert_eq!((denied["status"].as_str(), allowed["status"].as_str()), (Some("Failure"), Some("Success")));
                assert_eq!(denied["status_code"], "bad_credentials");
                assert_eq!(denied["src_endpoint"]["ip"], "127.0.0.1");
                assert!(denied["src_endpoint"]["port"].as_u64().is_some_and(|p| p > 0), "{denied}");
                assert_eq!(denied["user"]["name"], "alice");
                let raw: serde_json::Value = serde_json::from_str(denied["raw_data"].as_str().unwrap()).unwrap();
                assert_eq!(raw["type"], "io.choria.signer.v1.signature_audit");
            }
            _ => {
                assert_eq!(denied["event"]["category"], serde_json::json!(["authentication"]), "{denied}");
                assert_eq!(
                    (denied["event"]["outcome"].as_str(), allowed["event"]["outcome"].as_str()),
                    (Some("failure"), Some("success"))
                );
                assert_eq!(denied["source"]["ip"], "127.0.0.1");
                assert_eq!(denied["user"]["name"], "alice");
                assert!(denied["event"]["original"].as_str().unwrap().contains("signature_audit"));
            }
        }
    }
}
