//! Request-signing audit records, compatible with Choria AAA's
//! `io.choria.signer.v1.signature_audit` (aaasvc `auditors/notification`): a Choria consumer
//! reads the fields it knows. Chorus adds what Choria's records lack for investigations:
//! the deny `reason`, the token id (`jti`) and the `signer` that made the decision.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::rpc::JsonObject;
use crate::util::now_unix;

/// CloudEvents `source` of audit records.
pub const SOURCE: &str = "io.choria.aaa";

/// The signer's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    /// No decision was recorded.
    Unknown,
    /// The request was signed.
    Allow,
    /// The request was refused.
    Deny,
}

impl AuditAction {
    /// Lower-case name; also the decision token of the audit NATS subject.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Unknown => "unknown",
            AuditAction::Allow => "allow",
            AuditAction::Deny => "deny",
        }
    }
}

/// One signing decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditRecord {
    /// Protocol identifier, `io.choria.signer.v1.signature_audit`; equal to the CloudEvents `type`.
    pub protocol: String,
    /// Caller the request was (to be) signed for.
    pub callerid: String,
    /// The decision.
    pub action: AuditAction,
    /// Site (region, data centre) of the signer; part of the NATS subject.
    pub site: String,
    /// When the decision was made, Unix seconds (UTC).
    pub time: i64,
    /// The request that was judged, as a JSON object. Choria's published schema says string
    /// but its code embeds the object; decode accepts a string holding a JSON object too.
    #[serde(deserialize_with = "request_object")]
    pub request: JsonObject,
    /// Why the request was denied (token invalid, policy refused, ...). Not in Choria.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Stable snake_case name of the reason (`bad_signature`, `replayed`, `rate_limited`,
    /// ...), for rules and dashboards. Not in Choria.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Network address of the client the decision was about (`ip` or `ip:port`), where the
    /// decider saw one. Not in Choria.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Id (`jti` claim) of the caller's token, to tie the decision to a credential. Not in Choria.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Identity of the signer that decided; this is the record's node identity (`subject`).
    /// Not in Choria.
    #[schemars(length(min = 1))]
    pub signer: String,
}

impl AuditRecord {
    /// Protocol string and CloudEvents `type`.
    pub const PROTOCOL: &'static str = "io.choria.signer.v1.signature_audit";

    /// A decision by `signer` at `site`, made now. `reason` and `jti` start empty.
    pub fn new(
        signer: impl Into<String>,
        site: impl Into<String>,
        callerid: impl Into<String>,
        action: AuditAction,
        request: JsonObject,
    ) -> Self {
        AuditRecord {
            protocol: Self::PROTOCOL.into(),
            callerid: callerid.into(),
            action,
            site: site.into(),
            time: now_unix(),
            request,
            reason: None,
            code: None,
            client: None,
            jti: None,
            signer: signer.into(),
        }
    }
}

/// Accepts the request as an object (what Choria's code writes) or as a string holding a
/// JSON object (what Choria's schema describes).
fn request_object<'de, D: Deserializer<'de>>(deserializer: D) -> Result<JsonObject, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Object(JsonObject),
        Text(String),
    }
    match Either::deserialize(deserializer)? {
        Either::Object(o) => Ok(o),
        Either::Text(s) => {
            let object = serde_json::from_str::<JsonObject>(&s)
                .map_err(|e| serde::de::Error::custom(format_args!("request string is not a JSON object: {e}")))?;
            // Unwrapping the string moves its contents deeper into the document; cap the
            // nesting so the re-encoded event stays within the JSON parser's depth limit.
            if object.values().any(|v| nesting(v) > MAX_REQUEST_STRING_NESTING) {
                return Err(serde::de::Error::custom(format_args!(
                    "request string nests deeper than {MAX_REQUEST_STRING_NESTING} levels"
                )));
            }
            Ok(object)
        }
    }
}

/// Deepest nesting accepted inside a request given as a string (see [`request_object`]).
const MAX_REQUEST_STRING_NESTING: usize = 64;

/// Nesting depth of a JSON value (scalars are 0).
fn nesting(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(a) => 1 + a.iter().map(nesting).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_accepts_object_and_string() {
        let base = r#"{"protocol":"io.choria.signer.v1.signature_audit","callerid":"up=bob","action":"allow","site":"london","time":1713772800,"signer":"aaa1","request":"#;
        let a: AuditRecord = serde_json::from_str(&format!("{base}{{\"agent\":\"x\"}}}}")).unwrap();
        let b: AuditRecord = serde_json::from_str(&format!("{base}\"{{\\\"agent\\\":\\\"x\\\"}}\"}}")).unwrap();
        assert_eq!(a, b);
        assert!(serde_json::from_str::<AuditRecord>(&format!("{base}\"[1]\"}}")).is_err());
        assert!(serde_json::from_str::<AuditRecord>(&format!("{base}7}}")).is_err());
    }
}
