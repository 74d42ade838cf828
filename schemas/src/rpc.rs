//! Records of RPC requests and replies.
//!
//! These are not Choria's wire protocol (which nests signed, base64-encoded layers); they are
//! flat, decoded *records* of what was asked and answered, with Choria's field names
//! (`requestid`, `callerid`, `senderid`, `statuscode`, ...), so that who-ran-what can be
//! replayed, audited and projected from a stream. Unlike Choria's node audit log they carry
//! the outcome (status, authorization decision and policy reason) as well as the request.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::util::{now_unix, null_as_default};

/// CloudEvents `source` of RPC records.
pub const SOURCE: &str = "io.choria.rpc";

/// A JSON object: RPC inputs and outputs are always objects in MCORPC.
pub type JsonObject = Map<String, Value>;

/// Choria's discovery filter (go-choria `protocol/filter.go`). Facts, classes and agents
/// are ANDed; identities are ORed; `compound` holds expression lists.
///
/// Go encodes an empty list as `null`; decode accepts that as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Filter {
    /// Fact matches, all of which must hold.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schemars(with = "Option<Vec<FactFilter>>")]
    pub fact: Vec<FactFilter>,
    /// Configuration-management classes the node must have.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schemars(with = "Option<Vec<String>>")]
    pub cf_class: Vec<String>,
    /// Agents the node must have.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schemars(with = "Option<Vec<String>>")]
    pub agent: Vec<String>,
    /// Node identities; any one matches.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schemars(with = "Option<Vec<String>>")]
    pub identity: Vec<String>,
    /// Compound filter expressions, as Choria encodes them.
    #[serde(default, deserialize_with = "null_as_default")]
    #[schemars(with = "Option<Vec<Vec<JsonObject>>>")]
    pub compound: Vec<Vec<JsonObject>>,
}

impl Filter {
    /// True when the filter selects every node.
    pub fn is_empty(&self) -> bool {
        self.fact.is_empty()
            && self.cf_class.is_empty()
            && self.agent.is_empty()
            && self.identity.is_empty()
            && self.compound.is_empty()
    }
}

/// One fact comparison of a [`Filter`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FactFilter {
    /// Fact name (dotted path).
    pub fact: String,
    /// Comparison operator: `==`, `!=`, `<`, `>`, `<=`, `>=` or `=~`.
    pub operator: String,
    /// Value compared against, as text.
    pub value: String,
}

/// Record of one RPC request as the caller made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RpcRequest {
    /// Protocol identifier, `io.choria.rpc.v1.request`; equal to the CloudEvents `type`.
    pub protocol: String,
    /// Request id, shared by the request and all its replies.
    pub requestid: String,
    /// Who asked, e.g. `choria=rip.mcollective` or `up=bob`.
    pub callerid: String,
    /// Host the request was sent from; this is the record's node identity (`subject`).
    #[schemars(length(min = 1))]
    pub senderid: String,
    /// Collective (sub-network) the request was sent to.
    pub collective: String,
    /// Agent called.
    pub agent: String,
    /// Action called.
    pub action: String,
    /// Action inputs.
    #[serde(default, deserialize_with = "null_as_default")]
    pub data: JsonObject,
    /// Which nodes should act on the request.
    #[serde(default, deserialize_with = "null_as_default")]
    pub filter: Filter,
    /// Seconds the request stays valid after `time` (Choria accepts `now-ttl < time < now+ttl`).
    pub ttl: u64,
    /// When the request was created, Unix seconds (UTC). Seconds like every other Chorus
    /// timestamp, not the nanoseconds of Choria's v2 transport.
    pub time: i64,
}

impl RpcRequest {
    /// Protocol string and CloudEvents `type`.
    pub const PROTOCOL: &'static str = "io.choria.rpc.v1.request";

    /// Choria's default request TTL, seconds.
    pub const DEFAULT_TTL: u64 = 60;

    /// A new request created now, with a fresh Choria-style request id (32 hex digits), the
    /// default TTL and an empty (match-all) filter. Set `requestid` when recording a request
    /// that already has one.
    pub fn new(
        callerid: impl Into<String>,
        senderid: impl Into<String>,
        collective: impl Into<String>,
        agent: impl Into<String>,
        action: impl Into<String>,
        data: JsonObject,
    ) -> Self {
        RpcRequest {
            protocol: Self::PROTOCOL.into(),
            requestid: uuid::Uuid::new_v4().simple().to_string(),
            callerid: callerid.into(),
            senderid: senderid.into(),
            collective: collective.into(),
            agent: agent.into(),
            action: action.into(),
            data,
            filter: Filter::default(),
            ttl: Self::DEFAULT_TTL,
            time: now_unix(),
        }
    }
}

/// MCORPC reply status (`statuscode`), encoded as the integer Choria uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatusCode {
    /// 0: the action ran.
    Ok = 0,
    /// 1: the action was aborted (also used when the request was not authorized).
    Aborted = 1,
    /// 2: the agent has no such action.
    UnknownAction = 2,
    /// 3: a required input was missing.
    MissingData = 3,
    /// 4: an input failed validation.
    InvalidData = 4,
    /// 5: any other failure.
    UnknownError = 5,
}

