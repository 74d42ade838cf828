//! What each exported record says: the CloudEvent as stored (the default), or the schemas
//! SIEM teams normalise to: OCSF (Open Cybersecurity Schema Framework 1.1: AAA logins as
//! Authentication, class 3002; signing decisions and RPC records as API Activity, class 6003)
//! or the Elastic Common Schema (8.11). The mapping is documented field by field in
//! docs/CONSUMERS.md, "Formats"; every rendering keeps the CloudEvent whole (`raw_data`,
//! `event.original`), so nothing the stream holds is lost in translation.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use chorus_schemas::{Event, RpcReply, RpcRequest, StatusCode};

use super::record::{Decision, ExportRecord};

/// OCSF schema version the records follow.
pub const OCSF_VERSION: &str = "1.1.0";
/// ECS version the records follow.
pub const ECS_VERSION: &str = "8.11.0";

/// The shape of each exported record.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The CloudEvent as stored (one JSON line).
    #[default]
    Cloudevents,
    /// OCSF 1.1: Authentication (3002) for logins, API Activity (6003) for the rest.
    Ocsf,
    /// Elastic Common Schema 8.11.
    Ecs,
}

impl Format {
    /// The record in this format, as one line of JSON; `None` for CloudEvents (the stored
    /// JSON is used as it is).
    pub fn render(self, record: &ExportRecord) -> Option<String> {
        match self {
            Format::Cloudevents => None,
            Format::Ocsf => Some(ocsf(&Facts::of(record)).to_string()),
            Format::Ecs => Some(ecs(&Facts::of(record)).to_string()),
        }
    }

    /// The HEC `sourcetype` for this format when the configuration sets none.
    pub fn default_sourcetype(self) -> &'static str {
        match self {
            Format::Cloudevents => "chorus:cloudevent",
            Format::Ocsf => "chorus:ocsf",
            Format::Ecs => "chorus:ecs",
        }
    }
}

/// What kind of decision or record an exported record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An AAA login decision (an audit record whose request is a login).
    Login,
    /// An AAA signing decision (an audit record of an RPC request).
    Signing,
    /// An RPC request as the client sent it.
    Request,
    /// A node's reply (its Action Policy decision and the action's outcome).
    Reply,
}

/// The facts both schemas are built from, read once from the record.
struct Facts<'a> {
    record: &'a ExportRecord,
    kind: Kind,
    /// Unix milliseconds.
    time_ms: i64,
    /// Who decided or acted: the AAA service, the node that replied, the client that sent.
    host: &'a str,
    /// The user name of a login (`username` of the request).
    username: Option<&'a str>,
    /// The client's address, `ip` or `ip:port`, when the decider saw one.
    client: Option<&'a str>,
    /// Why not, when denied or failed.
    reason: Option<String>,
    /// A stable short code of the reason.
    code: Option<String>,
    /// Whether the decision or action succeeded; `None` for a request (no outcome yet). A
    /// reply can be authorised (its record's decision) and still fail.
    success: Option<bool>,
    /// The caller's token id.
    jti: Option<&'a str>,
    /// RPC collective.
    collective: Option<&'a str>,
    /// Choria status code and message of a reply.
    status: Option<(StatusCode, &'a str)>,
}

impl<'a> Facts<'a> {
    fn of(record: &'a ExportRecord) -> Self {
        let e = &record.event;
        let time_ms = e.time.timestamp_millis();
        let success = record.decision.and_then(Decision::allowed);
        let mut facts = Facts {
            record,
            kind: Kind::Request,
            time_ms,
            host: &e.subject,
            username: None,
            client: None,
            reason: None,
            code: None,
            success,
            jti: None,
            collective: None,
            status: None,
        };
        match &e.data {
            Event::Audit(a) => {
                let login = a.request.get("action").and_then(Value::as_str) == Some("login")
                    && !a.request.contains_key("agent");
                facts.kind = if login { Kind::Login } else { Kind::Signing };
                facts.username = a.request.get("username").and_then(Value::as_str);
                facts.client = a.client.as_deref();
                facts.reason = a.reason.clone();
                facts.code = a.code.clone();
                facts.jti = a.jti.as_deref();
                facts.collective = a.request.get("collective").and_then(Value::as_str);
            }
            Event::RpcRequest(RpcRequest { collective, .. }) => {
                facts.collective = Some(collective);
            }
            Event::RpcReply(RpcReply { collective, statuscode, statusmsg, authorized, .. }) => {
                facts.kind = Kind::Reply;
                facts.collective = Some(collective);
                facts.status = Some((*statuscode, statusmsg));
                // Authorised and run: success is the action's own status.
                facts.success = Some(*authorized && *statuscode == StatusCode::Ok);
                if !authorized {
                    facts.code = Some("policy_denied".into());
                    facts.reason = Some(statusmsg.clone()).filter(|m| !m.is_empty());
                } else if *statuscode != StatusCode::Ok {
                    facts.code = Some(format!("status_{}", statuscode.code()));
                    facts.reason = Some(statusmsg.clone()).filter(|m| !m.is_empty());
                }
            }
            _ => {}
        }
        facts
    }

