//! A record ready for export: the decoded event, its CloudEvent JSON and the audit fields
//! every sink puts in front (id, caller, agent, action, decision, site).

use chorus_backbone::StoredMessage;
use chorus_schemas::{AuditAction, Event, EventKind, EventRecord};
use serde_json::Value;

use super::config::HostnameSource;

/// Decision carried by a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Authorized: an audit `allow`, or an RPC reply with `authorized` true.
    Allow,
    /// Refused by policy: an audit `deny`, or an RPC reply with `authorized` false.
    Deny,
    /// An audit record with decision `unknown`.
    Unknown,
}

impl Decision {
    /// Lowercase name as exported: `allow`, `deny` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Unknown => "unknown",
        }
    }

    /// Whether the caller was allowed; `None` for `unknown`.
    pub fn allowed(self) -> Option<bool> {
        match self {
            Decision::Allow => Some(true),
            Decision::Deny => Some(false),
            Decision::Unknown => None,
        }
    }
}

/// One record on its way to the SIEM.
#[derive(Clone, Debug)]
pub struct ExportRecord {
    /// Stream and sequence it was read from.
    pub stream: String,
    /// Sequence in that stream.
    pub sequence: u64,
    /// The decoded event.
    pub event: EventRecord,
    /// The CloudEvent as compact JSON (one line), every attribute of the stored document kept.
    pub cloudevent: String,
    /// What the sink writes when it is not the CloudEvent: the record in the export's
    /// [`Format`](super::format::Format) (OCSF, ECS).
    pub body: Option<String>,
    /// Caller id of the request (audit or RPC record).
    pub callerid: String,
    /// RPC agent, e.g. `rpcutil`; none when an audit record's request does not name one.
    pub agent: Option<String>,
    /// RPC action, e.g. `ping`; none when an audit record's request does not name one.
    pub action: Option<String>,
    /// The decision: an audit record's action, an RPC reply's `authorized`; none for requests.
    pub decision: Option<Decision>,
    /// The event's `site` extension, else the audit record's site.
    pub site: Option<String>,
    /// RPC request id (RPC records only).
    pub requestid: Option<String>,
}

/// Why a stored message cannot be exported: it goes to the dead-letter stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Stable short code (`not_json`, `unexpected_type`, ...).
    pub code: String,
    /// Human-readable explanation, stored with the dead letter and logged.
    pub reason: String,
}

impl ExportRecord {
    /// Decodes a stored message; only audit records and RPC requests and replies are exported.
    pub fn from_stored(message: &StoredMessage) -> Result<Self, Rejection> {
        let event = EventRecord::decode(&message.payload)
            .map_err(|e| Rejection { code: e.code().to_owned(), reason: e.to_string() })?;
        if !matches!(event.data.kind(), EventKind::Audit | EventKind::RpcRequest | EventKind::RpcReply) {
            return Err(Rejection {
                code: "unexpected_type".into(),
                reason: format!(
                    "event type {} is not an audit or RPC record; the audit export takes only those",
                    event.data.event_type()
                ),
            });
        }
        // Decode has parsed it already; parse again to keep every attribute (unknown
        // extensions too) while dropping insignificant white space such as newlines.
        let value: Value = serde_json::from_slice(&message.payload)
            .map_err(|e| Rejection { code: "not_json".into(), reason: e.to_string() })?;
        let cloudevent = value.to_string();
        Ok(Self::new(message.stream.clone(), message.sequence, event, cloudevent))
    }

    /// A record from a decoded event (the CloudEvent JSON is given, e.g. `event.encode()`).
    pub fn new(stream: String, sequence: u64, event: EventRecord, cloudevent: String) -> Self {
        let (callerid, agent, action, decision, audit_site, requestid) = match &event.data {
            Event::Audit(a) => (
                a.callerid.clone(),
                request_str(&a.request, "agent"),
                request_str(&a.request, "action"),
                Some(match a.action {
                    AuditAction::Allow => Decision::Allow,
                    AuditAction::Deny => Decision::Deny,
                    AuditAction::Unknown => Decision::Unknown,
                }),
                Some(a.site.clone()),
                request_str(&a.request, "requestid"),
            ),
            Event::RpcRequest(r) => (
                r.callerid.clone(),
                Some(r.agent.clone()),
                Some(r.action.clone()),
                None,
                None,
                Some(r.requestid.clone()),
            ),
            Event::RpcReply(r) => (
                r.callerid.clone(),
                Some(r.agent.clone()),
                Some(r.action.clone()),
                Some(if r.authorized { Decision::Allow } else { Decision::Deny }),
                None,
                Some(r.requestid.clone()),
            ),
            _ => (String::new(), None, None, None, None, None),
        };
        let site = event.site.clone().or(audit_site).filter(|s| !s.is_empty());
        ExportRecord {
            stream,
            sequence,
            event,
            cloudevent,
            body: None,
            callerid,
            agent,
            action,
            decision,
            site,
            requestid,
        }
    }

