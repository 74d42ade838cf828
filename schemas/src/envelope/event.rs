//! The typed document an event carries, and its broad kind.

use serde_json::Value;

use crate::audit::AuditRecord;
use crate::lifecycle::{Alive, Governor, Lifecycle, Provisioned, Shutdown, Startup, Upgraded};
use crate::machine::{Transition, WatcherState};
use crate::reaction::Reaction;
use crate::registration::Registration;
use crate::rpc::{RpcReply, RpcRequest};
use crate::{audit, lifecycle, machine, reaction, rpc};

/// The broad family of an event, for routing and metrics without matching every type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// One of the six lifecycle events.
    Lifecycle,
    /// A machine transition.
    Transition,
    /// A machine watcher state.
    Watcher,
    /// An RPC request record.
    RpcRequest,
    /// An RPC reply record.
    RpcReply,
    /// A signer audit record.
    Audit,
    /// A node's registration (its metadata).
    Registration,
    /// A reactor's record of a firing or an action.
    Reaction,
}

impl EventKind {
    /// Stable snake_case name, usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Lifecycle => "lifecycle",
            EventKind::Transition => "transition",
            EventKind::Watcher => "watcher",
            EventKind::RpcRequest => "rpc_request",
            EventKind::RpcReply => "rpc_reply",
            EventKind::Audit => "audit",
            EventKind::Registration => "registration",
            EventKind::Reaction => "reaction",
        }
    }
}

/// The payload of an [`EventRecord`]: one of the typed documents of this crate. Which one is
/// fixed by the CloudEvents `type`, which always equals the document's `protocol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lifecycle event (`io.choria.lifecycle.v1.*`).
    Lifecycle(Lifecycle),
    /// A machine transition (`io.choria.machine.v1.transition`).
    Transition(Transition),
    /// A machine watcher state (`io.choria.machine.watcher.<type>.v1.state`).
    Watcher(WatcherState),
    /// An RPC request record (`io.choria.rpc.v1.request`).
    RpcRequest(RpcRequest),
    /// An RPC reply record (`io.choria.rpc.v1.reply`).
    RpcReply(RpcReply),
    /// A signer audit record (`io.choria.signer.v1.signature_audit`).
    Audit(AuditRecord),
    /// A node's registration (`choria:registration:inventorycontent:1`).
    Registration(Registration),
    /// A reactor's record (`io.chorus.reactor.v1.reaction`).
    Reaction(Reaction),
}

impl Event {
    /// Every CloudEvents `type` Chorus decodes, in a stable order. Each has a JSON Schema
    /// named `<type>.json`.
    pub const TYPES: [&'static str; 26] = [
        Startup::PROTOCOL,
        Alive::PROTOCOL,
        Shutdown::PROTOCOL,
        Provisioned::PROTOCOL,
        Upgraded::PROTOCOL,
        Governor::PROTOCOL,
        Transition::PROTOCOL,
        "io.choria.machine.watcher.exec.v1.state",
        "io.choria.machine.watcher.file.v1.state",
        "io.choria.machine.watcher.schedule.v1.state",
        "io.choria.machine.watcher.timer.v1.state",
        "io.choria.machine.watcher.nagios.v1.state",
        "io.choria.machine.watcher.kv.v1.state",
        "io.choria.machine.watcher.expression.v1.state",
        "io.choria.machine.watcher.metric.v1.state",
        "io.choria.machine.watcher.archive.v1.state",
        "io.choria.machine.watcher.machines.v1.state",
        "io.choria.machine.watcher.plugins.v1.state",
        "io.choria.machine.watcher.gossip.v1.state",
        "io.choria.machine.watcher.httpswitch.v1.state",
        "io.choria.machine.watcher.ccm_manifest.v1.state",
        RpcRequest::PROTOCOL,
        RpcReply::PROTOCOL,
        AuditRecord::PROTOCOL,
        Registration::PROTOCOL,
        Reaction::PROTOCOL,
    ];

