//! One deterministic sample record per event type, shared by the tests, the checked-in fuzz
//! seeds and the schema validation.

use chrono::DateTime;
use serde_json::json;

use crate::audit::{AuditAction, AuditRecord};
use crate::envelope::{Event, EventRecord};
use crate::lifecycle::{Alive, Governor, GovernorEventType, Provisioned, Shutdown, Startup, Upgraded};
use crate::machine::{
    ArchiveDetails, ExecDetails, FileDetails, GossipDetails, HttpSwitchDetails, KvDetails, MachineInstance,
    ManagedDetails, MetricDetails, MetricSample, NagiosDetails, OutcomeDetails, ScheduleDetails, TimerDetails,
    Transition, WatcherDetails, WatcherState,
};
use crate::reaction::{Reaction, ReactionAction, ReactionCause, ReactionOutcome};
use crate::registration::{AgentMetadata, BuildInfo, InventoryContent, MachineSummary, NodeStatus, Registration};
use crate::rpc::{FactFilter, Filter, JsonObject, RpcReply, RpcRequest, StatusCode};

/// Fixed time of every sample: 2024-04-22T08:00:00Z.
pub(crate) const T: i64 = 1_713_772_800;

fn object(value: serde_json::Value) -> JsonObject {
    match value {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("samples pass objects"),
    }
}

fn instance() -> MachineInstance {
    MachineInstance {
        identity: "node1.example.net".into(),
        id: "5b4c2a52-4f7e-4f0b-9d39-4c6d0f5d1e11".into(),
        machine: "HVAC".into(),
        version: "1.0.0".into(),
    }
}

/// Wraps with a fixed id (lifecycle: its own id) and time.
fn record(data: impl Into<Event>, n: u64) -> EventRecord {
    let mut record = EventRecord::new(data, n);
    if !matches!(record.data, Event::Lifecycle(_)) {
        record.id = format!("0190f5a0-0000-7000-8000-{n:012}");
    }
    record.time = DateTime::from_timestamp(T, 0).unwrap();
    if n & 1 == 0 {
        record.site = Some("london".into());
    }
    record
}

macro_rules! fixed_lifecycle {
    ($event:expr, $n:expr) => {{
        let mut e = $event;
        e.id = format!("0190f5a0-0000-7000-8000-{:012}", $n);
        e.timestamp = T;
        e
    }};
}