    /// Whether the caller was allowed (the AAA decision, the node's Action Policy): the
    /// record's decision; `None` for a request (not judged yet).
    fn authorized(&self) -> Option<bool> {
        self.record.decision.and_then(Decision::allowed)
    }

    /// `agent.action`, the operation an RPC record is about.
    fn operation(&self) -> Option<String> {
        match (&self.record.agent, &self.record.action) {
            (Some(agent), Some(action)) => Some(format!("{agent}.{action}")),
            (None, Some(action)) => Some(action.clone()),
            _ => None,
        }
    }

    /// The client address split into IP and port.
    fn client_ip_port(&self) -> Option<(String, Option<u16>)> {
        let client = self.client?;
        if let Ok(addr) = client.parse::<std::net::SocketAddr>() {
            return Some((addr.ip().to_string(), Some(addr.port())));
        }
        client.parse::<std::net::IpAddr>().ok().map(|ip| (ip.to_string(), None))
    }

    /// One sentence for people reading the SIEM.
    fn message(&self) -> String {
        let caller = &self.record.callerid;
        let outcome = match self.success {
            Some(true) => "allowed",
            Some(false) => "denied",
            None => "recorded",
        };
        let why = self.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
        match self.kind {
            Kind::Login => format!("login of {} {outcome}{why}", self.username.unwrap_or(caller)),
            Kind::Signing => {
                format!("signing of {} for {caller} {outcome}{why}", self.operation().unwrap_or_default())
            }
            Kind::Request => format!("{caller} requested {}", self.operation().unwrap_or_default()),
            Kind::Reply => {
                let outcome = match self.success {
                    Some(true) => "succeeded",
                    _ if self.code.as_deref() == Some("policy_denied") => "was denied by Action Policy",
                    _ => "failed",
                };
                format!("{} on {} for {caller} {outcome}{why}", self.operation().unwrap_or_default(), self.host)
            }
        }
    }
}

/// Inserts `value` unless it is null.
fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    if !value.is_null() {
        map.insert(key.into(), value);
    }
}

