//! Machines running for real (real processes and files) against an in-memory sink. Tests
//! that show a timer, a poll or a schedule did *not* do something run on paused tokio time,
//! so "later" is exact rather than a real-time sleep; tests of real processes run on the
//! real clock and only ever wait for something to happen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_runtime::{Service as _, Shutdown};
use chorus_testkit::eventually;

use chorus_schemas::{Event, EventRecord, Transition, WatcherDetails, WatcherState};

use super::*;
use chorus_platform::MemorySink;

struct Fixture {
    sink: Arc<MemorySink>,
    emitter: Arc<Emitter>,
    dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let sink = Arc::new(MemorySink::default());
    let emitter = Arc::new(Emitter::new(sink.clone(), 1, None));
    Fixture { sink, emitter, dir: tempfile::tempdir().unwrap() }
}

impl Fixture {
    fn start(&self, yaml: &str) -> MachineHandle {
        let manifest = Manifest::from_yaml(yaml).unwrap();
        Machine::start(
            manifest,
            "node1.example.net",
            self.dir.path().to_path_buf(),
            self.emitter.clone(),
            Shutdown::new(),
        )
        .unwrap()
    }

    /// Waits until `done` holds for the recorded events.
    async fn wait_for(&self, what: &str, done: impl Fn(&[EventRecord]) -> bool) -> Vec<EventRecord> {
        eventually(what, Duration::from_secs(30), || {
            let records = self.sink.records();
            let result = if done(&records) { Ok(records) } else { Err(format!("{:#?}", summary(&records))) };
            async move { result }
        })
        .await
    }
}

fn transitions(records: &[EventRecord]) -> Vec<&Transition> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            Event::Transition(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn watcher_states<'a>(records: &'a [EventRecord], name: &str) -> Vec<&'a WatcherState> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            Event::Watcher(w) if w.name == name => Some(w),
            _ => None,
        })
        .collect()
}

fn moves(records: &[EventRecord]) -> Vec<(String, String, String)> {
    transitions(records).iter().map(|t| (t.transition.clone(), t.from_state.clone(), t.to_state.clone())).collect()
}

fn mv(t: &str, from: &str, to: &str) -> (String, String, String) {
    (t.into(), from.into(), to.into())
}

fn exec_outcome(w: &WatcherState) -> &str {
    match &w.details {
        WatcherDetails::Exec(d) => &d.previous_outcome,
        other => panic!("not an exec state: {other:?}"),
    }
}

fn file_outcome(w: &WatcherState) -> &str {
    match &w.details {
        WatcherDetails::File(d) => &d.previous_outcome,
        other => panic!("not a file state: {other:?}"),
    }
}

fn timer_state(w: &WatcherState) -> (&str, u64) {
    match &w.details {
        WatcherDetails::Timer(d) => (&d.state, d.timer),
        other => panic!("not a timer state: {other:?}"),
    }
}

fn summary(records: &[EventRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| match &r.data {
            Event::Transition(t) => {
                format!("#{} {}: {} {} -> {}", r.seq, t.machine, t.transition, t.from_state, t.to_state)
            }
            Event::Watcher(w) => format!("#{} {}/{}: {:?}", r.seq, w.machine, w.name, w.details),
            other => format!("#{} {:?}", r.seq, other),
        })
        .collect()
}

/// Every event carries the machine instance, and sequences increase in store order.
fn assert_stamped(records: &[EventRecord], handle: &MachineHandle) {
    let instance = handle.instance();
    for pair in records.windows(2) {
        assert!(pair[0].seq < pair[1].seq, "sequence not increasing: {:?}", summary(records));
    }
    for r in records {
        assert_eq!(r.source, chorus_schemas::machine::SOURCE);
        assert_eq!(r.subject, "node1.example.net");
        let (identity, id, machine, version, protocol) = match &r.data {
            Event::Transition(t) => (&t.identity, &t.id, &t.machine, &t.version, t.protocol.as_str()),
            Event::Watcher(w) => (&w.identity, &w.id, &w.machine, &w.version, w.details.protocol()),
            other => panic!("unexpected event {other:?}"),
        };
        assert_eq!(identity, &instance.identity);
        assert_eq!(id, &instance.id);
        assert_eq!(machine, &instance.machine);
        assert_eq!(version, &instance.version);
        assert_eq!(protocol, r.data.event_type());
    }
}

