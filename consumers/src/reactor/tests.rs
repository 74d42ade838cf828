//! The reactor's actions end to end on the embedded store: a webhook with retries and an
//! idempotency key, a command with the event on its input, results recorded as events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::{Backbone, Message};
use chorus_platform::{ensure_platform_streams, StreamLimits};
use chorus_runtime::{Service as _, Shutdown};
use chorus_schemas::lifecycle::Startup;
use chorus_schemas::subject::CHORUS_REACTOR;
use chorus_schemas::{Event, EventRecord, Reaction, ReactionOutcome};
use chorus_testkit::conformance::read_all;
use chorus_testkit::eventually;

use super::{Reactor, ReactorConfig};

async fn reactions(b: &dyn Backbone) -> Vec<Reaction> {
    read_all(b, CHORUS_REACTOR)
        .await
        .into_iter()
        .filter_map(|m| match EventRecord::decode(&m.payload).ok()?.data {
            Event::Reaction(r) => Some(r),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_and_command_actions_run_with_the_firing_as_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("streams")).unwrap());
    ensure_platform_streams(&*b, &StreamLimits::default()).await.unwrap();

    // A webhook receiver that fails the first call, then records what it gets.
    let seen: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let app = {
        let (seen, calls) = (seen.clone(), calls.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (seen, calls) = (seen.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    seen.lock().unwrap().push((key.to_owned(), serde_json::from_str(&body).unwrap()));
                    StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let out = dir.path().join("command.out");
    let config = ReactorConfig::from_yaml(&format!(
        r#"name: acts
state_dir: {state}
start: first
rules:
  - name: started
    match: {{stream: CHORUS_LIFECYCLE, type: io.choria.lifecycle.v1.startup}}
    actions:
      - webhook:
          url: "http://{addr}/hook"
          body: {{node: "{{{{ event.subject }}}}", component: "{{{{ data.component }}}}"}}
          backoff: {{initial: 10ms, max: 10ms}}
      - command:
          run: [sh, -c, 'cat > {out}; echo "$CHORUS_FIRING $1" >> {out}.env', sh, "{{{{ key }}}}"]
      - command:
          run: ["false"]
"#,
        state = dir.path().join("state").display(),
        out = out.display(),
    ))
    .unwrap();
    let mut reactor = Reactor::start(b.clone(), None, config, false, Shutdown::new()).await.unwrap();
    let r = EventRecord::new(Startup::new("web1", "server", "1.0.0"), 1);
    b.publish(Message::new(r.id.clone(), r.nats_subject().unwrap(), r.encode())).await.unwrap();

    let b2 = b.clone();
    eventually("three action results", Duration::from_secs(30), move || {
        let b = b2.clone();
        async move {
            let n = reactions(&*b).await.iter().filter(|r| r.action.is_some()).count();
            if n == 3 {
                Ok(())
            } else {
                Err(format!("{n} results"))
            }
        }
    })
    .await;
    reactor.stop().await.unwrap();

    let records = reactions(&*b).await;
    let firing = &records[0];
    assert_eq!((firing.outcome, firing.key.as_str()), (ReactionOutcome::Fired, "web1"));
    let results: Vec<_> = records[1..]
        .iter()
        .map(|r| (r.outcome, r.action.as_ref().unwrap().attempts, r.action.as_ref().unwrap().kind.clone()))
        .collect();
    assert_eq!(
        results,
        [
            (ReactionOutcome::Succeeded, 2, "webhook".to_string()),
            (ReactionOutcome::Succeeded, 1, "command".to_string()),
            (ReactionOutcome::Failed, 1, "command".to_string()),
        ],
        "the webhook retried a 503; a failed command is recorded and did not stop the rule"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, [(format!("{}.0", firing.firing), serde_json::json!({"node": "web1", "component": "server"}))]);
    let stdin: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(stdin["id"], r.id.as_str(), "the command read the event on its input");
    assert_eq!(
        std::fs::read_to_string(format!("{}.env", out.display())).unwrap().trim(),
        format!("{}.1 web1", firing.firing)
    );
}

#[test]
fn configurations_are_checked_with_the_field_named() {
    let err = |yaml: &str| ReactorConfig::from_yaml(yaml).unwrap_err().to_string();
    let head = "rules:\n  - name: r\n    match: {type: x}\n";
    assert!(err(&format!("{head}    when: {{count: 3}}\n")).contains("rules[0].when.within"));
    assert!(err(&format!("{head}    when: {{absent_for: 1m, changed: data.x}}\n")).contains("rules[0].when"));
    assert!(err(&format!("{head}    actions: [{{rpc: {{agent: a, action: b, identity: ['{{{{ x']}}}}]\n"))
        .contains("rules[0].actions[0].rpc.identity"));
    assert!(err(&format!("{head}    actions: [{{mail: {{}}}}]\n")).contains("mail"));
    // Templates in JSON documents are checked where they stand, quotes and all.
    let data = |d: &str| format!("{head}    actions: [{{rpc: {{agent: a, action: b, data: {d}}}}}]\n");
    assert!(ReactorConfig::from_yaml(&data(r#"{ok: '{{ data.status == "OK" }}'}"#)).is_ok());
    assert!(err(&data("{n: {deep: ['{{ x']}}")).contains("rules[0].actions[0].rpc.data"));
    let body = format!(
        "{head}    actions:\n      - webhook:\n          url: http://h\n          body: {{t: '{{{{ ((  }}}}'}}\n"
    );
    assert!(err(&body).contains("rules[0].actions[0].webhook.body"));
    assert!(err("rules:\n  - name: a.b\n    match: {}\n").contains("rules[0].name"));
    assert!(err("rules:\n  - name: r\n    match: {expression: '(('}\n").contains("rules[0].match.expression"));
    assert!(err("rules: []\nbogus: 1\n").contains("bogus"));
}

/// Records that cannot be stored (no stream captures them yet) hold the reactor back and
/// show in its health; once the stream exists they are stored and health recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_cannot_be_stored_show_in_health_until_they_can() {
    use chorus_backbone::StreamConfig;
    let dir = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backbone> = Arc::new(EmbeddedBackbone::open_path(dir.path().join("streams")).unwrap());
    b.ensure_stream(&StreamConfig::new("CHORUS_LIFECYCLE", vec!["choria.lifecycle.>".into()])).await.unwrap();
    let config = ReactorConfig::from_yaml(&format!(
        "name: r\nstate_dir: {}\nstart: first\nrules:\n  - name: any\n    match: {{type: io.choria.lifecycle.v1.startup}}\n",
        dir.path().join("state").display()
    ))
    .unwrap();
    let mut reactor = Reactor::start(b.clone(), None, config, false, Shutdown::new()).await.unwrap();
    let r = EventRecord::new(Startup::new("web1", "server", "1.0.0"), 1);
    b.publish(Message::new(r.id.clone(), r.nats_subject().unwrap(), r.encode())).await.unwrap();
    let monitor = reactor.monitor();
    let m = &monitor;
    eventually("health to say the records cannot be stored", Duration::from_secs(30), || async move {
        let h = m.health();
        match h.reason.as_deref() {
            Some(why) if !h.healthy && why.contains("cannot record reactions") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    b.ensure_stream(&StreamConfig::new(CHORUS_REACTOR, vec!["chorus.reactor.>".into()])).await.unwrap();
    let b2 = b.clone();
    eventually("the firing recorded and health back", Duration::from_secs(60), move || {
        let (b, m) = (b2.clone(), monitor.clone());
        async move {
            let n = reactions(&*b).await.len();
            if n == 1 && m.health().healthy {
                Ok(())
            } else {
                Err(format!("{n} records, {:?}", m.health()))
            }
        }
    })
    .await;
    reactor.stop().await.unwrap();
}