    /// What the sink writes: the record in the export's format (by default the CloudEvent).
    pub fn body(&self) -> &str {
        self.body.as_deref().unwrap_or(&self.cloudevent)
    }

    /// Event id (CloudEvents `id`).
    pub fn id(&self) -> &str {
        &self.event.id
    }

    /// Short event type: `audit`, `rpc_request` or `rpc_reply`.
    pub fn short_type(&self) -> &'static str {
        self.event.data.kind().as_str()
    }

    /// Host to report: node identity or site.
    pub fn host(&self, source: HostnameSource) -> &str {
        match (source, &self.site) {
            (HostnameSource::Site, Some(site)) => site,
            _ => &self.event.subject,
        }
    }
}

/// A string field of an audit record's request object (Choria's request carries `agent`,
/// `action`, `requestid`, ...), if present.
fn request_str(request: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    request.get(key).and_then(Value::as_str).map(str::to_owned)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chorus_schemas::{AuditRecord, RpcReply, RpcRequest, StatusCode};

    pub(crate) fn audit(decision: AuditAction, callerid: &str) -> EventRecord {
        let mut request = serde_json::Map::new();
        request.insert("agent".into(), "rpcutil".into());
        request.insert("action".into(), "ping".into());
        let mut a = AuditRecord::new("aaa1.example.net", "london", callerid, decision, request);
        a.time = 1_713_772_800;
        EventRecord::new(a, 7).with_site("london")
    }

    pub(crate) fn record(event: EventRecord) -> ExportRecord {
        let json = String::from_utf8(event.encode()).unwrap();
        ExportRecord::new("CHORUS_AUDIT".into(), 1, event, json)
    }

    pub(crate) fn stored(stream: &str, sequence: u64, payload: &[u8]) -> StoredMessage {
        StoredMessage {
            stream: stream.into(),
            sequence,
            time: chrono::Utc::now(),
            id: format!("m{sequence}"),
            subject: "chorus.audit.deny.london".into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            headers: Vec::new(),
        }
    }

    #[test]
    fn fields_of_each_kind() {
        let r = record(audit(AuditAction::Deny, "up=bob"));
        assert_eq!(
            (r.callerid.as_str(), r.agent.as_deref(), r.action.as_deref()),
            ("up=bob", Some("rpcutil"), Some("ping"))
        );
        assert_eq!((r.decision, r.site.as_deref(), r.short_type()), (Some(Decision::Deny), Some("london"), "audit"));
        assert_eq!(r.host(HostnameSource::Identity), "aaa1.example.net");
        assert_eq!(r.host(HostnameSource::Site), "london");

        let req = RpcRequest::new("up=bob", "client1", "choria", "service", "restart", Default::default());
        let r = record(EventRecord::new(req.clone(), 1));
        assert_eq!(
            (r.decision, r.short_type(), r.requestid.as_deref()),
            (None, "rpc_request", Some(req.requestid.as_str()))
        );
        assert_eq!(r.host(HostnameSource::Site), "client1", "no site: identity");

        let reply = RpcReply::denied(&req, "n1", "policy says no");
        let r = record(EventRecord::new(reply, 1));
        assert_eq!((r.decision, r.short_type()), (Some(Decision::Deny), "rpc_reply"));
        let ok = RpcReply::new(&req, "n1", StatusCode::Ok, Default::default());
        assert_eq!(record(EventRecord::new(ok, 2)).decision, Some(Decision::Allow));
    }

    #[test]
    fn malformed_and_foreign_events_are_rejected() {
        let e = ExportRecord::from_stored(&stored("CHORUS_AUDIT", 1, b"{nope")).unwrap_err();
        assert_eq!(e.code, "not_json");
        let alive = chorus_schemas::lifecycle::Alive::new("n1", "server", "1", None);
        let e =
            ExportRecord::from_stored(&stored("CHORUS_AUDIT", 2, &EventRecord::new(alive, 1).encode())).unwrap_err();
        assert_eq!(e.code, "unexpected_type");
        let mut pretty = serde_json::to_string_pretty(
            &serde_json::from_slice::<Value>(&audit(AuditAction::Allow, "x").encode()).unwrap(),
        )
        .unwrap();
        pretty.push('\n');
        let r = ExportRecord::from_stored(&stored("CHORUS_AUDIT", 3, pretty.as_bytes())).unwrap();
        assert!(!r.cloudevent.contains('\n'), "the CloudEvent is one line");
        assert_eq!((r.stream.as_str(), r.sequence), ("CHORUS_AUDIT", 3));
    }
}