impl StatusCode {
    /// The integer Choria puts on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Parses Choria's integer code.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => StatusCode::Ok,
            1 => StatusCode::Aborted,
            2 => StatusCode::UnknownAction,
            3 => StatusCode::MissingData,
            4 => StatusCode::InvalidData,
            5 => StatusCode::UnknownError,
            _ => return None,
        })
    }

    /// The default `statusmsg` Choria sends with this code.
    pub fn default_message(self) -> &'static str {
        match self {
            StatusCode::Ok => "OK",
            StatusCode::Aborted => "Aborted",
            StatusCode::UnknownAction => "Unknown Action",
            StatusCode::MissingData => "Missing Data",
            StatusCode::InvalidData => "Invalid Data",
            StatusCode::UnknownError => "Unknown Error",
        }
    }
}

impl Serialize for StatusCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for StatusCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = u64::deserialize(deserializer)?;
        StatusCode::from_code(code).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Unsigned(code), &"a Choria status code 0..=5")
        })
    }
}

impl JsonSchema for StatusCode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StatusCode".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "MCORPC status: 0 OK, 1 Aborted, 2 UnknownAction, 3 MissingData, 4 InvalidData, 5 UnknownError.",
            "type": "integer",
            "enum": [0, 1, 2, 3, 4, 5]
        })
    }
}

/// Record of one node's reply to an RPC request, including the node's authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RpcReply {
    /// Protocol identifier, `io.choria.rpc.v1.reply`; equal to the CloudEvents `type`.
    pub protocol: String,
    /// Id of the request answered.
    pub requestid: String,
    /// Replying node; this is the record's node identity (`subject`).
    #[schemars(length(min = 1))]
    pub identity: String,
    /// Who made the request.
    pub callerid: String,
    /// Collective the request was sent to (needed for the NATS subject).
    pub collective: String,
    /// Agent called.
    pub agent: String,
    /// Action called.
    pub action: String,
    /// Result status.
    pub statuscode: StatusCode,
    /// Human-readable status.
    pub statusmsg: String,
    /// Action outputs.
    #[serde(default, deserialize_with = "null_as_default")]
    pub data: JsonObject,
    /// Whether the node's action policy allowed the request. Not in Choria's reply.
    pub authorized: bool,
    /// Why the policy decided as it did (rule or policy file that matched). Not in Choria.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// When the reply was produced, Unix seconds (UTC).
    pub time: i64,
}

impl RpcReply {
    /// Protocol string and CloudEvents `type`.
    pub const PROTOCOL: &'static str = "io.choria.rpc.v1.reply";

    /// Choria's message for a request the action policy denied.
    pub const DENIED_MESSAGE: &'static str = "You are not authorized to call this agent or action";

    /// An authorized reply from `identity` to `request`, produced now, with the code's
    /// default status message.
    pub fn new(request: &RpcRequest, identity: impl Into<String>, statuscode: StatusCode, data: JsonObject) -> Self {
        RpcReply {
            protocol: Self::PROTOCOL.into(),
            requestid: request.requestid.clone(),
            identity: identity.into(),
            callerid: request.callerid.clone(),
            collective: request.collective.clone(),
            agent: request.agent.clone(),
            action: request.action.clone(),
            statuscode,
            statusmsg: statuscode.default_message().into(),
            data,
            authorized: true,
            policy: None,
            time: now_unix(),
        }
    }

    /// The reply a node sends when its action policy refuses `request`: status Aborted with
    /// Choria's message, `authorized: false` and the policy's `reason`.
    pub fn denied(request: &RpcRequest, identity: impl Into<String>, reason: impl Into<String>) -> Self {
        let mut reply = RpcReply::new(request, identity, StatusCode::Aborted, JsonObject::new());
        reply.statusmsg = Self::DENIED_MESSAGE.into();
        reply.authorized = false;
        reply.policy = Some(reason.into());
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for c in 0..=5u64 {
            let s = StatusCode::from_code(c).unwrap();
            assert_eq!(u64::from(s.code()), c);
            assert_eq!(serde_json::to_string(&s).unwrap(), c.to_string());
            assert_eq!(serde_json::from_str::<StatusCode>(&c.to_string()).unwrap(), s);
        }
        assert!(serde_json::from_str::<StatusCode>("6").is_err());
        assert!(serde_json::from_str::<StatusCode>("-1").is_err());
        assert!(serde_json::from_str::<StatusCode>("\"0\"").is_err());
    }

    #[test]
    fn go_null_lists_decode_as_empty() {
        let f: Filter = serde_json::from_str(
            r#"{"fact":null,"cf_class":null,"agent":["rpcutil"],"identity":null,"compound":null}"#,
        )
        .unwrap();
        assert_eq!(f.agent, vec!["rpcutil"]);
        assert!(f.fact.is_empty() && f.compound.is_empty());
        let f: Filter = serde_json::from_str("{}").unwrap();
        assert!(f.is_empty());
    }

    #[test]
    fn denied_reply_carries_reason() {
        let req = RpcRequest::new("up=bob", "client1", "choria", "rpcutil", "ping", JsonObject::new());
        let r = RpcReply::denied(&req, "n1", "policy rpcutil.policy: deny *");
        assert!(!r.authorized);
        assert_eq!(r.statuscode, StatusCode::Aborted);
        assert_eq!(r.requestid, req.requestid);
        assert_eq!(req.requestid.len(), 32);
    }
}
