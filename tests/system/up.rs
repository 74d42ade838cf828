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
    let hint = loop {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("the second-terminal command is printed");
        if let Some(command) = line.trim().strip_prefix("chorus ") {
            break command.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        }
    };

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

    second_terminal(&url, &hint);
    action_page(&url);

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = eventually_blocking("chorus up to stop after SIGTERM", Duration::from_secs(30), || {
        child.try_wait().unwrap().ok_or_else(|| "chorus up still running after SIGTERM".to_string())
    });
    assert!(exit.success(), "chorus up exited with {exit}");
    assert!(data.path().join("audit.jsonl").exists(), "the audit export file is created");
}

/// What a second terminal does with the command `chorus up` printed: RPC through its
/// relay, signed as the operator, and discovery and facts from its inventory.
fn second_terminal(url: &str, hint: &[String]) {
    let args: Vec<&str> = hint.iter().map(String::as_str).collect();
    // The 50 new nodes wait to be provisioned: only the provisioner may call them.
    let (_, out) = crate::cli::chorus(&[&args[..], &["--display", "none"]].concat());
    assert!(out.contains("450 replies: 400 ok, 50 denied"), "{out}");
    // Credentials: everything after the action.
    let security = &args[3..];
    fn with<'a>(command: &[&'a str], security: &[&'a str]) -> Vec<&'a str> {
        [command, security].concat()
    }
    // The simulator's facts: country is uk for every fourth node (100 of 400, 13 of the 50
    // new nodes, which the inventory knows but which refuse the operator).
    eventually_blocking("the inventory to know every registration", Duration::from_secs(60), || {
        let (ok, out) = crate::cli::chorus(&with(&["facts", "country"], security));
        if ok
            && out.contains("uk  found 100 times")
            && out.contains("50 of 450 discovered nodes answered with an error")
        {
            Ok(())
        } else {
            Err(out)
        }
    });
    let (ok, out) = crate::cli::chorus(&with(&["discover", "-F", "country=uk", "-C", "role::web"], security));
    assert!(ok && out.contains("Discovered 39 nodes"), "{out}");
    let (ok, out) = crate::cli::chorus(&with(
        &["rpc", "rpcutil", "ping", "-F", "cpus>=16", "-I", "/^sim-/", "--limit", "10"],
        security,
    ));
    assert!(ok && out.contains("10 replies: 10 ok"), "{out}");
    // Without the operator's key the fleet refuses, through the relay as over NATS.
    let (ok, out) = crate::cli::chorus(&["rpc", "rpcutil", "ping", "--url", url, "--display", "all"]);
    assert!(!ok && (out.contains("denied") || out.contains("refused")), "{out}");
}

/// The dashboard's action page, in Chromium: a ping of the nodes a filter selects, the
/// replies filling the page, and a filter that does not compile refused with nothing sent.
fn action_page(url: &str) {
    // country=uk among the 400 simulated nodes (the new nodes refuse the dashboard).
    let page = format!("{url}rpc?agent=rpcutil&action=ping&fact=country%3Duk&identity=%2F%5Esim-%2F&run=1");
    let (dom, ok) = wait_for_dom(&page, Duration::from_secs(60), |dom| {
        dom.contains(r#"data-done="true""#) && dom.contains(r#"id="rpc-ok">100<"#)
    })
    .expect("chromium runs");
    assert!(ok, "the action page never showed 100 ok replies:\n{dom}");
    assert_eq!(dom.matches(r#"<tr class="reply">"#).count(), 100, "{dom}");
    assert!(dom.contains(r#"id="rpc-discovered">100<"#) && dom.contains(r#"id="rpc-silent">0<"#), "{dom}");

    let bad = format!("{url}rpc?agent=rpcutil&action=ping&fact=name%3D~%2F(%2F&run=1");
    let (dom, ok) =
        wait_for_dom(&bad, Duration::from_secs(30), |dom| dom.contains("Nothing was sent.")).expect("chromium");
    assert!(ok && dom.contains("regex"), "a malformed filter is refused on the page:\n{dom}");
}
