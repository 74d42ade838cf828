//! The reactor's own records (`io.chorus.reactor.v1.reaction`): a rule fired, and what each
//! of its actions did. Choria has no reactor, so these are Chorus's format; they travel on
//! `chorus.reactor.<outcome>.<rule>` into `CHORUS_REACTOR`, where audits, dashboards and
//! other rules (a reaction to a failed reaction) read them like any other event.
//!
//! A firing's event id is derived from the rule and the event that caused it, so the same
//! firing is the same event wherever and however often it is published; an action's record
//! carries the firing id and the action's index.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::util::now_unix;

/// CloudEvents `source` of reactor records.
pub const SOURCE: &str = "io.chorus.reactor";

/// What a reaction record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReactionOutcome {
    /// The rule fired; its actions follow.
    Fired,
    /// One action completed.
    Succeeded,
    /// One action failed after its retries; the firing's later actions still ran.
    Failed,
}

impl ReactionOutcome {
    /// Lower-case name; also a token of the NATS subject.
    pub fn as_str(self) -> &'static str {
        match self {
            ReactionOutcome::Fired => "fired",
            ReactionOutcome::Succeeded => "succeeded",
            ReactionOutcome::Failed => "failed",
        }
    }
}

/// The event that caused a firing (for an absence, the last event seen before the silence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReactionCause {
    /// Stream the event was read from.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// Its CloudEvents id.
    pub event_id: String,
    /// Its CloudEvents type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Its CloudEvents subject (the node, for Choria's events).
    pub subject: String,
}

/// What one action did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReactionAction {
    /// Position of the action in the rule, from 0.
    pub index: u32,
    /// `rpc`, `webhook`, `command` or `publish`.
    pub kind: String,
    /// What happened, for people: replies counted, HTTP status, exit code, or the error.
    pub detail: String,
    /// Attempts made (retries included).
    pub attempts: u32,
}

/// One reactor record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reaction {
    /// Protocol identifier, `io.chorus.reactor.v1.reaction`; equal to the CloudEvents `type`.
    pub protocol: String,
    /// Name of the reactor that acted; the record's CloudEvents subject. Instances of one
    /// active-standby reactor share it.
    #[schemars(length(min = 1))]
    pub reactor: String,
    /// The rule, a NATS subject token.
    #[schemars(length(min = 1))]
    pub rule: String,
    /// What happened.
    pub outcome: ReactionOutcome,
    /// Id of the firing: the event id of its `fired` record, the idempotency key every
    /// action is given.
    #[schemars(length(min = 1))]
    pub firing: String,
    /// The rule's grouping key for this firing (the node, by default).
    pub key: String,
    /// Why the rule fired (`matched`, `5 events within 1m`, `no event for 5m`, ...).
    pub reason: String,
    /// The event that caused the firing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<ReactionCause>,
    /// For `succeeded` and `failed`: the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ReactionAction>,
    /// When it happened, Unix seconds (UTC).
    pub time: i64,
}

impl Reaction {
    /// Protocol string and CloudEvents `type`.
    pub const PROTOCOL: &'static str = "io.chorus.reactor.v1.reaction";

    /// A record of `outcome` for firing `firing` of `rule`, made now.
    pub fn new(
        reactor: impl Into<String>,
        rule: impl Into<String>,
        outcome: ReactionOutcome,
        firing: impl Into<String>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Reaction {
            protocol: Self::PROTOCOL.into(),
            reactor: reactor.into(),
            rule: rule.into(),
            outcome,
            firing: firing.into(),
            key: key.into(),
            reason: reason.into(),
            cause: None,
            action: None,
            time: now_unix(),
        }
    }

    /// The event id of this record: the firing id for `fired`, the firing id and the
    /// action's index for an action's result. Derived, so publishing it again after a crash
    /// is deduplicated by the stream.
    pub fn event_id(&self) -> String {
        match &self.action {
            Some(action) => format!("{}.{}", self.firing, action.index),
            None => self.firing.clone(),
        }
    }
}