const EXEC_AND_TIMER: &str = r#"
name: checker
version: 1.2.3
initial_state: unknown
transitions:
  - {name: healthy, from: [unknown], destination: ok}
  - {name: broken, from: [unknown], destination: failed}
  - {name: recheck, from: [ok, failed], destination: unknown}
watchers:
  - name: check
    type: exec
    state_match: [unknown]
    success_transition: healthy
    fail_transition: broken
    properties: {command: "true"}
  - name: expire
    type: timer
    state_match: [ok, failed]
    fail_transition: recheck
    properties: {timer: 300ms}
"#;

#[tokio::test]
async fn exec_success_and_timer_drive_transitions() {
    let f = fixture();
    let mut handle = f.start(EXEC_AND_TIMER);
    assert_eq!(handle.instance().machine, "checker");
    let records = f.wait_for("two check cycles", |r| transitions(r).len() >= 4).await;
    handle.stop().await.unwrap();

    assert_eq!(
        moves(&records)[..4],
        [
            mv("healthy", "unknown", "ok"),
            mv("recheck", "ok", "unknown"),
            mv("healthy", "unknown", "ok"),
            mv("recheck", "ok", "unknown"),
        ]
    );
    assert_stamped(&records, &handle);
    assert!(records.iter().all(|r| r.data.event_type() == Transition::PROTOCOL
        || r.data.event_type() == "io.choria.machine.watcher.exec.v1.state"
        || r.data.event_type() == "io.choria.machine.watcher.timer.v1.state"));

    // The exec watcher ran on entering `unknown` (at start and after each recheck) and
    // announced each run before firing its transition.
    let checks = watcher_states(&records, "check");
    assert!(checks.len() >= 2);
    assert!(checks.iter().all(|w| exec_outcome(w) == "success" && w.watcher_type() == "exec"));
    match &checks[0].details {
        WatcherDetails::Exec(d) => {
            assert_eq!(d.command, "true");
            assert!(d.previous_run_time > 0 && d.previous_run_time < 2_000_000_000, "{d:?}");
        }
        _ => unreachable!(),
    }
    let first_check = records.iter().position(|r| matches!(&r.data, Event::Watcher(w) if w.name == "check")).unwrap();
    let first_move = records.iter().position(|r| matches!(r.data, Event::Transition(_))).unwrap();
    assert!(first_check < first_move, "{:#?}", summary(&records));

    // The timer ran in `ok` and expired: running, stopped, running, stopped...
    let timers: Vec<_> = watcher_states(&records, "expire").into_iter().map(timer_state).collect();
    assert!(timers.len() >= 4, "{timers:?}");
    for (i, (state, timer)) in timers.iter().take(4).enumerate() {
        assert_eq!(*state, if i % 2 == 0 { "running" } else { "stopped" });
        assert_eq!(*timer, 300_000_000);
    }
}

#[tokio::test]
async fn exec_failure_fires_fail_transition_and_reruns_on_entry() {
    let f = fixture();
    let mut handle = f
        .start(&EXEC_AND_TIMER.replace("command: \"true\"", "command: \"false\"").replace("timer: 300ms", "timer: 1h"));
    let mut state = handle.subscribe();
    state.wait_for(|s| s == "failed").await.unwrap();
    assert_eq!(handle.state(), "failed");

    // Not valid from `failed`, and not a transition at all.
    let e = handle.transition("healthy").await.unwrap_err();
    assert!(
        matches!(e, MachineError::InvalidTransition { ref transition, ref state } if transition == "healthy" && state == "failed"),
        "{e}"
    );
    assert!(matches!(handle.transition("nope").await, Err(MachineError::UnknownTransition(_))));

    // By hand back to `unknown`: the exec watcher runs again on entry and fails again.
    assert_eq!(handle.transition("recheck").await.unwrap(), "unknown");
    let records = f.wait_for("second failure", |r| transitions(r).len() >= 3).await;
    handle.stop().await.unwrap();
    assert_eq!(
        moves(&records)[..3],
        [mv("broken", "unknown", "failed"), mv("recheck", "failed", "unknown"), mv("broken", "unknown", "failed")]
    );
    let checks = watcher_states(&records, "check");
    assert_eq!(checks.len(), 2);
    assert!(checks.iter().all(|w| exec_outcome(w) == "error"));
    assert_stamped(&records, &handle);
}