/// Every sample as (event type, record), in [`Event::TYPES`] order.
pub(crate) fn samples() -> Vec<(&'static str, EventRecord)> {
    let request = {
        let mut r = RpcRequest::new(
            "up=bob",
            "client1.example.net",
            "choria",
            "service",
            "restart",
            object(
                json!({"service": "nginx", "force": true, "retries": 3, "ratio": 0.25, "tags": ["a", "b"], "opts": {"nested": null}}),
            ),
        );
        r.requestid = "f374d0d5a79258858a92025efe0ecd03".into();
        r.time = T;
        r.filter = Filter {
            fact: vec![FactFilter { fact: "country".into(), operator: "==".into(), value: "uk".into() }],
            cf_class: vec!["roles::web".into()],
            agent: vec!["service".into()],
            identity: vec![],
            compound: vec![vec![object(json!({"expr": "with('apache')"}))]],
        };
        r
    };
    let mut reply = RpcReply::new(&request, "node1.example.net", StatusCode::Ok, object(json!({"status": "running"})));
    reply.time = T + 1;
    reply.policy = Some("service.policy: allow up=bob restart".into());
    let mut audit = AuditRecord::new(
        "aaa1.example.net",
        "london",
        "up=bob",
        AuditAction::Deny,
        object(json!({"agent": "service", "action": "restart", "data": {"service": "nginx"}})),
    );
    audit.time = T + 2;
    audit.reason = Some("token expired".into());
    audit.jti = Some("2fJ6tkaSVYZrLfgUhZy2Ww".into());

    let mut reaction = Reaction::new(
        "reactor1",
        "restart_nginx",
        ReactionOutcome::Succeeded,
        "restart_nginx-CHORUS_MACHINE-42",
        "node1.example.net",
        "3 events within 1m",
    );
    reaction.time = T + 3;
    reaction.cause = Some(ReactionCause {
        stream: "CHORUS_MACHINE".into(),
        sequence: 42,
        event_id: "0190a0e4-1c4e-7cc0-8000-000000000001".into(),
        event_type: "io.choria.machine.watcher.nagios.v1.state".into(),
        subject: "node1.example.net".into(),
    });
    reaction.action =
        Some(ReactionAction { index: 0, kind: "rpc".into(), detail: "1 of 1 nodes replied OK".into(), attempts: 1 });

    let mut registration = Registration::new(InventoryContent {
        agents: vec![AgentMetadata {
            name: "rpcutil".into(),
            version: "0.1.0".into(),
            license: "Apache-2.0".into(),
            author: "Chorus".into(),
            timeout: 10,
            url: "https://choria.io".into(),
            description: "General helpful actions".into(),
            provider: None,
        }],
        classes: vec!["roles::web".into()],
        facts: object(json!({"country": "uk", "cpus": 8, "os": {"family": "debian"}})),
        status: NodeStatus {
            identity: "node1.example.net".into(),
            uptime: 3600,
            connected_server: "nats://broker1:4222".into(),
            last_message: T,
            provisioning_mode: false,
        },
        collectives: vec!["choria".into()],
        build_info: BuildInfo { version: "0.1.0".into(), sha: String::new() },
        machines: vec![MachineSummary { name: "HVAC".into(), version: "1.0.0".into(), state: "idle".into() }],
    });
    registration.timestamp = T + 3;

    let watcher = |details: WatcherDetails, name: &str| {
        let mut w = WatcherState::new(&instance(), name, details);
        w.timestamp = T;
        w
    };
    let mut transition = Transition::new(&instance(), "air_bad", "idle", "running");
    transition.timestamp = T;

    let records = vec![
        record(fixed_lifecycle!(Startup::new("node1.example.net", "server", "0.1.0"), 1), 1),
        record(fixed_lifecycle!(Alive::new("node1.example.net", "server", "0.1.0", Some(1800)), 2), 2),
        record(fixed_lifecycle!(Shutdown::new("node1.example.net", "server"), 3), 3),
        record(fixed_lifecycle!(Provisioned::new("node2.example.net", "provision_mode_server"), 4), 4),
        record(fixed_lifecycle!(Upgraded::new("node1.example.net", "server", "0.1.0", "0.2.0"), 5), 5),
        record(
            fixed_lifecycle!(Governor::new("node1.example.net", "CLI", "upgrades", 7, GovernorEventType::Enter), 6),
            6,
        ),
        record(transition, 7),
        record(
            watcher(
                WatcherDetails::Exec(ExecDetails {
                    command: "/bin/sh monitor.sh".into(),
                    previous_outcome: "success".into(),
                    previous_run_time: 1_000_000_000,
                }),
                "monitor",
            ),
            8,
        ),
        record(
            watcher(
                WatcherDetails::File(FileDetails { path: "/etc/hvac.conf".into(), previous_outcome: "changed".into() }),
                "config",
            ),
            9,
        ),
        record(watcher(WatcherDetails::Schedule(ScheduleDetails { state: "on".into() }), "office_hours"), 10),
        record(
            watcher(
                WatcherDetails::Timer(TimerDetails { state: "running".into(), timer: 300_000_000_000 }),
                "cooldown",
            ),
            11,
        ),
        record(
            watcher(
                WatcherDetails::Nagios(NagiosDetails {
                    plugin: "/usr/lib/nagios/plugins/check_load -w 1 -c 2".into(),
                    status: "WARNING".into(),
                    status_code: 1,
                    output: "WARNING - load average: 1.20, 0.90, 0.70".into(),
                    check_time: 1_606_924_953,
                    perfdata: vec![serde_json::json!({"label": "load1", "value": 1.2, "unit": ""})],
                    runtime: serde_json::Number::from_f64(0.012),
                    history: vec![],
                    annotations: [("team".to_string(), "ops".to_string())].into(),
                }),
                "check_load",
            ),
            12,
        ),
        record(
            watcher(
                WatcherDetails::Kv(KvDetails {
                    state: "changed".into(),
                    bucket: "HVAC".into(),
                    key: "setpoint".into(),
                    mode: "poll".into(),
                }),
                "setpoint",
            ),
            13,
        ),
        record(
            watcher(
                WatcherDetails::Expression(OutcomeDetails {
                    previous_outcome: "success".into(),
                    previous_run_time: None,
                }),
                "too_hot",
            ),
            14,
        ),
        record(
            watcher(
                WatcherDetails::Metric(MetricDetails {
                    metrics: MetricSample {
                        labels: [("dc".to_string(), "lon".to_string())].into(),
                        metrics: [("temperature".to_string(), serde_json::Number::from_f64(21.5).unwrap())].into(),
                        time: T,
                    },
                }),
                "temperature",
            ),
            15,
        ),
        record(
            watcher(
                WatcherDetails::Archive(ArchiveDetails {
                    source: "https://repo.example.net/hvac.tgz".into(),
                    creates: "/opt/hvac/bin".into(),
                    previous_outcome: "success".into(),
                    previous_run_time: 2_000_000_000,
                }),
                "bundle",
            ),
            16,
        ),
        record(
            watcher(
                WatcherDetails::Machines(ManagedDetails {
                    machines: Some(vec!["hvac".into(), "facts".into()]),
                    plugins: None,
                    previous_outcome: "success".into(),
                    previous_run_time: 5_000_000,
                }),
                "manager",
            ),
            17,
        ),
        record(
            watcher(
                WatcherDetails::Plugins(ManagedDetails {
                    machines: None,
                    plugins: Some(vec!["hvac".into()]),
                    previous_outcome: "success".into(),
                    previous_run_time: 5_000_000,
                }),
                "plugins",
            ),
            18,
        ),
        record(
            watcher(
                WatcherDetails::Gossip(GossipDetails {
                    previous_subject: "choria.gossip.hvac".into(),
                    previous_payload: "{\"online\":true}".into(),
                    previous_gossip: T,
                }),
                "announce",
            ),
            19,
        ),
        record(
            watcher(
                WatcherDetails::HttpSwitch(HttpSwitchDetails {
                    status: "on".into(),
                    is_on: true,
                    annotations: [("room".to_string(), "office".to_string())].into(),
                }),
                "fan",
            ),
            20,
        ),
        record(
            watcher(
                WatcherDetails::CcmManifest(OutcomeDetails {
                    previous_outcome: "success".into(),
                    previous_run_time: Some(3_000_000_000),
                }),
                "config",
            ),
            21,
        ),
        record(request, 22),
        record(reply, 23),
        record(audit, 24),
        record(registration, 25),
        record(reaction, 26),
    ];
    records.into_iter().map(|r| (r.data.event_type(), r)).collect()
}

