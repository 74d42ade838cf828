//! RFC 5424 messages and RFC 6587 octet-counting frames.
//!
//! ```text
//! <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD-ID param="value" ...] MSG
//! <36>1 2024-04-22T08:00:00Z aaa1.example.net chorus - audit [chorus@32473 id="…" callerid="up=bob" agent="rpcutil" action="ping" decision="deny" site="london"] {"specversion":"1.0",…}
//! ```
//!
//! * PRI = facility × 8 + severity, the severity chosen by the record's decision.
//! * TIMESTAMP is the event time (UTC, at most microseconds, as RFC 5424 allows).
//! * HOSTNAME, APP-NAME and MSGID are printable US-ASCII, at most 255, 48 and 32 characters;
//!   anything else is replaced by `_` (an empty value becomes the NILVALUE `-`).
//! * PARAM-VALUEs escape `"`, `\` and `]` with a backslash (RFC 5424 6.3.3).
//! * MSG is the CloudEvent JSON, UTF-8 without a BOM (MSG-ANY): one line, since the JSON is
//!   compact.
//!
//! A frame is `MSG-LEN SP SYSLOG-MSG` where MSG-LEN is the length of SYSLOG-MSG in **octets**
//! (RFC 6587 3.4.1, and RFC 5425 4.3 for TLS).

use chrono::{SecondsFormat, Timelike};

use super::config::{HostnameSource, SyslogConfig};
use super::record::{Decision, ExportRecord};

/// Formats records as RFC 5424 messages for one syslog configuration.
#[derive(Clone, Debug)]
pub struct Formatter {
    facility: u8,
    severity: super::config::SeverityMap,
    app_name: String,
    sd_id: String,
    hostname: HostnameSource,
}

impl Formatter {
    /// A formatter with the facility, severities, APP-NAME and SD-ID of `config`, naming the
    /// host after `hostname`.
    pub fn new(config: &SyslogConfig, hostname: HostnameSource) -> Self {
        Formatter {
            facility: config.facility.code(),
            severity: config.severity,
            app_name: header_field(&config.app_name, 48),
            sd_id: config.sd_id.clone(),
            hostname,
        }
    }

    /// PRI value of a record.
    pub fn pri(&self, record: &ExportRecord) -> u8 {
        let severity = match (record.decision, record.event.data.kind()) {
            (Some(Decision::Allow), _) => self.severity.allow,
            (Some(Decision::Deny), _) => self.severity.deny,
            (Some(Decision::Unknown), _) => self.severity.unknown,
            (None, _) => self.severity.request,
        };
        self.facility * 8 + severity.code()
    }

    /// The SYSLOG-MSG of a record.
    pub fn message(&self, record: &ExportRecord) -> String {
        let mut out = String::with_capacity(record.body().len() + 256);
        out.push('<');
        out.push_str(&self.pri(record).to_string());
        out.push_str(">1 ");
        out.push_str(&timestamp(&record.event.time));
        out.push(' ');
        out.push_str(&header_field(record.host(self.hostname), 255));
        out.push(' ');
        out.push_str(&self.app_name);
        out.push_str(" - ");
        out.push_str(&header_field(record.short_type(), 32));
        out.push(' ');
        self.structured_data(record, &mut out);
        out.push(' ');
        out.push_str(record.body());
        out
    }

    fn structured_data(&self, record: &ExportRecord, out: &mut String) {
        out.push('[');
        out.push_str(&self.sd_id);
        let mut param = |name: &str, value: &str| {
            out.push(' ');
            out.push_str(name);
            out.push_str("=\"");
            escape_param_value(value, out);
            out.push('"');
        };
        param("id", record.id());
        param("type", record.event.data.event_type());
        param("callerid", &record.callerid);
        if let Some(agent) = &record.agent {
            param("agent", agent);
        }
        if let Some(action) = &record.action {
            param("action", action);
        }
        if let Some(decision) = record.decision {
            param("decision", decision.as_str());
        }
        if let Some(site) = &record.site {
            param("site", site);
        }
        if let Some(requestid) = &record.requestid {
            param("requestid", requestid);
        }
        out.push(']');
    }