/// OCSF: Authentication (3002, category Identity & Access Management) for AAA logins, API
/// Activity (6003, category Application Activity) for signing decisions and RPC records.
fn ocsf(f: &Facts<'_>) -> Value {
    let r = f.record;
    let (class_uid, class_name, category_uid, category_name, activity_id, activity_name) = match f.kind {
        Kind::Login => (3002, "Authentication", 3, "Identity & Access Management", 1, "Logon"),
        _ => (6003, "API Activity", 6, "Application Activity", 99, "Other"),
    };
    let (status_id, status) = match f.success {
        Some(true) => (1, "Success"),
        Some(false) => (2, "Failure"),
        None => (0, "Unknown"),
    };
    // Informational for what went through; Medium for a refusal (someone was stopped).
    let (severity_id, severity) = match f.success {
        Some(false) => (3, "Medium"),
        _ => (1, "Informational"),
    };
    let mut out = Map::new();
    out.insert("class_uid".into(), class_uid.into());
    out.insert("class_name".into(), class_name.into());
    out.insert("category_uid".into(), category_uid.into());
    out.insert("category_name".into(), category_name.into());
    out.insert("activity_id".into(), activity_id.into());
    out.insert("activity_name".into(), activity_name.into());
    out.insert("type_uid".into(), (class_uid * 100 + activity_id).into());
    out.insert("type_name".into(), format!("{class_name}: {activity_name}").into());
    out.insert("time".into(), f.time_ms.into());
    out.insert("severity_id".into(), severity_id.into());
    out.insert("severity".into(), severity.into());
    out.insert("status_id".into(), status_id.into());
    out.insert("status".into(), status.into());
    put(&mut out, "status_code", f.code.clone().map(Value::from).unwrap_or(Value::Null));
    put(&mut out, "status_detail", f.reason.clone().map(Value::from).unwrap_or(Value::Null));
    out.insert("message".into(), f.message().into());
    let mut metadata = Map::new();
    metadata.insert("version".into(), OCSF_VERSION.into());
    metadata.insert("uid".into(), r.id().into());
    metadata.insert(
        "product".into(),
        json!({"name": "Chorus", "vendor_name": "Chorus", "version": env!("CARGO_PKG_VERSION")}),
    );
    metadata.insert("log_name".into(), r.stream.as_str().into());
    metadata.insert("sequence".into(), r.sequence.into());
    metadata.insert("original_time".into(), r.event.time.to_rfc3339().into());
    put(&mut metadata, "correlation_uid", r.requestid.clone().map(Value::from).unwrap_or(Value::Null));
    put(&mut metadata, "labels", r.site.as_ref().map(|s| json!([format!("site:{s}")])).unwrap_or(Value::Null));
    out.insert("metadata".into(), metadata.into());
    let mut user = Map::new();
    user.insert("uid".into(), r.callerid.as_str().into());
    user.insert("name".into(), f.username.unwrap_or_else(|| caller_name(&r.callerid)).into());
    put(&mut user, "credential_uid", f.jti.map(Value::from).unwrap_or(Value::Null));
    let mut actor = Map::new();
    actor.insert("user".into(), Value::Object(user.clone()));
    let mut src = Map::new();
    if let Some((ip, port)) = f.client_ip_port() {
        src.insert("ip".into(), ip.into());
        put(&mut src, "port", port.map(Value::from).unwrap_or(Value::Null));
    }
    if let Event::RpcRequest(q) = &r.event.data {
        src.insert("hostname".into(), q.senderid.as_str().into());
    }
    put(&mut out, "src_endpoint", if src.is_empty() { Value::Null } else { Value::Object(src) });
    // The record's subject is who decided or answered (AAA, the node); a request's is its
    // sender, already the source.
    if f.kind != Kind::Request {
        out.insert("dst_endpoint".into(), json!({"hostname": f.host}));
    }
    match f.kind {
        Kind::Login => {
            out.insert("user".into(), Value::Object(user));
            out.insert("actor".into(), Value::Object(actor));
            out.insert("auth_protocol_id".into(), 99.into());
            out.insert("auth_protocol".into(), "Chorus AAA (password and key proof)".into());
            out.insert("is_mfa".into(), false.into());
            out.insert("service".into(), json!({"name": "chorus-aaa"}));
        }
        _ => {
            out.insert("actor".into(), Value::Object(actor));
            let mut api = Map::new();
            put(&mut api, "operation", f.operation().map(Value::from).unwrap_or(Value::Null));
            put(&mut api, "service", r.agent.as_ref().map(|a| json!({"name": a})).unwrap_or(Value::Null));
            put(&mut api, "request", r.requestid.as_ref().map(|id| json!({"uid": id})).unwrap_or(Value::Null));
            if let Some((code, message)) = f.status {
                let mut response = Map::new();
                response.insert("code".into(), code.code().into());
                put(
                    &mut response,
                    "message",
                    Some(message).filter(|m| !m.is_empty()).map(Value::from).unwrap_or(Value::Null),
                );
                api.insert("response".into(), response.into());
            }
            put(&mut api, "group", f.collective.map(|c| json!({"name": c})).unwrap_or(Value::Null));
            out.insert("api".into(), api.into());
        }
    }
    out.insert("raw_data".into(), r.cloudevent.as_str().into());
    out.into()
}

