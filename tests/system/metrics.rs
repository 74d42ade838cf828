//! `/metrics` as monitoring stacks take it, for every long-running service: the Prometheus
//! text format unless the scraper asks for OpenMetrics, accepted by `promtool check metrics`
//! (Debian's `prometheus`); every metric in docs/METRICS.md exported from the start, every
//! exported one documented once with its labels; and every Grafana dashboard shipped in
//! `packaging/grafana/` querying only metrics the services export.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chorus_backbone::jetstream::NatsConfig;
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_testkit::eventually;
use chorus_testkit::nats::NatsServer;

use crate::replicate::{js, publish_all, replicator_process, startups, wait_for_count};

/// `GET /metrics` with an `Accept` header: content type and body.
async fn scrape(addr: SocketAddr, accept: &str) -> Result<(String, String), String> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .header("Accept", accept)
        .timeout(Duration::from_secs(5))
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

/// Metric families of a Prometheus text exposition (names as in its `# TYPE` lines) and the
/// label names their samples carry (`le` and `quantile` aside).
fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            out.entry(rest.split(' ').next().unwrap().to_string()).or_default();
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = out
            .keys()
            .filter(|f| name == f.as_str() || name.strip_prefix(f.as_str()).is_some_and(|s| s.starts_with('_')))
            .max_by_key(|f| f.len())
            .cloned();
        let Some(family) = family else { continue };
        if let Some(labels) = line.split_once('{').and_then(|(_, r)| r.split_once('}')).map(|(l, _)| l) {
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let label = pair.split('=').next().unwrap().trim();
                if label != "le" && label != "quantile" {
                    out.get_mut(&family).unwrap().insert(label.to_string());
                }
            }
        }
    }
    out
}

/// Sample names of an exposition (`x_total`, `x_bucket`, …): what a query can name.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// docs/METRICS.md: section key (the first `code` of a `## ` heading) → metric → its labels.
fn documented() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let text = std::fs::read_to_string(crate::docs::repo().join("docs/METRICS.md")).unwrap();
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut section = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading.split('`').nth(1).map(String::from);
            continue;
        }
        let Some(row) = line.strip_prefix("| `") else { continue };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let name = cells[0].trim_end_matches('`').to_string();
        let labels = cells[2].split(',').map(|l| l.trim().trim_matches('`').to_string()).filter(|l| !l.is_empty());
        let section = section.clone().unwrap_or_else(|| panic!("{name} is documented outside a section"));
        assert!(seen.insert(name.clone()), "{name} is documented twice in docs/METRICS.md");
        out.entry(section).or_default().insert(name, labels.collect());
    }
    out
}

/// Scrapes `addr` until it answers and `ready` holds for its body, then checks it: content
/// types of both formats, `promtool`, and the metrics of `sections` of docs/METRICS.md exactly
/// (names and labels). Returns the text exposition.
async fn check_endpoint(what: &str, addr: SocketAddr, sections: &[&str], ready: &str) -> String {
    let (kind, text) =
        eventually(&format!("{what}: {ready} on {addr}/metrics"), Duration::from_secs(60), || async move {
            let (kind, text) = scrape(addr, "text/plain").await?;
            if text.contains(ready) {
                Ok((kind, text))
            } else {
                Err(text)
            }
        })
        .await;
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{what}: {kind}");
    promtool(&text).unwrap_or_else(|e| panic!("promtool check metrics refuses {what}'s /metrics: {e}\n{text}"));
    let (kind, open) = scrape(addr, "application/openmetrics-text; version=1.0.0").await.unwrap();
    assert!(kind.starts_with("application/openmetrics-text"), "{what}: {kind}");
    assert!(open.ends_with("# EOF\n"), "{what}: {open}");

    let docs = documented();
    let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in sections {
        want.extend(docs.get(*s).unwrap_or_else(|| panic!("docs/METRICS.md has no section `{s}`")).clone());
    }
    let got = families(&text);
    let missing: Vec<_> = want.keys().filter(|m| !got.contains_key(*m)).collect();
    let undocumented: Vec<_> = got.keys().filter(|m| !want.contains_key(*m)).collect();
    assert!(
        missing.is_empty() && undocumented.is_empty(),
        "{what}: documented but not exported {missing:?}; exported but not documented (in {sections:?}) \
         {undocumented:?}\n{text}"
    );
    for (metric, labels) in &got {
        // Labels seen on samples must be the documented ones; a family without samples yet
        // (no link, no rule) shows none.
        assert!(
            labels.is_empty() || labels == &want[metric],
            "{what}: {metric} has labels {labels:?}, documented {:?}",
            want[metric]
        );
    }
    text
}

fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap()).parse().unwrap()
}

