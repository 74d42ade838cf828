//! The Debian packages as an operator meets them: built by `scripts/package`, installed with
//! dpkg into a throw-away root (`dpkg --root`, maintainer scripts run with `DPKG_ROOT`), the
//! files and conffiles where Debian users look for them, every unit accepted by
//! `systemd-analyze verify` and `security`, and the agent unit's `ExecStart` command line,
//! run against a test nats-server, publishing the node's startup event.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chorus_testkit::eventually;
use chorus_testkit::nats::NatsServer;

use crate::agent::{lifecycle_type, site, wait_for};

const PACKAGES: [&str; 8] = [
    "chorus",
    "chorus-aaa",
    "chorus-agent",
    "chorus-audit-export",
    "chorus-dashboard",
    "chorus-provisioner",
    "chorus-reactor",
    "chorus-replicator",
];

/// Runs `command`, failing the test with its output unless it succeeds.
fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `path` inside `root` (`/etc/chorus/x` → `<root>/etc/chorus/x`).
fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// `dpkg --root` with maintainer scripts run outside a chroot (they honour `DPKG_ROOT`); the
/// empty root has no libc6 package, hence `--force-depends`.
fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display())).args([
        "--force-script-chrootless",
        "--force-depends",
        "--log=/dev/null",
    ]);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packages_install_into_a_throwaway_root_and_the_agent_unit_starts() {
    let repo = crate::docs::repo();
    let chorus = chorus_testkit::workspace_bin("chorus").unwrap();
    let debs = tempfile::tempdir().unwrap();
    run(Command::new(repo.join("scripts/package")).arg("--binary").arg(&chorus).arg("--out").arg(debs.path()));
    let mut files: Vec<PathBuf> = std::fs::read_dir(debs.path()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut names: Vec<String> =
        files.iter().map(|f| f.file_name().unwrap().to_str().unwrap().split('_').next().unwrap().to_string()).collect();
    names.sort();
    assert_eq!(names, PACKAGES, "{files:?}");

    // Install every package into an empty root.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(r.join("var/lib/dpkg/available"), "").unwrap();
    run(dpkg(r).arg("-i").args(&files));

    // The files, where Debian users look for them.
    let units: Vec<String> = PACKAGES[1..].iter().map(|p| format!("{p}.service")).collect();
    let mut expected: Vec<String> = [
        "/usr/bin/chorus",
        "/usr/share/bash-completion/completions/chorus",
        "/usr/share/zsh/vendor-completions/_chorus",
        "/usr/share/fish/vendor_completions.d/chorus.fish",
        "/usr/share/man/man1/chorus.1.gz",
        "/usr/share/man/man1/chorus-rpc.1.gz",
        "/usr/share/man/man1/chorus-agent.1.gz",
        "/usr/share/chorus/grafana/chorus-agent.json",
        "/usr/share/chorus/grafana/provisioning.yaml",
        "/usr/share/doc/chorus/copyright",
        "/usr/share/doc/chorus/METRICS.md",
        "/usr/lib/sysusers.d/chorus.conf",
        "/etc/chorus/chorus.env",
        "/etc/chorus/agent.yaml",
        "/etc/chorus/aaa.yaml",
        "/etc/chorus/aaa-users.yaml",
        "/etc/chorus/replicator.yaml",
        "/etc/chorus/provisioner.yaml",
        "/etc/chorus/reactor.yaml",
        "/etc/chorus/audit-export.yaml",
    ]
    .map(String::from)
    .to_vec();
    expected.extend(units.iter().map(|u| format!("/lib/systemd/system/{u}")));
    for path in &expected {
        assert!(inside(r, path).is_file(), "{path} is not installed");
    }
    for dir in ["/etc/chorus/machines", "/etc/chorus/policy", "/etc/chorus/agents"] {
        assert!(inside(r, dir).is_dir(), "{dir} is not installed");
    }
    let version = run(Command::new(inside(r, "/usr/bin/chorus")).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("chorus "), "{version:?}");

    // The system user the units run as, made by the chorus package's postinst.
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let user = passwd.lines().find(|l| l.starts_with("chorus:")).unwrap_or_else(|| panic!("no chorus user: {passwd}"));
    assert!(user.ends_with(":/var/lib/chorus:/usr/sbin/nologin"), "{user}");

    // Configuration files are conffiles: an operator's edits survive upgrades.
    let status = run(dpkg(r).args(["-s", "chorus-agent"]));
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(status.contains("Conffiles:\n /etc/chorus/agent.yaml "), "{status}");
    let status = run(dpkg(r).args(["-s", "chorus"]));
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("Depends: libc6"), "{status}");

    // Every unit verifies against the root (its ExecStart binary and its man page included),
    // with systemd's own units beside it, and is hardened.
    let systemd_units = r.join("lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap() {
        let from = entry.unwrap().path();
        let to = systemd_units.join(from.file_name().unwrap());
        if !to.exists() {
            run(Command::new("cp").arg("-a").arg(&from).arg(&to));
        }
    }
    let verify = |unit: &str| {
        let out = run(Command::new("systemd-analyze")
            .env("MANPATH", inside(r, "/usr/share/man"))
            .arg("verify")
            .arg(format!("--root={}", r.display()))
            .arg(format!("/lib/systemd/system/{unit}")));
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(said.trim().is_empty(), "systemd-analyze verify {unit}: {said}");
    };
    for unit in &units {
        verify(unit);
        // Overall exposure at most 2.5 of 10 (systemd calls up to 3.9 "OK").
        run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--threshold=25"])
            .arg(format!("--root={}", r.display()))
            .arg(format!("/lib/systemd/system/{unit}")));
    }

    // The shipped drop-in that runs the agent as root verifies with the unit.
    let dropins = inside(r, "/etc/systemd/system/chorus-agent.service.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::copy(inside(r, "/usr/share/doc/chorus-agent/examples/root.conf"), dropins.join("root.conf")).unwrap();
    verify("chorus-agent.service");
    std::fs::remove_file(dropins.join("root.conf")).unwrap();

    // The agent unit's ExecStart, with the root's paths, against a test broker, as the unit
    // runs it: as the chorus user, without new privileges, with /etc read-only and its state
    // directory its own. The node (named after this host, as the packaged configuration leaves
    // `identity` unset) publishes its startup event, and an autonomous agent's data store is
    // written to the state directory.
    let server = NatsServer::start().unwrap();
    let b = site(&server).await;
    let unit = std::fs::read_to_string(systemd_units.join("chorus-agent.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let listen = format!("127.0.0.1:{}", chorus_testkit::nats::free_port().unwrap());
    let argv: Vec<String> = exec
        .split_whitespace()
        .map(|word| match word {
            w if w.starts_with("/usr/bin/") || w.starts_with("/etc/chorus/") => inside(r, w).display().to_string(),
            "127.0.0.1:9101" => listen.clone(),
            w => w.to_string(),
        })
        .collect();
    let config = inside(r, "/etc/chorus/agent.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("nats://127.0.0.1:4222") && text.contains("/var/lib/chorus/agent"), "{text}");
    let text = text
        .replace("nats://127.0.0.1:4222", &server.url())
        .replace("/var/lib/chorus", &inside(r, "/var/lib/chorus").display().to_string())
        .replace("/etc/chorus", &inside(r, "/etc/chorus").display().to_string());
    std::fs::write(&config, text).unwrap();
    // The unit's EnvironmentFile, as systemd reads it.
    let env = crate::docs::environment_file(&std::fs::read_to_string(inside(r, "/etc/chorus/chorus.env")).unwrap())
        .expect("chorus.env is an EnvironmentFile");
    let machine = inside(r, "/etc/chorus/machines/facts");
    std::fs::create_dir_all(&machine).unwrap();
    std::fs::write(
        machine.join("machine.yaml"),
        r#"name: facts
version: "1.0.0"
initial_state: watching
transitions:
  - {name: stop, from: [watching], destination: stopped}
watchers:
  - name: read
    type: exec
    state_match: [watching]
    interval: 1h
    properties: {command: "/bin/echo '{\"rack\": 7}'", parse_as_data: true}
"#,
    )
    .unwrap();
    // StateDirectory= makes the state directory the user's.
    let (uid, gid) = passwd
        .lines()
        .find_map(|l| l.strip_prefix("chorus:x:"))
        .map(|l| {
            let mut ids = l.split(':').map(|n| n.parse::<u32>().unwrap());
            (ids.next().unwrap(), ids.next().unwrap())
        })
        .unwrap();
    let state = inside(r, "/var/lib/chorus/agent");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(r, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Its log goes to a file, as to the journal: no terminal, so no colour codes.
    let log = r.join("agent.log");
    let sandbox = format!(
        "mount --bind {etc} {etc} && mount -o remount,bind,ro {etc} {etc} && \
         exec setpriv --reuid={uid} --regid={gid} --clear-groups --no-new-privs -- \"$@\"",
        etc = inside(r, "/etc").display()
    );
    let mut agent = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &sandbox, "sh"])
        .args(&argv)
        .envs(env)
        .env("CHORUS_NATS", server.url())
        .current_dir(inside(r, "/var/lib/chorus/agent"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let host = String::from_utf8(run(&mut Command::new("hostname")).stdout).unwrap().trim().to_string();
    wait_for(&*b, &["CHORUS_LIFECYCLE"], &host, "the packaged agent's startup event", |evs| {
        evs.iter().any(|e| lifecycle_type(e) == Some("startup"))
    })
    .await;
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    eventually("the packaged agent's /healthz", Duration::from_secs(30), || async move {
        let body = crate::replicate::try_http_get(addr, "/healthz").await.map_err(|e| e.to_string())?;
        if body.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    let data = state.join("machines/facts/machine_data.json");
    let data = chorus_testkit::eventually_blocking("the machine's data store", Duration::from_secs(30), || {
        let bytes = std::fs::read(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| e.to_string())
    });
    assert_eq!(data["rack"], 7, "the machine's data store, in the state directory");
    run(Command::new("kill").args(["-TERM", &agent.id().to_string()]));
    let exit = chorus_testkit::eventually_blocking("the agent to stop on SIGTERM", Duration::from_secs(30), || {
        agent.try_wait().unwrap().ok_or_else(|| "still running".to_string())
    });
    assert!(exit.success(), "the agent exited with {exit}");
    assert!(!machine.join("machine_data.json").exists());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains(" INFO ") || log.contains(" WARN "), "the agent logged nothing at info: {log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log written to a file: {log:?}");

    // Purging the agent package (enabled by the operator) disables its unit and removes its
    // configuration and its state; the rest stays.
    run(Command::new("systemctl").arg(format!("--root={}", r.display())).args(["enable", "chorus-agent.service"]));
    let wants = inside(r, "/etc/systemd/system/multi-user.target.wants/chorus-agent.service");
    assert!(wants.symlink_metadata().is_ok(), "enabled");
    run(dpkg(r).args(["--purge", "chorus-agent"]));
    assert!(wants.symlink_metadata().is_err(), "a purged unit is no longer enabled");
    assert!(!inside(r, "/etc/chorus/agent.yaml").exists());
    assert!(!inside(r, "/var/lib/chorus/agent").exists());
    assert!(!systemd_units.join("chorus-agent.service").exists());
    assert!(inside(r, "/usr/bin/chorus").is_file());
}