/// Elastic Common Schema: `event.*` categorised as authentication (logins) or api (signing
/// and RPC), `user`, `source`, `host`, with Chorus's own fields under `chorus`.
fn ecs(f: &Facts<'_>) -> Value {
    let r = f.record;
    let (category, dataset, service) = match f.kind {
        Kind::Login => ("authentication", "chorus.aaa", "chorus-aaa"),
        Kind::Signing => ("api", "chorus.aaa", "chorus-aaa"),
        Kind::Request | Kind::Reply => ("api", "chorus.rpc", "chorus"),
    };
    // The type is the access decision; whether the action then worked is the outcome.
    let kind_type = match (f.kind, f.authorized()) {
        (Kind::Login, _) => "start",
        (_, Some(true)) => "allowed",
        (_, Some(false)) => "denied",
        _ => "info",
    };
    let mut event = Map::new();
    event.insert("kind".into(), "event".into());
    event.insert("category".into(), json!([category]));
    event.insert("type".into(), json!([kind_type]));
    event.insert(
        "action".into(),
        match f.kind {
            Kind::Login => "login".to_string(),
            Kind::Signing => format!("sign:{}", f.operation().unwrap_or_default()),
            Kind::Request => format!("rpc-request:{}", f.operation().unwrap_or_default()),
            Kind::Reply => format!("rpc-reply:{}", f.operation().unwrap_or_default()),
        }
        .into(),
    );
    put(
        &mut event,
        "outcome",
        match f.success {
            Some(true) => "success".into(),
            Some(false) => "failure".into(),
            None => "unknown".into(),
        },
    );
    event.insert("id".into(), r.id().into());
    event.insert("module".into(), "chorus".into());
    event.insert("dataset".into(), dataset.into());
    event.insert("provider".into(), r.stream.as_str().into());
    event.insert("sequence".into(), r.sequence.into());
    put(&mut event, "code", f.code.clone().map(Value::from).unwrap_or(Value::Null));
    put(&mut event, "reason", f.reason.clone().map(Value::from).unwrap_or(Value::Null));
    event.insert("original".into(), r.cloudevent.as_str().into());
    let mut out = Map::new();
    out.insert("@timestamp".into(), r.event.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true).into());
    out.insert("ecs".into(), json!({"version": ECS_VERSION}));
    out.insert("message".into(), f.message().into());
    out.insert("event".into(), event.into());
    let mut user = Map::new();
    user.insert("id".into(), r.callerid.as_str().into());
    user.insert("name".into(), f.username.unwrap_or_else(|| caller_name(&r.callerid)).into());
    if let Some((domain, _)) = r.callerid.split_once('=') {
        user.insert("domain".into(), domain.into());
    }
    out.insert("user".into(), user.into());
    if let Some((ip, port)) = f.client_ip_port() {
        let mut source = Map::new();
        source.insert("ip".into(), ip.clone().into());
        source.insert("address".into(), f.client.unwrap_or(&ip).into());
        put(&mut source, "port", port.map(Value::from).unwrap_or(Value::Null));
        out.insert("source".into(), source.into());
    }
    out.insert("host".into(), json!({"name": f.host, "hostname": f.host}));
    out.insert("service".into(), json!({"name": service}));
    put(&mut out, "labels", r.site.as_ref().map(|s| json!({"site": s})).unwrap_or(Value::Null));
    let mut chorus = Map::new();
    chorus.insert("type".into(), r.event.data.event_type().to_string().into());
    put(&mut chorus, "agent", r.agent.clone().map(Value::from).unwrap_or(Value::Null));
    put(&mut chorus, "action", r.action.clone().map(Value::from).unwrap_or(Value::Null));
    put(&mut chorus, "requestid", r.requestid.clone().map(Value::from).unwrap_or(Value::Null));
    put(&mut chorus, "decision", r.decision.map(|d| Value::from(d.as_str())).unwrap_or(Value::Null));
    put(&mut chorus, "collective", f.collective.map(Value::from).unwrap_or(Value::Null));
    put(&mut chorus, "token_id", f.jti.map(Value::from).unwrap_or(Value::Null));
    put(&mut chorus, "site", r.site.clone().map(Value::from).unwrap_or(Value::Null));
    if let Some((code, message)) = f.status {
        chorus.insert("statuscode".into(), code.code().into());
        chorus.insert("statusmsg".into(), message.into());
    }
    out.insert("chorus".into(), chorus.into());
    out.into()
}