fn chorus(args: &[&str]) -> Child {
    Command::new(chorus_testkit::workspace_bin("chorus").unwrap())
        .args(args)
        .env("CHORUS_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills the processes of a test however it ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // Already gone is fine: the test is over either way.
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Every long-running service, as an operator starts it, with `--listen`; each one's
/// `/metrics` checked as above, then the Grafana dashboards against everything they export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_its_documented_metrics_as_prometheus_text_that_promtool_accepts() {
    let hub = NatsServer::start().unwrap();
    let site = NatsServer::start().unwrap();
    let b = js(&hub.url()).await;
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = |name: &str, text: String| {
        let path = d.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let mut processes = Processes(Vec::new());
    let mut exported = String::new();

    // chorus up: the dashboard, inventory, provisioner, audit export and simulated nodes.
    let up = free_addr();
    processes.0.push(chorus(&[
        "up",
        "--nodes",
        "20",
        "--listen",
        &up.to_string(),
        "--data",
        &d.join("up").to_string_lossy(),
    ]));
    exported +=
        &check_endpoint("chorus up", up, &["dashboard", "provisioner", "audit-export"], "chorus_provisioner_nodes")
            .await;

    // The node agent.
    let agent = free_addr();
    std::fs::create_dir_all(d.join("machines/demo")).unwrap();
    file(
        "machines/demo/machine.yaml",
        "name: demo\nversion: \"1.0.0\"\ninitial_state: idle\ntransitions:\n  - {name: work, from: [idle], destination: busy}\n\
         watchers:\n  - {name: wait, type: timer, state_match: [idle], fail_transition: work, properties: {timer: 1h}}\n"
            .into(),
    );
    let config = file(
        "agent.yaml",
        format!(
            "identity: m1.example.net\nstate_dir: {}\nnats: {{servers: [{}]}}\nalive_interval: 1h\nmachines_dir: {}\n",
            d.join("agent").display(),
            hub.url(),
            d.join("machines").display()
        ),
    );
    processes.0.push(chorus(&["agent", "--config", &config, "--listen", &agent.to_string()]));
    exported += &check_endpoint("chorus agent", agent, &["agent", "outbox"], "chorus_agent_machine_state").await;

    // The audit export on its own.
    let export = free_addr();
    let config = file("export.yaml", format!("sink: {{kind: jsonl, path: {}}}\n", d.join("audit.jsonl").display()));
    processes.0.push(chorus(&[
        "audit-export",
        "--nats",
        &hub.url(),
        "--config",
        &config,
        "--listen",
        &export.to_string(),
    ]));
    exported += &check_endpoint("chorus audit-export", export, &["audit-export"], "chorus_audit_export").await;

    // The provisioner on its own.
    let provision = free_addr();
    let config = file(
        "provision.yaml",
        format!("state_dir: {}\nsteps:\n  - {{agent: rpcutil, action: ping}}\n", d.join("provision").display()),
    );
    processes.0.push(chorus(&[
        "provision",
        "--nats",
        &hub.url(),
        "--config",
        &config,
        "--listen",
        &provision.to_string(),
    ]));
    exported += &check_endpoint("chorus provision", provision, &["provisioner"], "chorus_provisioner").await;

    // The reactor.
    let react = free_addr();
    let config = file(
        "react.yaml",
        format!(
            "name: metrics\nstate_dir: {}\nrules:\n  - name: started\n    match: {{stream: CHORUS_LIFECYCLE, type: \
             io.choria.lifecycle.v1.startup}}\n    actions:\n      - publish: {{subject: acted.x, type: test.acted}}\n",
            d.join("react").display()
        ),
    );
    processes.0.push(chorus(&["react", "--nats", &hub.url(), "--config", &config, "--listen", &react.to_string()]));
    exported += &check_endpoint("chorus react", react, &["reactor"], "chorus_reactor").await;

    // The inventory API (the dashboard's views without the pages).
    let inventory = free_addr();
    processes.0.push(chorus(&[
        "inventory",
        "--nats",
        &hub.url(),
        "--data",
        &d.join("inventory").to_string_lossy(),
        "serve",
        "--listen",
        &inventory.to_string(),
    ]));
    exported += &check_endpoint("chorus inventory serve", inventory, &["dashboard"], "chorus_node_versions").await;

    // The replicator, with a link at work.
    let source = js(&site.url()).await;
    ensure_platform_streams(&*source, &StreamLimits::default()).await.unwrap();
    publish_all(&*source, startups("m", 0..100, None)).await;
    let (_state, replicator, ops) = replicator_process(&site.url(), &hub.url());
    processes.0.push(replicator);
    wait_for_count(&*b, CHORUS_LIFECYCLE, 100, Duration::from_secs(60)).await;
    exported += &check_endpoint("chorus replicate", ops, &["replicator"], "chorus_replicator_copied_total").await;

    // The dashboard.
    let dashboard = free_addr();
    processes.0.push(chorus(&[
        "dashboard",
        "--nats",
        &hub.url(),
        "--data",
        &d.join("dashboard").to_string_lossy(),
        "--listen",
        &dashboard.to_string(),
    ]));
    exported += &check_endpoint("chorus dashboard", dashboard, &["dashboard"], "chorus_node_versions").await;

    // AAA, with its audit outbox: its API, /metrics and /healthz on one listener (`chorus
    // aaa --listen` overrides the configuration's `listen`). Keys, credential and users are
    // made as the AAA tests make them; the service is `chorus aaa` from a file.
    let made = crate::aaa::start_aaa(NatsConfig::new([hub.url()])).await;
    let (jwt, audit) = (
        format!("{{key: {{key_file: {}/jwt.pem}}, validity: 1h}}", made.dir.path().display()),
        format!("{{nats: {{servers: [{}]}}, state_dir: {}}}", hub.url(), d.join("aaa-outbox").display()),
    );
    let config = file("aaa.yaml", crate::aaa::aaa_yaml(made.dir.path(), &jwt, &audit, ""));
    let aaa = free_addr();
    processes.0.push(chorus(&["aaa", "--config", &config, "--listen", &aaa.to_string()]));
    let client = chorus_aaa::AaaClient::new(&format!("http://{aaa}"), None).unwrap();
    eventually("a login through chorus aaa --listen", Duration::from_secs(30), || async {
        client.login("alice", "alice-pw", made.key.as_ref()).await.map_err(|e| e.to_string())
    })
    .await;
    exported += &check_endpoint("chorus aaa", aaa, &["aaa", "outbox"], "chorus_aaa_decisions").await;

    check_dashboards(&sample_names(&exported));
    drop(made);
}

/// Every query of every dashboard in packaging/grafana/ names only metrics in `exported`,
/// and every dashboard is valid JSON Grafana can provision (uid, title, panels with queries).
fn check_dashboards(exported: &BTreeSet<String>) {
    let dir = crate::docs::repo().join("packaging/grafana");
    let mut dashboards = 0;
    let mut all = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        dashboards += 1;
        let name = path.display().to_string();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(json["uid"].is_string() && json["title"].is_string(), "{name}: uid and title");
        let panels = json["panels"].as_array().unwrap_or_else(|| panic!("{name}: panels"));
        let mut queries = 0;
        for panel in panels.iter().filter(|p| p["type"] != "row") {
            for target in panel["targets"].as_array().unwrap_or_else(|| panic!("{name}: {panel} has no targets")) {
                let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{name}: a target without expr"));
                queries += 1;
                let metrics = metric_names(expr);
                assert!(!metrics.is_empty(), "{name}: {expr:?} queries no chorus metric");
                for m in metrics {
                    assert!(exported.contains(&m), "{name}: {expr:?} queries {m}, which no service exports");
                }
            }
        }
        for variable in json["templating"]["list"].as_array().into_iter().flatten() {
            if let Some(definition) = variable["definition"].as_str() {
                for m in metric_names(definition) {
                    assert!(
                        exported.contains(&m),
                        "{name}: variable {definition:?} reads {m}, which no service exports"
                    );
                }
            }
        }
        assert!(queries > 0, "{name} has no queries");
        all.extend(expressions(&json));
    }
    promql_parses(&all);
    assert!(dashboards >= 5, "dashboards for the agent, dashboard, replicator, provisioner and audit export");
}

/// Every panel query of a dashboard, with Grafana's `$instance` as a regular expression.
fn expressions(dashboard: &serde_json::Value) -> Vec<String> {
    let panels = dashboard["panels"].as_array().into_iter().flatten();
    let targets = panels.flat_map(|p| p["targets"].as_array().into_iter().flatten());
    targets.filter_map(|t| t["expr"].as_str()).map(|e| e.replace("$instance", ".*")).collect()
}

/// `promtool check rules` on the expressions as recording rules: PromQL that Prometheus
/// itself parses.
fn promql_parses(exprs: &[String]) {
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("chorus:dashboard_query_{i}"), "expr": e}))
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    let groups = serde_json::json!({"groups": [{"name": "dashboards", "rules": rules}]});
    std::fs::write(file.path(), serde_json::to_string(&groups).unwrap()).unwrap();
    let out = Command::new("promtool").args(["check", "rules"]).arg(file.path()).output().unwrap();
    assert!(
        out.status.success(),
        "promtool refuses a dashboard query: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `chorus_…` metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("chorus_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + expr[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len() - start);
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}
