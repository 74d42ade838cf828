//! `chorus up` as a new user runs it (scripts/up runs the same subcommand from a release
//! build): the platform starts on the embedded store with no server, prints the dashboard URL,
//! and headless Chromium sees the dashboard fill with the simulated nodes and their versions.
//! Then SIGTERM stops it cleanly, with shutdown events and the audit file in place.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use chorus_testkit::chromium::wait_for_dom;
use chorus_testkit::eventually_blocking;

#[test]
fn chorus_up_dashboard_fills_with_nodes_in_chromium() {
    up_fills_the_dashboard(None);
}

/// `chorus up --nats URL`: the same platform on JetStream (RPC over NATS too).
#[test]
fn chorus_up_on_jetstream_fills_the_dashboard() {
    let server = chorus_testkit::nats::NatsServer::start().unwrap();
    up_fills_the_dashboard(Some(&server.url()));
}

fn up_fills_the_dashboard(nats: Option<&str>) {
    let data = tempfile::tempdir().unwrap();
    let port = chorus_testkit::nats::free_port().unwrap();
    let mut command = Command::new(chorus_testkit::workspace_bin("chorus").expect("the chorus binary"));
    command.args(["up", "--nodes", "400", "--listen", &format!("127.0.0.1:{port}"), "--data"]).arg(data.path());
    if let Some(url) = nats {
        command.args(["--nats", url]);
    }
    let mut child = command.env("CHORUS_LOG", "warn").stdout(Stdio::piped()).spawn().expect("spawn chorus up");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            tx.send(line).ok();
        }
    });
    let mut printed = Vec::new();
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no dashboard URL printed: {printed:?}"));
        if let Some(url) = line.strip_prefix("Dashboard: ") {
            break url.trim().to_string();
        }
        printed.push(line);
    };
    assert_eq!(url, format!("http://127.0.0.1:{port}/"));

    let (dom, ok) = wait_for_dom(&url, Duration::from_secs(60), |dom| {
        // 400 nodes and the 50 new nodes (provisioning mode) `chorus up` starts by default.
        dom.contains(r#"id="total">450<"#)
            && dom.contains(r#"id="status-alive">450<"#)
            && dom.matches(r#"class="bar""#).count() >= 6
    })
    .expect("chromium runs");
    assert!(ok, "the dashboard never showed 450 alive nodes in 3+ versions of 2 components:\n{dom}");
    assert!(dom.contains(r#"data-component="provision_mode_server""#), "{dom}");
    for version in ["0.29.4", "0.29.3", "0.28.0"] {
        assert!(dom.contains(&format!(r#"data-version="{version}""#)), "version {version} not shown:\n{dom}");
    }

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = eventually_blocking("chorus up to stop after SIGTERM", Duration::from_secs(30), || {
        child.try_wait().unwrap().ok_or_else(|| "chorus up still running after SIGTERM".to_string())
    });
    assert!(exit.success(), "chorus up exited with {exit}");
    assert!(data.path().join("audit.jsonl").exists(), "the audit export file is created");
}
