//! Running a firing's actions: RPC, webhook, command, publish.
//!
//! Every action gets the firing's id and its own index as an idempotency key (`<firing>.<n>`):
//! the published event's id, the webhook's `Idempotency-Key` header, the command's
//! `CHORUS_FIRING` variable. An action interrupted by a crash runs again after the restart
//! with the same key; one that completed does not (its progress is committed first).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::{Backbone, Message};
use chorus_rpc::{RequestOptions, RpcClient, Target};
use chorus_runtime::Shutdown;
use chorus_schemas::StatusCode;
use expr::Context;
use serde_json::{json, Value as Json};
use tokio::io::AsyncWriteExt;

use super::config::{Action, CommandAction, PublishAction, RpcAction, WebhookAction};
use super::rules::Firing;
use super::template::{context, Template, ValueTemplate};

/// What an action needs from outside.
pub(super) struct Actuators {
    pub(super) backbone: Arc<dyn Backbone>,
    pub(super) rpc: Option<RpcClient>,
    pub(super) http: reqwest::Client,
    pub(super) shutdown: Shutdown,
}

/// How an action ended: success, and a line for people, and attempts made.
pub(super) struct Outcome {
    pub(super) ok: bool,
    pub(super) detail: String,
    pub(super) attempts: u32,
}

impl Outcome {
    fn ok(detail: impl Into<String>) -> Self {
        Outcome { ok: true, detail: detail.into(), attempts: 1 }
    }
    pub(super) fn failed(detail: impl Into<String>) -> Self {
        Outcome { ok: false, detail: detail.into(), attempts: 1 }
    }
}

/// The expression context of a firing's cause event, with `firing`, `rule` and `key`.
pub(super) fn firing_context(firing: &Firing) -> Context {
    let subject = firing.event.get("subject").and_then(Json::as_str).unwrap_or_default().to_owned();
    let mut ctx = context(&firing.event, &firing.cause.stream, firing.cause.sequence, &subject);
    ctx.insert("firing", expr::Value::String(firing.id.clone()));
    ctx.insert("rule", expr::Value::String(firing.rule_name.clone()));
    ctx.insert("key", expr::Value::String(firing.key.clone()));
    ctx.insert("reason", expr::Value::String(firing.reason.clone()));
    ctx
}

fn render(text: &str, ctx: &Context) -> Result<String, String> {
    Template::compile(text)?.render(ctx)
}

fn render_value(value: &Json, ctx: &Context) -> Result<Json, String> {
    ValueTemplate::compile(value)?.render(ctx)
}

impl Actuators {
    /// Runs action `index` of `firing`.
    pub(super) async fn run(&self, firing: &Firing, index: usize, action: &Action) -> Outcome {
        let ctx = firing_context(firing);
        let key = format!("{}.{index}", firing.id);
        let result = match action {
            Action::Rpc(a) => self.rpc(a, &ctx).await,
            Action::Webhook(a) => return self.webhook(a, firing, &ctx, &key).await,
            Action::Command(a) => command(a, firing, &ctx, &key).await,
            Action::Publish(a) => self.publish(a, firing, &ctx, &key).await,
        };
        result.unwrap_or_else(Outcome::failed)
    }

    async fn rpc(&self, a: &RpcAction, ctx: &Context) -> Result<Outcome, String> {
        let rpc = self.rpc.as_ref().ok_or("no RPC connection: give the reactor --rpc-nats")?;
        let list = |items: &[String]| items.iter().map(|s| render(s, ctx)).collect::<Result<Vec<_>, _>>();
        let identities: Vec<String> = list(&a.identity)?.into_iter().filter(|s| !s.is_empty()).collect();
        let (facts, classes, compound) = (list(&a.fact)?, list(&a.class)?, list(&a.compound)?);
        let data = match render_value(&Json::Object(a.data.clone()), ctx)? {
            Json::Object(map) => map,
            _ => return Err("data must stay an object".into()),
        };
        let direct = !identities.is_empty()
            && facts.is_empty()
            && classes.is_empty()
            && compound.is_empty()
            && identities.iter().all(|i| !i.starts_with('/'));
        let (filter, target) = if direct {
            (Default::default(), Target::Nodes(identities.clone()))
        } else {
            let filter = chorus_rpc::filter_from_parts(&facts, &classes, &[], &identities, &compound)
                .map_err(|e| e.to_string())?;
            (filter, Target::Broadcast)
        };
        let options = RequestOptions { filter, target, expected: None, timeout: a.timeout, ..Default::default() };
        let results =
            rpc.call(&a.agent, &a.action, data, options).await.map_err(|e| format!("request not sent: {e}"))?;
        let ok = results.replies.iter().filter(|r| r.statuscode == StatusCode::Ok).count();
        let total = results.replies.len();
        let missing = if direct { identities.len().saturating_sub(total) } else { 0 };
        let detail = format!(
            "{}#{}: {ok} of {total} replies OK{}",
            a.agent,
            a.action,
            match missing {
                0 => String::new(),
                n => format!(", {n} nodes did not reply"),
            }
        );
        Ok(if total > 0 && ok == total && missing == 0 { Outcome::ok(detail) } else { Outcome::failed(detail) })
    }