    /// The octet-counted frame of a record.
    pub fn frame(&self, record: &ExportRecord) -> Vec<u8> {
        frame(self.message(record).as_bytes())
    }
}

/// `MSG-LEN SP SYSLOG-MSG`, MSG-LEN being the byte length of `message`.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let len = message.len().to_string();
    let mut out = Vec::with_capacity(len.len() + 1 + message.len());
    out.extend_from_slice(len.as_bytes());
    out.push(b' ');
    out.extend_from_slice(message);
    out
}

/// Appends `value` with `"`, `\` and `]` escaped by a backslash.
pub fn escape_param_value(value: &str, out: &mut String) {
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A header field: printable US-ASCII (33..=126) only, other characters replaced by `_`,
/// clipped to `max` characters; empty becomes the NILVALUE `-`.
pub fn header_field(value: &str, max: usize) -> String {
    if value.is_empty() {
        return "-".into();
    }
    value.chars().take(max).map(|c| if ('!'..='~').contains(&c) { c } else { '_' }).collect()
}

/// RFC 3339 as RFC 5424 restricts it: `Z`, and at most six fraction digits.
pub fn timestamp(time: &chrono::DateTime<chrono::Utc>) -> String {
    if time.nanosecond() == 0 {
        time.to_rfc3339_opts(SecondsFormat::Secs, true)
    } else {
        // Truncate (not round) to microseconds, so a time never moves into the next second.
        let micros = time.with_nanosecond(time.nanosecond() / 1000 * 1000).unwrap_or(*time);
        micros.to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

/// Splits a byte stream of octet-counted frames into messages; `None` when it is not one.
/// For tests and for checking what a collector received.
pub fn parse_frames(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let space = bytes.iter().position(|&b| b == b' ')?;
        let digits = &bytes[..space];
        if digits.is_empty() || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
        let rest = &bytes[space + 1..];
        if rest.len() < len {
            return None;
        }
        out.push(rest[..len].to_vec());
        bytes = &rest[len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_export::config::{Facility, Severity};
    use crate::audit_export::record::tests::{audit, record};
    use chorus_schemas::{AuditAction, EventRecord, RpcReply, RpcRequest};

    fn formatter() -> Formatter {
        Formatter::new(&SyslogConfig::new("h:1"), HostnameSource::Identity)
    }

    #[test]
    fn message_layout() {
        let r = record(audit(AuditAction::Deny, "up=bob"));
        let m = formatter().message(&r);
        let expected_head = format!(
            "<36>1 2024-04-22T08:00:00Z aaa1.example.net chorus - audit [chorus@32473 id=\"{}\" type=\"io.choria.signer.v1.signature_audit\" callerid=\"up=bob\" agent=\"rpcutil\" action=\"ping\" decision=\"deny\" site=\"london\"] ",
            r.id()
        );
        assert!(m.starts_with(&expected_head), "{m}");
        assert_eq!(&m[expected_head.len()..], r.cloudevent);
        assert!(!m.contains('\n'));
        // auth (4) * 8 + info (6)
        assert!(formatter().message(&record(audit(AuditAction::Allow, "x"))).starts_with("<38>1 "));
        // unknown = notice (5)
        assert!(formatter().message(&record(audit(AuditAction::Unknown, "x"))).starts_with("<37>1 "));
    }

    #[test]
    fn pri_follows_facility_and_severity_map() {
        let mut c = SyslogConfig::new("h:1");
        c.facility = Facility::Local7;
        c.severity.deny = Severity::Notice;
        c.severity.request = Severity::Debug;
        let f = Formatter::new(&c, HostnameSource::Site);
        assert_eq!(f.pri(&record(audit(AuditAction::Deny, "x"))), 23 * 8 + 5);
        let req = RpcRequest::new("up=bob", "client1", "choria", "service", "restart", Default::default());
        let r = record(EventRecord::new(req.clone(), 1));
        assert_eq!(f.pri(&r), 23 * 8 + 7);
        let m = f.message(&r);
        // No site on the event: HOSTNAME falls back to the identity; no decision parameter.
        assert!(m.starts_with("<191>1 "), "{m}");
        assert!(m.contains(" client1 chorus - rpc_request [chorus@32473 "), "{m}");
        assert!(!m.contains("decision="), "{m}");
        let reply = record(EventRecord::new(RpcReply::denied(&req, "n1", "no"), 2).with_site("paris"));
        let m = f.message(&reply);
        assert!(m.contains(" paris chorus - rpc_reply "), "{m}");
        assert!(m.contains(" decision=\"deny\" site=\"paris\""), "{m}");
    }

    #[test]
    fn param_values_are_escaped() {
        let mut out = String::new();
        escape_param_value(r#"a"b\c]d[e=f é"#, &mut out);
        assert_eq!(out, r#"a\"b\\c\]d[e=f é"#);
        let r = record(audit(AuditAction::Deny, r#"up=b"o\b]"#));
        let m = formatter().message(&r);
        assert!(m.contains(r#" callerid="up=b\"o\\b\]" "#), "{m}");
        // The SD element ends at the first unescaped ']'.
        let sd_start = m.find('[').unwrap();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in m[sd_start..].char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, ']') => {
                    end = Some(sd_start + i);
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(&m[end.unwrap() + 1..end.unwrap() + 2], " ");
        assert_eq!(&m[end.unwrap() + 2..], r.cloudevent);
    }

    #[test]
    fn header_fields_are_printable_ascii() {
        assert_eq!(header_field("node 1.é", 255), "node_1._");
        assert_eq!(header_field("", 255), "-");
        assert_eq!(header_field(&"x".repeat(300), 255).len(), 255);
        assert_eq!(header_field("rpc_request", 32), "rpc_request");
    }

    #[test]
    fn timestamps() {
        let t = chrono::DateTime::parse_from_rfc3339("2024-04-22T08:00:00.123456789+02:00").unwrap().to_utc();
        assert_eq!(timestamp(&t), "2024-04-22T06:00:00.123456Z");
        let t = chrono::DateTime::parse_from_rfc3339("2024-04-22T08:00:00Z").unwrap().to_utc();
        assert_eq!(timestamp(&t), "2024-04-22T08:00:00Z");
        let t = chrono::DateTime::parse_from_rfc3339("2024-04-22T08:00:00.999999999Z").unwrap().to_utc();
        assert_eq!(timestamp(&t), "2024-04-22T08:00:00.999999Z");
    }

    #[test]
    fn octet_counting_uses_bytes_not_characters() {
        assert_eq!(frame(b"abc"), b"3 abc");
        let msg = "<38>1 - - - - - é€😀"; // 2 + 3 + 4 bytes for 3 characters
        let f = frame(msg.as_bytes());
        assert_eq!((msg.chars().count(), msg.len()), (19, 25));
        assert_eq!(f, format!("25 {msg}").into_bytes());
        let a = record(audit(AuditAction::Deny, "up=bøb"));
        let b = record(audit(AuditAction::Allow, "up=\"ann\""));
        let f = formatter();
        let mut stream = f.frame(&a);
        stream.extend(f.frame(&b));
        let msgs = parse_frames(&stream).unwrap();
        assert_eq!(msgs, vec![f.message(&a).into_bytes(), f.message(&b).into_bytes()]);
        let first = &stream[..stream.iter().position(|&c| c == b' ').unwrap()];
        assert_eq!(std::str::from_utf8(first).unwrap().parse::<usize>().unwrap(), f.message(&a).len());
        assert!(parse_frames(b"5 abc").is_none());
        assert!(parse_frames(b"03 abc").is_none());
        assert!(parse_frames(b"x abc").is_none());
    }
}