/// Choria's exact wire bytes from go-choria `lifecycle/lifecycle_test.go`.
pub(crate) const CHORIA_STARTUP: &str = r#"{"specversion":"1.0","id":"01e72410-d734-4611-9485-8c6a2dd2579b","source":"io.choria.lifecycle","type":"io.choria.lifecycle.v1.startup","subject":"ginkgo.example.net","datacontenttype":"application/json","time":"2018-08-24T10:36:13Z","data":{"protocol":"io.choria.lifecycle.v1.startup","id":"01e72410-d734-4611-9485-8c6a2dd2579b","identity":"ginkgo.example.net","component":"ginkgo","timestamp":1535106973,"version":"1.2.3"}}"#;

/// Choria's legacy (un-wrapped) format, `lifecycle/testdata/choriaFormatShutdown.json` shape.
pub(crate) const CHORIA_LEGACY_SHUTDOWN: &str = r#"{"protocol":"io.choria.lifecycle.v1.shutdown","id":"cb6f1dbc-5a8b-4f5b-9f67-1b7d0a3a6c2e","identity":"dev1.devco.net","component":"server","timestamp":1575482338}"#;

/// A Choria machine transition (reference section 2.3).
pub(crate) const CHORIA_TRANSITION: &str = r#"{"specversion":"1.0","id":"8a0b6f3e-4b8e-4d0c-9d5f-3f5e2b9c7a10","source":"io.choria.machine","type":"io.choria.machine.v1.transition","subject":"example.net","datacontenttype":"application/json","time":"2019-12-05T09:37:45Z","data":{"protocol":"io.choria.machine.v1.transition","identity":"example.net","id":"4ad5e0b4-7c8a-4f9e-8f36-2d0d3a8b1c55","version":"1.0.0","timestamp":1575538665,"machine":"HVAC","transition":"air_bad","from_state":"idle","to_state":"running"}}"#;

/// A Choria exec watcher state (reference section 2.4).
pub(crate) const CHORIA_EXEC_STATE: &str = r#"{"specversion":"1.0","id":"2c4f0e0a-5d7c-4b6a-8e3f-1a2b3c4d5e6f","source":"io.choria.machine","type":"io.choria.machine.watcher.exec.v1.state","subject":"ginkgo","datacontenttype":"application/json","time":"2020-12-02T16:02:33Z","data":{"protocol":"io.choria.machine.watcher.exec.v1.state","identity":"ginkgo","id":"1234567890","version":"1.0.0","timestamp":1606924953,"type":"exec","machine":"exec","name":"ginkgo","command":"/bin/sh","previous_outcome":"success","previous_run_time":1000000000}}"#;