    async fn webhook(&self, a: &WebhookAction, firing: &Firing, ctx: &Context, key: &str) -> Outcome {
        let prepared = (|| -> Result<_, String> {
            let url = render(&a.url, ctx)?;
            let url = reqwest::Url::parse(&url).map_err(|e| format!("url {url:?}: {e}"))?;
            let method = reqwest::Method::from_bytes(a.method.as_bytes()).map_err(|e| e.to_string())?;
            let headers =
                a.headers.iter().map(|(k, v)| Ok((k.clone(), render(v, ctx)?))).collect::<Result<Vec<_>, String>>()?;
            let body = match &a.body {
                Some(b) => render_value(b, ctx)?,
                None => json!({
                    "firing": firing.id, "rule": firing.rule_name, "key": firing.key,
                    "reason": firing.reason, "event": firing.event,
                }),
            };
            Ok((url, method, headers, body))
        })();
        let (url, method, headers, body) = match prepared {
            Ok(p) => p,
            Err(e) => return Outcome::failed(e),
        };
        let mut retry = a.backoff.retry();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .timeout(a.timeout)
                .header("Idempotency-Key", key)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
            for (k, v) in &headers {
                request = request.header(k.as_str(), v.as_str());
            }
            let (retryable, detail) = match request.send().await {
                Ok(r) if r.status().is_success() => {
                    return Outcome { ok: true, detail: format!("HTTP {}", r.status().as_u16()), attempts };
                }
                Ok(r) => {
                    let s = r.status();
                    (s.is_server_error() || s.as_u16() == 429 || s.as_u16() == 408, format!("HTTP {}", s.as_u16()))
                }
                Err(e) => (true, format!("{url}: {e}")),
            };
            if !retryable || attempts >= a.attempts || !retry.wait(&self.shutdown).await {
                return Outcome { ok: false, detail, attempts };
            }
        }
    }

    async fn publish(&self, a: &PublishAction, firing: &Firing, ctx: &Context, key: &str) -> Result<Outcome, String> {
        let subject = render(&a.subject, ctx)?;
        chorus_backbone::subject::validate_publish_subject(&subject).map_err(|e| e.to_string())?;
        let data = match &a.data {
            Some(d) => render_value(d, ctx)?,
            None => firing.event.get("data").cloned().unwrap_or(Json::Null),
        };
        let event = json!({
            "specversion": "1.0",
            "id": key,
            "source": chorus_schemas::reaction::SOURCE,
            "type": a.event_type,
            "subject": firing.key,
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "datacontenttype": chorus_schemas::CONTENT_TYPE,
            "data": data,
        });
        let payload = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
        match self.backbone.publish(Message::new(key.to_owned(), subject.clone(), payload)).await {
            Ok(ack) => Ok(Outcome::ok(format!("published on {subject} ({} seq {})", ack.stream, ack.sequence))),
            Err(e) => Err(format!("publishing on {subject}: {e}")),
        }
    }
}

async fn command(a: &CommandAction, firing: &Firing, ctx: &Context, key: &str) -> Result<Outcome, String> {
    let argv = a.run.iter().map(|s| render(s, ctx)).collect::<Result<Vec<_>, _>>()?;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env("CHORUS_FIRING", key)
        .env("CHORUS_RULE", &firing.rule_name)
        .env("CHORUS_KEY", &firing.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in &a.env {
        cmd.env(k, render(v, ctx)?);
    }
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", argv[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        let event = serde_json::to_vec(&firing.event).unwrap_or_default();
        // A command that does not read its input is fine.
        stdin.write_all(&event).await.ok();
    }
    let out = match tokio::time::timeout(a.timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| format!("{}: {e}", argv[0]))?,
        Err(_) => return Ok(Outcome::failed(format!("{} killed after {:?}", argv[0], a.timeout))),
    };
    let clip = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let s = s.trim();
        s.chars().take(200).collect::<String>()
    };
    let detail = match out.status.code() {
        Some(code) => format!("exit {code}: {}", clip(if out.status.success() { &out.stdout } else { &out.stderr })),
        None => "killed by a signal".to_owned(),
    };
    Ok(if out.status.success() { Outcome::ok(detail) } else { Outcome::failed(detail) })
}

/// How long the reactor waits between attempts to record its own events.
pub(super) const RECORD_BACKOFF: chorus_runtime::Backoff =
    chorus_runtime::Backoff::doubling(Duration::from_millis(200), Duration::from_secs(10));