/// The name part of a caller id (`up=alice` → `alice`).
fn caller_name(callerid: &str) -> &str {
    callerid.split_once('=').map_or(callerid, |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_export::record::tests::{audit, record};
    use chorus_schemas::{AuditAction, AuditRecord, EventRecord, RpcReply, RpcRequest, StatusCode};

    fn login(decision: AuditAction, client: &str) -> ExportRecord {
        let mut request = serde_json::Map::new();
        request.insert("action".into(), "login".into());
        request.insert("username".into(), "alice".into());
        let mut a = AuditRecord::new("aaa1.example.net", "london", "up=alice", decision, request);
        a.client = Some(client.into());
        a.reason = Some("wrong password".into()).filter(|_| decision == AuditAction::Deny);
        a.code = Some("bad_credentials".into()).filter(|_| decision == AuditAction::Deny);
        a.time = 1_713_772_800;
        record(EventRecord::new(a, 3).with_site("london"))
    }

    fn parse(format: Format, r: &ExportRecord) -> Value {
        serde_json::from_str(&format.render(r).unwrap()).unwrap()
    }

    #[test]
    fn a_denied_login_is_an_ocsf_authentication_failure_with_the_client_address() {
        let r = login(AuditAction::Deny, "192.0.2.7:51234");
        let o = parse(Format::Ocsf, &r);
        assert_eq!(
            (o["class_uid"].as_i64(), o["activity_id"].as_i64(), o["type_uid"].as_i64()),
            (Some(3002), Some(1), Some(300201))
        );
        assert_eq!((o["status_id"].as_i64(), o["status"].as_str()), (Some(2), Some("Failure")));
        assert_eq!(o["status_code"], "bad_credentials");
        assert_eq!(o["status_detail"], "wrong password");
        assert_eq!(o["src_endpoint"]["ip"], "192.0.2.7");
        assert_eq!(o["src_endpoint"]["port"], 51234);
        assert_eq!(o["user"]["name"], "alice");
        assert_eq!(o["user"]["uid"], "up=alice");
        assert_eq!(o["dst_endpoint"]["hostname"], "aaa1.example.net");
        assert_eq!(o["metadata"]["uid"], r.id());
        assert_eq!(o["metadata"]["version"], OCSF_VERSION);
        assert_eq!(o["time"], 1_713_772_800_000_i64, "epoch milliseconds");
        assert_eq!(o["raw_data"].as_str(), Some(r.cloudevent.as_str()), "the CloudEvent is kept whole");
    }

    #[test]
    fn a_denied_login_in_ecs_has_outcome_failure_and_source_ip() {
        let r = login(AuditAction::Deny, "2001:db8::1");
        let e = parse(Format::Ecs, &r);
        assert_eq!(e["event"]["category"], json!(["authentication"]));
        assert_eq!(e["event"]["outcome"], "failure");
        assert_eq!(e["event"]["action"], "login");
        assert_eq!(e["event"]["reason"], "wrong password");
        assert_eq!(e["source"]["ip"], "2001:db8::1");
        assert!(e["source"].get("port").is_none());
        assert_eq!((e["user"]["name"].as_str(), e["user"]["domain"].as_str()), (Some("alice"), Some("up")));
        assert_eq!(e["ecs"]["version"], ECS_VERSION);
        assert_eq!(e["event"]["original"].as_str(), Some(r.cloudevent.as_str()));
        assert!(e["@timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn signing_decisions_and_rpc_records_are_api_activity() {
        let allowed = record(audit(AuditAction::Allow, "up=bob"));
        let o = parse(Format::Ocsf, &allowed);
        assert_eq!((o["class_uid"].as_i64(), o["status_id"].as_i64()), (Some(6003), Some(1)));
        assert_eq!(o["api"]["operation"], "rpcutil.ping");
        assert_eq!(o["actor"]["user"]["name"], "bob");
        let e = parse(Format::Ecs, &allowed);
        assert_eq!(
            (e["event"]["category"][0].as_str(), e["event"]["outcome"].as_str()),
            (Some("api"), Some("success"))
        );
        assert_eq!(e["event"]["action"], "sign:rpcutil.ping");

        let req = RpcRequest::new("up=bob", "client1", "choria", "service", "restart", Default::default());
        let o = parse(Format::Ocsf, &record(EventRecord::new(req.clone(), 1)));
        assert_eq!(
            (o["status_id"].as_i64(), o["api"]["request"]["uid"].as_str()),
            (Some(0), Some(req.requestid.as_str()))
        );
        assert_eq!(o["src_endpoint"]["hostname"], "client1");
        let denied = record(EventRecord::new(RpcReply::denied(&req, "n1", "policy says no"), 2));
        let o = parse(Format::Ocsf, &denied);
        assert_eq!((o["status_id"].as_i64(), o["status_code"].as_str()), (Some(2), Some("policy_denied")));
        assert_eq!(o["dst_endpoint"]["hostname"], "n1");
        let failed = record(EventRecord::new(RpcReply::new(&req, "n1", StatusCode::Aborted, Default::default()), 3));
        let e = parse(Format::Ecs, &failed);
        assert_eq!((e["event"]["outcome"].as_str(), e["chorus"]["statuscode"].as_u64()), (Some("failure"), Some(1)));
        assert_eq!(e["event"]["type"], json!(["allowed"]), "authorised, then the action failed");
        let e = parse(Format::Ecs, &denied);
        assert_eq!((e["event"]["type"][0].as_str(), e["event"]["outcome"].as_str()), (Some("denied"), Some("failure")));
        let o = parse(Format::Ocsf, &record(EventRecord::new(req.clone(), 1)));
        assert!(o.get("dst_endpoint").is_none(), "a request's subject is its sender: {o}");
    }

    #[test]
    fn cloudevents_is_the_stored_json() {
        assert_eq!(Format::Cloudevents.render(&record(audit(AuditAction::Allow, "x"))), None);
    }
}