#[tokio::test]
async fn exec_environment_directory_and_path() {
    let f = fixture();
    std::fs::write(f.dir.path().join("marker"), "").unwrap();
    let script = f.dir.path().join("probe.sh");
    std::fs::write(&script, "#!/bin/sh\ntest \"$1\" = arg\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let command = r#"test "$MACHINE_NAME" = envtest && test "$MACHINE_WATCHER_NAME" = check && test "$GREETING" = "hello world" && test -f marker && test -z "$HOME" && probe.sh arg"#;
    let yaml = format!(
        r#"
name: envtest
version: 1.0.0
initial_state: unknown
transitions:
  - {{name: healthy, from: [unknown], destination: ok}}
  - {{name: broken, from: [unknown], destination: failed}}
watchers:
  - name: check
    type: exec
    success_transition: healthy
    fail_transition: broken
    properties:
      command: '{command}'
      environment: ["GREETING=hello world"]
"#
    );
    let mut handle = f.start(&yaml);
    let mut state = handle.subscribe();
    state.wait_for(|s| s != "unknown").await.unwrap();
    assert_eq!(handle.state(), "ok", "the probe failed: env, cwd or PATH is wrong");
    handle.stop().await.unwrap();
}

#[tokio::test]
async fn exec_timeout_is_a_failure() {
    let f = fixture();
    let yaml = EXEC_AND_TIMER
        .replace("command: \"true\"", "command: \"sleep 5; true\", timeout: 200ms")
        .replace("timer: 300ms", "timer: 1h");
    let started = Instant::now();
    let mut handle = f.start(&yaml);
    handle.subscribe().wait_for(|s| s == "failed").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let records = f.sink.records();
    handle.stop().await.unwrap();
    let check = watcher_states(&records, "check")[0];
    assert_eq!(exec_outcome(check), "error");
    match &check.details {
        WatcherDetails::Exec(d) => assert!((200_000_000..1_500_000_000).contains(&d.previous_run_time), "{d:?}"),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn exec_interval_reruns_and_same_state_is_not_a_transition() {
    let f = fixture();
    let mut handle = f.start(
        r#"
name: poller
version: 1.0.0
initial_state: unknown
transitions:
  - {name: up, from: [unknown, ok], destination: ok}
watchers:
  - {name: check, type: exec, success_transition: up, interval: 500ms, properties: {command: "true"}}
  - {name: quiet, type: exec, success_transition: up, interval: 500ms, properties: {command: "true", suppress_success_announce: true}}
"#,
    );
    let records = f.wait_for("three runs", |r| watcher_states(r, "check").len() >= 3).await;
    handle.stop().await.unwrap();
    // `up` from `ok` keeps the state: one transition only, however often the checks pass.
    assert_eq!(moves(&records), [mv("up", "unknown", "ok")]);
    assert!(watcher_states(&records, "quiet").is_empty(), "suppress_success_announce");
    assert_stamped(&records, &handle);
}

#[tokio::test(start_paused = true)]
async fn file_watcher_follows_a_file() {
    let f = fixture();
    let mut handle = f.start(
        r#"
name: flagged
version: 1.0.0
initial_state: unknown
transitions:
  - {name: appeared, from: [unknown, absent], destination: present}
  - {name: gone, from: [unknown, present], destination: absent}
watchers:
  - {name: flag, type: file, success_transition: appeared, fail_transition: gone, interval: 500ms, properties: {path: flag}}
"#,
    );
    let flag = f.dir.path().join("flag");
    let mut state = handle.subscribe();
    state.wait_for(|s| s == "absent").await.unwrap();

    std::fs::write(&flag, "one").unwrap();
    state.wait_for(|s| s == "present").await.unwrap();

    // Same size, possibly the same mtime tick: the content hash still sees the change.
    std::fs::write(&flag, "two").unwrap();
    f.wait_for("second change", |r| {
        watcher_states(r, "flag").iter().filter(|w| file_outcome(w) == "changed").count() == 2
    })
    .await;

    std::fs::remove_file(&flag).unwrap();
    state.wait_for(|s| s == "absent").await.unwrap();
    // Polls while the file stays missing do not repeat the event.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let records = f.sink.records();
    handle.stop().await.unwrap();

    assert_eq!(
        moves(&records),
        [mv("gone", "unknown", "absent"), mv("appeared", "absent", "present"), mv("gone", "present", "absent")]
    );
    let outcomes: Vec<_> = watcher_states(&records, "flag").into_iter().map(file_outcome).collect();
    assert_eq!(outcomes, ["error", "changed", "changed", "error"]);
    match &watcher_states(&records, "flag")[0].details {
        WatcherDetails::File(d) => assert_eq!(d.path, flag.display().to_string()),
        _ => unreachable!(),
    }
    assert_stamped(&records, &handle);
}

#[tokio::test(start_paused = true)]
async fn file_watcher_gather_initial_state_waits_for_a_change() {
    let f = fixture();
    std::fs::write(f.dir.path().join("config"), "v1").unwrap();
    let mut handle = f.start(
        r#"
name: config
version: 1.0.0
initial_state: steady
transitions:
  - {name: changed, from: [steady], destination: reload}
watchers:
  - {name: cfg, type: file, state_match: [steady], success_transition: changed, interval: 500ms, properties: {path: config, gather_initial_state: true}}
"#,
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(handle.state(), "steady", "the existing file is the baseline, not a change");
    assert!(f.sink.records().is_empty());

    std::fs::write(f.dir.path().join("config"), "v2, longer").unwrap();
    handle.subscribe().wait_for(|s| s == "reload").await.unwrap();
    let records = f.sink.records();
    handle.stop().await.unwrap();
    assert_eq!(moves(&records), [mv("changed", "steady", "reload")]);
}

#[tokio::test(start_paused = true)]
async fn schedule_watcher_turns_on_and_off() {
    let f = fixture();
    let yaml = |name: &str, cron: &str| {
        format!(
            r#"
name: {name}
version: 1.0.0
initial_state: unknown
transitions:
  - {{name: start, from: [unknown, off], destination: "on"}}
  - {{name: end, from: [unknown, "on"], destination: "off"}}
watchers:
  - {{name: window, type: schedule, success_transition: start, fail_transition: end, properties: {{schedules: ["{cron}"], duration: 1m}}}}
"#
        )
    };
    // Every minute with a one minute window: always on. 31 February: never.
    let mut always = f.start(&yaml("always", "* * * * *"));
    let mut never = f.start(&yaml("never", "0 0 31 2 *"));
    always.subscribe().wait_for(|s| s == "on").await.unwrap();
    never.subscribe().wait_for(|s| s == "off").await.unwrap();
    // Later checks do not repeat an unchanged state.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let records = f.sink.records();
    always.stop().await.unwrap();
    never.stop().await.unwrap();

    let states: Vec<_> = watcher_states(&records, "window")
        .into_iter()
        .map(|w| match &w.details {
            WatcherDetails::Schedule(d) => (w.machine.clone(), d.state.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(states.len(), 2, "{states:?}");
    assert!(states.contains(&("always".into(), "on".into())));
    assert!(states.contains(&("never".into(), "off".into())));
    let mut moved = moves(&records);
    moved.sort();
    assert_eq!(moved, [mv("end", "unknown", "off"), mv("start", "unknown", "on")]);
}

#[tokio::test(start_paused = true)]
async fn timer_stops_early_when_leaving_its_states_and_splays() {
    let f = fixture();
    let mut handle = f.start(
        r#"
name: timed
version: 1.0.0
initial_state: idle
transitions:
  - {name: run, from: [idle], destination: running}
  - {name: halt, from: [running], destination: idle}
watchers:
  - {name: t, type: timer, state_match: [running], fail_transition: halt, properties: {timer: 800ms}}
  - {name: splayed, type: timer, state_match: [running], properties: {timer: 300ms, splay: true}}
"#,
    );
    assert_eq!(handle.transition("run").await.unwrap(), "running");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(handle.transition("halt").await.unwrap(), "idle");
    // Past the original expiry: the stopped timer must not fire.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(handle.state(), "idle");

    // Left alone in `running`, it fires `halt`.
    handle.transition("run").await.unwrap();
    handle.subscribe().wait_for(|s| s == "idle").await.unwrap();
    let records = f.sink.records();
    handle.stop().await.unwrap();

    assert_eq!(
        moves(&records),
        [
            mv("run", "idle", "running"),
            mv("halt", "running", "idle"),
            mv("run", "idle", "running"),
            mv("halt", "running", "idle")
        ]
    );
    let t: Vec<_> = watcher_states(&records, "t").into_iter().map(|w| timer_state(w).0).collect();
    assert_eq!(t, ["running", "stopped", "running", "stopped"]);
    for w in watcher_states(&records, "splayed") {
        let (_, timer) = timer_state(w);
        assert!(timer < 300_000_000, "splayed timer {timer}ns");
    }
}

#[tokio::test]
async fn machine_keeps_running_when_events_cannot_be_stored() {
    let f = fixture();
    f.sink.set_down(true);
    let mut handle = f.start(EXEC_AND_TIMER);
    // Two full cycles through exec and timer with every emit failing.
    let mut state = handle.subscribe();
    for _ in 0..2 {
        state.wait_for(|s| s == "ok").await.unwrap();
        state.wait_for(|s| s == "unknown").await.unwrap();
    }
    assert!(f.sink.records().is_empty());

    // The sink comes back: events flow again, with later sequence numbers.
    f.sink.set_down(false);
    let records = f.wait_for("a transition after recovery", |r| !transitions(r).is_empty()).await;
    handle.stop().await.unwrap();
    assert!(records[0].seq > 1);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn stop_kills_running_commands_and_refuses_transitions() {
    let f = fixture();
    let yaml = EXEC_AND_TIMER.replace("command: \"true\"", "command: \"sleep 30 & echo $! > pid; wait\", timeout: 1m");
    let mut handle = f.start(&yaml);
    let pid_file = f.dir.path().join("pid");
    let pid = eventually("the command to start", Duration::from_secs(10), || {
        let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
        async move { pid.ok_or_else(|| "no pid file yet".to_string()) }
    })
    .await;
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(false)
    };
    assert!(alive(pid));

    handle.stop().await.unwrap();
    chorus_testkit::eventually_true("the command's child to die with the stop", Duration::from_secs(10), || {
        !alive(pid)
    })
    .await;
    assert!(matches!(handle.transition("healthy").await, Err(MachineError::Stopped)));
    assert_eq!(handle.state(), "unknown");
    handle.stop().await.unwrap(); // idempotent
}

#[tokio::test]
async fn start_validates_the_manifest() {
    let f = fixture();
    let mut manifest = Manifest::from_yaml(EXEC_AND_TIMER).unwrap();
    manifest.watchers[0].success_transition = Some("air_goodd".into());
    let e =
        Machine::start(manifest, "n", f.dir.path().to_path_buf(), f.emitter.clone(), Shutdown::new()).err().unwrap();
    assert_eq!(e.to_string(), "watchers[0].success_transition: unknown transition \"air_goodd\"");
}

/// go-choria's own test machines (`aagent/machine/testdata`): `TestMachine` and
/// `Subscriber`, whose `fire_1` subscribes to TestMachine's `fire_1`. Both load unchanged,
/// and a transition of one fires the subscribed transition of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_of_one_machine_fires_the_subscribed_transition_of_another() {
    const TEST_MACHINE: &str = "name: TestMachine\nversion: 0.0.1\ninitial_state: unknown\nsplay_start: 0\n\ntransitions:\n  - name: fire_1\n    from: [unknown]\n    destination: one\n\n  - name: fire_2\n    from: [one]\n    destination: two\n\nwatchers:\n  - name: true_2\n    type: exec\n    state_match: [two]\n    fail_transition: fire_1\n    success_transition: fire_2\n    interval: \"1m\"\n    properties:\n      command: /usr/bin/true\n";
    const SUBSCRIBER: &str = "name: Subscriber\nversion: 0.0.1\ninitial_state: unknown\nsplay_start: 0\n\ntransitions:\n  - name: fire_1\n    from: [unknown]\n    destination: one\n    subscribe:\n      - machine_name: TestMachine\n        event: fire_1\n\nwatchers:\n  - name: true_1\n    type: exec\n    state_match: [one]\n    fail_transition: fire_1\n    success_transition: fire_1\n    properties:\n      command: /usr/bin/true\n";
    let f = fixture();
    let mut machines = vec![f.start(TEST_MACHINE), f.start(SUBSCRIBER)];
    assert_eq!(connect_subscriptions(&mut machines), 1);
    assert_eq!(machines[1].state(), "unknown");
    assert_eq!(machines[0].transition("fire_1").await.unwrap(), "one");
    let records =
        f.wait_for("the subscriber's fire_1", |r| transitions(r).iter().any(|t| t.machine == "Subscriber")).await;
    let subscriber: Vec<_> = transitions(&records).into_iter().filter(|t| t.machine == "Subscriber").collect();
    assert_eq!((subscriber[0].transition.as_str(), subscriber[0].to_state.as_str()), ("fire_1", "one"));
    assert_eq!(machines[1].state(), "one");
}

/// A Scout check as Choria writes it: the `nagios` watcher runs its plugin, publishes the
/// state with output and performance data, and moves the machine to the state named after
/// the result; FORCE_CHECK runs it at once; MAINTENANCE stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nagios_check_moves_the_machine_to_its_result() {
    const SCOUT: &str = r#"
name: check_disk
version: 1.0.0
initial_state: UNKNOWN
transitions:
  - {name: OK, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: OK}
  - {name: WARNING, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: WARNING}
  - {name: CRITICAL, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: CRITICAL}
  - {name: UNKNOWN, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: UNKNOWN}
  - {name: FORCE_CHECK, from: [UNKNOWN, OK, WARNING, CRITICAL], destination: FORCE_CHECK}
  - {name: MAINTENANCE, from: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK], destination: MAINTENANCE}
  - {name: RESUME, from: [MAINTENANCE], destination: UNKNOWN}
watchers:
  - name: check
    type: nagios
    state_match: [UNKNOWN, OK, WARNING, CRITICAL, FORCE_CHECK]
    interval: 1h
    properties:
      plugin: ./check.sh
      timeout: 5s
      annotations: {team: storage}
"#;
    let f = fixture();
    std::fs::write(f.dir.path().join("code"), "1").unwrap();
    let script = f.dir.path().join("check.sh");
    std::fs::write(&script, "#!/bin/sh\nc=$(cat code)\necho \"DISK state $c | /=2643MB;5948;5958;0;5968\"\nexit $c\n")
        .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let m = f.start(SCOUT);
    let nagios = |r: &[EventRecord]| -> Vec<(String, String, Vec<serde_json::Value>)> {
        r.iter()
            .filter_map(|r| match &r.data {
                Event::Watcher(WatcherState { details: WatcherDetails::Nagios(n), .. }) => {
                    Some((n.status.clone(), n.output.clone(), n.perfdata.clone()))
                }
                _ => None,
            })
            .collect()
    };
    let records = f.wait_for("a WARNING check", |r| !nagios(r).is_empty()).await;
    let first = &nagios(&records)[0];
    assert_eq!((first.0.as_str(), first.1.as_str()), ("WARNING", "DISK state 1"));
    assert_eq!(first.2[0]["unit"], "MB");
    eventually("the machine in WARNING", Duration::from_secs(10), || {
        let s = m.state();
        async move {
            if s == "WARNING" {
                Ok(())
            } else {
                Err(s)
            }
        }
    })
    .await;

    // Fixed, then forced: checked at once (the interval is an hour), and OK.
    std::fs::write(f.dir.path().join("code"), "0").unwrap();
    m.transition("FORCE_CHECK").await.unwrap();
    f.wait_for("an OK check", |r| nagios(r).iter().any(|n| n.0 == "OK")).await;
    eventually("the machine in OK", Duration::from_secs(10), || {
        let s = m.state();
        async move {
            if s == "OK" {
                Ok(())
            } else {
                Err(s)
            }
        }
    })
    .await;
    // In maintenance a forced check is refused by the machine itself.
    m.transition("MAINTENANCE").await.unwrap();
    assert!(m.transition("FORCE_CHECK").await.is_err());
}

/// A `metric` watcher as Choria writes it (interval in its properties): its command's JSON
/// becomes a `metric` state event with the manifest's labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metric_watcher_publishes_what_its_command_gathers() {
    const METRICS: &str = r#"
name: metrics
version: 1.0.0
initial_state: gather
transitions:
  - {name: ok, from: [gather], destination: gather}
watchers:
  - name: disk
    type: metric
    state_match: [gather]
    properties:
      command: "echo '{\"labels\": {\"mount\": \"/\"}, \"metrics\": {\"free\": 42}}'"
      interval: 1s
      labels: {dc: lon}
      skip_prometheus: true
"#;
    let f = fixture();
    let _m = f.start(METRICS);
    let records = f
        .wait_for("a metric event", |r| {
            r.iter().any(|r| matches!(&r.data, Event::Watcher(WatcherState { details: WatcherDetails::Metric(_), .. })))
        })
        .await;
    let sample = records
        .iter()
        .find_map(|r| match &r.data {
            Event::Watcher(WatcherState { details: WatcherDetails::Metric(m), .. }) => Some(m.metrics.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(sample.metrics["free"].as_i64(), Some(42));
    assert_eq!(
        (sample.labels["mount"].as_str(), sample.labels["dc"].as_str(), sample.labels["format"].as_str()),
        ("/", "lon", "choria")
    );
}

/// Choria's data-store watchers together: an exec watcher's `parse_as_data` output and a
/// `kv` watcher's key land in the machine's data store (and its `machine_data.json`), and an
/// `expression` watcher over `data`, `facts` and `identity` fires once they hold; a changed
/// key fires the kv watcher again, a deleted one removes it from the store.
#[tokio::test]
async fn exec_kv_and_expression_watchers_share_the_machine_data() {
    use chorus_backbone::{Backbone, BucketConfig};
    let f = fixture();
    let site_dir = tempfile::tempdir().unwrap();
    let site: Arc<dyn Backbone> =
        Arc::new(chorus_backbone::embedded::EmbeddedBackbone::open_path(site_dir.path().join("site")).unwrap());
    let bucket = site.bucket(&BucketConfig::new("CONFIG")).await.unwrap();
    bucket.put("node1.example.net", r#"{"spec": {"size": 3}}"#.into()).await.unwrap();
    let yaml = r#"
name: data
version: 1.0.0
initial_state: waiting
transitions:
  - {name: got_config, from: [waiting, configured, ready], destination: configured}
  - {name: ready, from: [configured], destination: ready}
  - {name: broken, from: [waiting, configured, ready], destination: waiting}
watchers:
  - name: facts
    type: exec
    state_match: [waiting]
    properties: {command: 'echo "{\"probe\": {\"ok\": true}}"', parse_as_data: true}
  - name: config
    type: kv
    interval: 1s
    success_transition: got_config
    fail_transition: broken
    properties: {bucket: CONFIG, key: "{{ .Identity }}", store_key: cfg, query: spec}
  - name: check
    type: expression
    interval: 1s
    state_match: [configured]
    success_transition: ready
    properties:
      success_when: 'data.probe.ok && data.CONFIG_cfg.size == 3 && get_fact("os.family") == "debian" && identity == "node1.example.net"'
"#;
    let manifest = Manifest::from_yaml(yaml).unwrap();
    let node = MachineNode {
        backbone: Some(site.clone()),
        facts: serde_json::json!({"os": {"family": "debian"}}),
        data_dir: None,
    };
    let mut machine = Machine::start_on(
        manifest,
        "node1.example.net",
        f.dir.path().to_path_buf(),
        f.emitter.clone(),
        node,
        Shutdown::new(),
    )
    .unwrap();
    f.wait_for("configured, then ready", |r| moves(r).contains(&mv("ready", "configured", "ready"))).await;
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.dir.path().join(data::DATA_FILE)).unwrap()).unwrap();
    assert_eq!(stored, serde_json::json!({"probe": {"ok": true}, "CONFIG_cfg": {"size": 3}}));
    let records = f.sink.records();
    assert!(watcher_states(&records, "check")
        .iter()
        .any(|w| matches!(&w.details, WatcherDetails::Expression(d) if d.previous_outcome == "success_when")));

    bucket.put("node1.example.net", r#"{"spec": {"size": 4}}"#.into()).await.unwrap();
    f.wait_for("the changed key fires again", |r| moves(r).contains(&mv("got_config", "ready", "configured"))).await;
    bucket.delete("node1.example.net", None).await.unwrap();
    eventually("the deleted key leaves the store", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(f.dir.path().join(data::DATA_FILE)).unwrap_or_default();
        async move {
            if text.contains("CONFIG_cfg") {
                Err(text)
            } else {
                Ok(())
            }
        }
    })
    .await;
    machine.stop().await.unwrap();
}

#[test]
fn data_store_watchers_are_checked_as_choria_checks_them() {
    let base =
        "name: m\nversion: 1.0.0\ninitial_state: a\ntransitions: [{name: t, from: [a], destination: a}]\nwatchers:\n";
    let err = |w: &str| Manifest::from_yaml(&format!("{base}{w}")).unwrap_err().to_string();
    assert!(err("  - {name: e, type: expression, properties: {}}").contains("success_when or fail_when"));
    assert!(err("  - {name: e, type: expression, properties: {success_when: '(('}}").contains("success_when"));
    assert!(
        err("  - {name: e, type: expression, interval: 500ms, properties: {fail_when: 'true'}}").contains("interval")
    );
    assert!(err("  - {name: k, type: kv, properties: {bucket: B, key: k, mode: watch}}").contains("watch mode"));
    assert!(err("  - {name: k, type: kv, properties: {key: k}}").contains("bucket: missing"));
    assert!(err("  - {name: k, type: kv, properties: {bucket: 'a b', key: k}}").contains("bucket name"));
    assert!(
        err("  - {name: k, type: kv, properties: {bucket: B, key: k, hiera_config: true}}").contains("hiera_config")
    );
    Manifest::from_yaml(&format!("{base}  - {{name: k, type: kv, properties: {{bucket: B, key: k, mode: poll, bucket_prefix: false, on_successful_get: true}}}}")).unwrap();
}

/// `foreign_state_required`: a watcher checks only while the other machine is in the named
/// state (on paused time: ten intervals pass without a check, then one does).
#[tokio::test(start_paused = true)]
async fn a_watcher_waits_for_the_state_of_another_machine() {
    let f = fixture();
    let gate = "name: gate\nversion: 1.0.0\ninitial_state: closed\ntransitions:\n  - {name: open, from: [closed], destination: opened}\nwatchers:\n  - {name: t, type: timer, state_match: [opened], properties: {timer: 1h}}\n";
    let follower = r#"
name: follower
version: 1.0.0
initial_state: waiting
transitions:
  - {name: go, from: [waiting], destination: done}
watchers:
  - name: when_open
    type: expression
    interval: 1s
    success_transition: go
    foreign_state_required: [{machine_name: gate, state: opened}]
    properties: {success_when: 'identity == "node1.example.net"'}
"#;
    let mut machines = vec![f.start(gate), f.start(follower)];
    connect_subscriptions(&mut machines);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(machines[1].state(), "waiting", "no check while the gate is closed");
    machines[0].transition("open").await.unwrap();
    let mut state = machines[1].subscribe();
    state.wait_for(|s| s == "done").await.unwrap();
    let err = Manifest::from_yaml(&follower.replace("state: opened", "state: ''")).unwrap_err().to_string();
    assert!(err.contains("foreign_state_required[0].state: missing"), "{err}");
}