    /// The CloudEvents `type` (= protocol), e.g. `io.choria.lifecycle.v1.alive`. Derived from
    /// the variant, not from the `protocol` field, so it is always canonical.
    pub fn event_type(&self) -> &'static str {
        match self {
            Event::Lifecycle(l) => l.lifecycle_type().protocol(),
            Event::Transition(_) => Transition::PROTOCOL,
            Event::Watcher(w) => w.details.protocol(),
            Event::RpcRequest(_) => RpcRequest::PROTOCOL,
            Event::RpcReply(_) => RpcReply::PROTOCOL,
            Event::Audit(_) => AuditRecord::PROTOCOL,
            Event::Registration(_) => Registration::PROTOCOL,
            Event::Reaction(_) => Reaction::PROTOCOL,
        }
    }

    /// The family of this event.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Lifecycle(_) => EventKind::Lifecycle,
            Event::Transition(_) => EventKind::Transition,
            Event::Watcher(_) => EventKind::Watcher,
            Event::RpcRequest(_) => EventKind::RpcRequest,
            Event::RpcReply(_) => EventKind::RpcReply,
            Event::Audit(_) => EventKind::Audit,
            Event::Registration(_) => EventKind::Registration,
            Event::Reaction(_) => EventKind::Reaction,
        }
    }

    /// The CloudEvents `source` of the family (`io.choria.lifecycle`, `io.choria.machine`,
    /// `io.choria.rpc` or `io.choria.aaa`).
    pub fn source(&self) -> &'static str {
        kind_source(self.kind())
    }

    /// The node the event is about, which is also the CloudEvents `subject`: the emitting
    /// node for lifecycle and machine events, the sending host (`senderid`) for an RPC
    /// request, the replying node for a reply, and the signer for an audit record.
    pub fn identity(&self) -> &str {
        match self {
            Event::Lifecycle(l) => l.identity(),
            Event::Transition(t) => &t.identity,
            Event::Watcher(w) => &w.identity,
            Event::RpcRequest(r) => &r.senderid,
            Event::RpcReply(r) => &r.identity,
            Event::Audit(a) => &a.signer,
            Event::Registration(r) => r.identity(),
            Event::Reaction(r) => &r.reactor,
        }
    }

    /// When the event happened, Unix seconds (the document's `timestamp` or `time`).
    pub fn timestamp(&self) -> i64 {
        match self {
            Event::Lifecycle(l) => l.timestamp(),
            Event::Transition(t) => t.timestamp,
            Event::Watcher(w) => w.timestamp,
            Event::RpcRequest(r) => r.time,
            Event::RpcReply(r) => r.time,
            Event::Audit(a) => a.time,
            Event::Registration(r) => r.timestamp,
            Event::Reaction(r) => r.time,
        }
    }

    pub(super) fn protocol_field(&self) -> &str {
        match self {
            Event::Lifecycle(l) => l.protocol_field(),
            Event::Transition(t) => &t.protocol,
            Event::Watcher(w) => &w.protocol,
            Event::RpcRequest(r) => &r.protocol,
            Event::RpcReply(r) => &r.protocol,
            Event::Audit(a) => &a.protocol,
            Event::Registration(r) => &r.protocol,
            Event::Reaction(r) => &r.protocol,
        }
    }

    /// Name of the field [`Event::identity`] reads, for error messages.
    pub(super) fn identity_field(&self) -> &'static str {
        match self {
            Event::RpcRequest(_) => "senderid",
            Event::Audit(_) => "signer",
            Event::Registration(_) => "content.status.identity",
            Event::Reaction(_) => "reactor",
            _ => "identity",
        }
    }

    /// The CloudEvents `data` document, with `protocol` set to the canonical type.
    /// Writes the document as [`Event::to_data`] makes it, without building the JSON tree
    /// when the document already carries the protocol it goes out under (every event made
    /// here does): the struct's own fields in order are then exactly the tree's.
    pub(super) fn serialize_data<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::Serialize;
        let protocol = self.event_type();
        match self {
            Event::Lifecycle(l) if l.protocol_field() == protocol => l.serialize_document(s),
            Event::Transition(t) if t.protocol == protocol => t.serialize(s),
            Event::Watcher(w) if w.protocol == protocol => w.serialize(s),
            Event::RpcRequest(r) if r.protocol == protocol => r.serialize(s),
            Event::RpcReply(r) if r.protocol == protocol => r.serialize(s),
            Event::Audit(a) if a.protocol == protocol => a.serialize(s),
            _ => self.to_data().serialize(s),
        }
    }

    pub(super) fn to_data(&self) -> Value {
        let value = match self {
            Event::Lifecycle(l) => Ok(l.to_value()),
            Event::Transition(t) => serde_json::to_value(t),
            Event::Watcher(w) => serde_json::to_value(w),
            Event::RpcRequest(r) => serde_json::to_value(r),
            Event::RpcReply(r) => serde_json::to_value(r),
            Event::Audit(a) => serde_json::to_value(a),
            Event::Registration(r) => serde_json::to_value(r),
            Event::Reaction(r) => serde_json::to_value(r),
        };
        // Structs of strings, integers and JSON objects with string keys always serialize.
        let mut value = value.expect("event documents always serialize");
        if let Value::Object(map) = &mut value {
            // Replacing an existing key keeps its position, so `protocol` stays first.
            map.insert("protocol".into(), Value::String(self.event_type().into()));
        }
        value
    }
}

macro_rules! into_event {
    ($($ty:ty => |$v:ident| $body:expr),+ $(,)?) => {
        $(impl From<$ty> for Event {
            fn from($v: $ty) -> Self {
                $body
            }
        })+
    };
}

into_event! {
    Lifecycle => |v| Event::Lifecycle(v),
    Startup => |v| Event::Lifecycle(v.into()),
    Alive => |v| Event::Lifecycle(v.into()),
    Shutdown => |v| Event::Lifecycle(v.into()),
    Provisioned => |v| Event::Lifecycle(v.into()),
    Upgraded => |v| Event::Lifecycle(v.into()),
    Governor => |v| Event::Lifecycle(v.into()),
    Transition => |v| Event::Transition(v),
    WatcherState => |v| Event::Watcher(v),
    RpcRequest => |v| Event::RpcRequest(v),
    RpcReply => |v| Event::RpcReply(v),
    AuditRecord => |v| Event::Audit(v),
    Registration => |v| Event::Registration(v),
    Reaction => |v| Event::Reaction(v),
}

pub(super) fn kind_source(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Lifecycle => lifecycle::SOURCE,
        EventKind::Transition | EventKind::Watcher => machine::SOURCE,
        EventKind::RpcRequest | EventKind::RpcReply => rpc::SOURCE,
        EventKind::Audit => audit::SOURCE,
        EventKind::Registration => crate::registration::SOURCE,
        EventKind::Reaction => reaction::SOURCE,
    }
}
