//! Node lifecycle events: `startup`, `alive`, `shutdown`, `provisioned`, `upgraded` and
//! `governor`, field for field as Choria publishes them (go-choria `lifecycle/`), so that
//! `choria tool event`, tally and the provisioner read what Chorus emits and Chorus reads
//! what a Choria fleet emits.
//!
//! One addition: [`Alive::interval`] advertises the producer's alive period, so consumers
//! compute expiry from it (e.g. 2.5 × interval) instead of hard-coding Choria's 80 minutes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::util::{each_variant, new_event_id, now_unix};

/// CloudEvents `source` of every lifecycle event, as Choria sets it.
pub const SOURCE: &str = "io.choria.lifecycle";

/// The component of nodes in provisioning mode, as Choria names it.
pub const PROVISION_MODE_COMPONENT: &str = "provision_mode_server";

/// The six lifecycle event types. The lower-case name is both the 5th segment of the
/// protocol (`io.choria.lifecycle.v1.<type>`) and the 4th token of the NATS subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LifecycleType {
    /// See [`Startup`].
    Startup,
    /// See [`Alive`].
    Alive,
    /// See [`Shutdown`].
    Shutdown,
    /// See [`Provisioned`].
    Provisioned,
    /// See [`Upgraded`].
    Upgraded,
    /// See [`Governor`].
    Governor,
}

impl LifecycleType {
    /// Every type, in a stable order (used for schema generation and tests).
    pub const ALL: [LifecycleType; 6] = [
        LifecycleType::Startup,
        LifecycleType::Alive,
        LifecycleType::Shutdown,
        LifecycleType::Provisioned,
        LifecycleType::Upgraded,
        LifecycleType::Governor,
    ];

    /// Lower-case name, e.g. `"startup"` (subject token and protocol segment).
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleType::Startup => "startup",
            LifecycleType::Alive => "alive",
            LifecycleType::Shutdown => "shutdown",
            LifecycleType::Provisioned => "provisioned",
            LifecycleType::Upgraded => "upgraded",
            LifecycleType::Governor => "governor",
        }
    }

    /// Canonical protocol / CloudEvents type, e.g. `io.choria.lifecycle.v1.startup`.
    pub fn protocol(self) -> &'static str {
        match self {
            LifecycleType::Startup => Startup::PROTOCOL,
            LifecycleType::Alive => Alive::PROTOCOL,
            LifecycleType::Shutdown => Shutdown::PROTOCOL,
            LifecycleType::Provisioned => Provisioned::PROTOCOL,
            LifecycleType::Upgraded => Upgraded::PROTOCOL,
            LifecycleType::Governor => Governor::PROTOCOL,
        }
    }

    /// Parses a protocol string in either the current form (`io.choria.lifecycle.v1.startup`)
    /// or the pre-2019 legacy form (`choria:lifecycle:startup:1`) that Choria still accepts.
    pub fn from_protocol(protocol: &str) -> Option<Self> {
        let name = protocol
            .strip_prefix("io.choria.lifecycle.v1.")
            .or_else(|| protocol.strip_prefix("choria:lifecycle:").and_then(|rest| rest.strip_suffix(":1")))?;
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

impl std::fmt::Display for LifecycleType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Declares a lifecycle document: Choria's five base fields (`basicEvent`) plus extras.
macro_rules! lifecycle_doc {
    (
        $(#[$meta:meta])*
        $name:ident = $protocol:literal, $ty:ident {
            $($(#[$fmeta:meta])* pub $field:ident : $fty:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        pub struct $name {
            #[doc = concat!("Protocol identifier, `", $protocol, "`; equal to the CloudEvents `type`.")]
            pub protocol: String,
            /// Event id. Equal to the CloudEvents `id` (as in Choria), so it is the dedupe key.
            #[schemars(length(min = 1))]
            pub id: String,
            /// Identity of the node that emitted the event (usually its FQDN).
            #[schemars(length(min = 1))]
            pub identity: String,
            /// What emitted the event (`server`, `provision_mode_server`, `provisioner`, a machine
            /// name, ...). It is the last NATS subject token, so it cannot contain `.`, `*`, `>`
            /// or whitespace.
            pub component: String,
            /// When the event happened, Unix seconds (UTC).
            pub timestamp: i64,
            $($(#[$fmeta])* pub $field: $fty,)*
        }

        impl $name {
            /// Protocol string and CloudEvents `type` of this event.
            pub const PROTOCOL: &'static str = $protocol;
            /// The lifecycle type this document carries.
            pub const TYPE: LifecycleType = LifecycleType::$ty;
        }

        impl From<$name> for Lifecycle {
            fn from(event: $name) -> Self {
                Lifecycle::$ty(event)
            }
        }
    };
}

/// Fills the base fields every constructor shares: a fresh UUIDv7 id and the current time.
fn base(identity: impl Into<String>, component: impl Into<String>) -> (String, String, String, i64) {
    (new_event_id(), identity.into(), component.into(), now_unix())
}

lifecycle_doc! {
    /// Published once, after a node's first successful broker connection. Provisioners and
    /// deployment tooling react to it; tally resets the node's version from it.
    Startup = "io.choria.lifecycle.v1.startup", Startup {
        /// Version of the software that started.
        pub version: String,
    }
}

impl Startup {
    /// A startup event stamped now, with a fresh id.
    pub fn new(identity: impl Into<String>, component: impl Into<String>, version: impl Into<String>) -> Self {
        let (id, identity, component, timestamp) = base(identity, component);
        Startup { protocol: Self::PROTOCOL.into(), id, identity, component, timestamp, version: version.into() }
    }
}

lifecycle_doc! {
    /// Periodic liveness (Choria: every 30 minutes after a random 0–29 minute splay). Events
    /// are lossy, so alive is what lets a consumer rebuild fleet state and expire dead nodes.
    Alive = "io.choria.lifecycle.v1.alive", Alive {
        /// Version of the running software.
        pub version: String,
        /// Seconds until the next alive event from this producer. Not in Choria: consumers use
        /// it to expire a node after a few missed intervals instead of a fixed threshold.
        /// Absent on events from Choria itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub interval: Option<u64>,
    }
}

impl Alive {
    /// An alive event stamped now; `interval` is the producer's alive period in seconds.
    pub fn new(
        identity: impl Into<String>,
        component: impl Into<String>,
        version: impl Into<String>,
        interval: Option<u64>,
    ) -> Self {
        let (id, identity, component, timestamp) = base(identity, component);
        Alive { protocol: Self::PROTOCOL.into(), id, identity, component, timestamp, version: version.into(), interval }
    }
}

lifecycle_doc! {
    /// Best-effort notice that a node is stopping. A crash sends none, so consumers must not
    /// depend on it; expiry via [`Alive`] is the backstop.
    Shutdown = "io.choria.lifecycle.v1.shutdown", Shutdown {}
}

impl Shutdown {
    /// A shutdown event stamped now.
    pub fn new(identity: impl Into<String>, component: impl Into<String>) -> Self {
        let (id, identity, component, timestamp) = base(identity, component);
        Shutdown { protocol: Self::PROTOCOL.into(), id, identity, component, timestamp }
    }
}

lifecycle_doc! {
    /// A node wrote its provisioned configuration (`choria_provision#configure`) and is about
    /// to restart into normal operation.
    Provisioned = "io.choria.lifecycle.v1.provisioned", Provisioned {}
}

impl Provisioned {
    /// A provisioned event stamped now.
    pub fn new(identity: impl Into<String>, component: impl Into<String>) -> Self {
        let (id, identity, component, timestamp) = base(identity, component);
        Provisioned { protocol: Self::PROTOCOL.into(), id, identity, component, timestamp }
    }
}

lifecycle_doc! {
    /// The node's binary was replaced in place (`choria_provision#release_update`).
    Upgraded = "io.choria.lifecycle.v1.upgraded", Upgraded {
        /// Version before the upgrade.
        pub version: String,
        /// Version after the upgrade.
        pub new_version: String,
    }
}

impl Upgraded {
    /// An upgraded event stamped now.
    pub fn new(
        identity: impl Into<String>,
        component: impl Into<String>,
        version: impl Into<String>,
        new_version: impl Into<String>,
    ) -> Self {
        let (id, identity, component, timestamp) = base(identity, component);
        Upgraded {
            protocol: Self::PROTOCOL.into(),
            id,
            identity,
            component,
            timestamp,
            version: version.into(),
            new_version: new_version.into(),
        }
    }
}

/// What happened to a governor slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GovernorEventType {
    /// A slot was obtained.
    Enter,
    /// A slot was released.
    Exit,
    /// Obtaining a slot timed out.
    Timeouts,
    /// A slot holder was evicted.
    Eviction,
}

lifecycle_doc! {
    /// Governor (fleet-wide concurrency limiter) activity, from `choria governor` (component
    /// `CLI`) or from machine watchers using a governor (component = machine name).
    Governor = "io.choria.lifecycle.v1.governor", Governor {
        /// Governor name; never empty (Choria's parser rejects an empty one, and so does decode).
        #[schemars(length(min = 1))]
        pub governor: String,
        /// Slot sequence number within the governor.
        pub sequence: u64,
        /// What happened.
        pub event_type: GovernorEventType,
    }
}

impl Governor {
    /// A governor event stamped now.
    pub fn new(
        identity: impl Into<String>,
        component: impl Into<String>,
        governor: impl Into<String>,
        sequence: u64,
        event_type: GovernorEventType,
    ) -> Self {
        let (id, identity, component, timestamp) = base(identity, component);
        Governor {
            protocol: Self::PROTOCOL.into(),
            id,
            identity,
            component,
            timestamp,
            governor: governor.into(),
            sequence,
            event_type,
        }
    }
}

/// Any lifecycle event. Shared fields are reachable without matching, because consumers such
/// as tally key everything on (component, identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// `io.choria.lifecycle.v1.startup`
    Startup(Startup),
    /// `io.choria.lifecycle.v1.alive`
    Alive(Alive),
    /// `io.choria.lifecycle.v1.shutdown`
    Shutdown(Shutdown),
    /// `io.choria.lifecycle.v1.provisioned`
    Provisioned(Provisioned),
    /// `io.choria.lifecycle.v1.upgraded`
    Upgraded(Upgraded),
    /// `io.choria.lifecycle.v1.governor`
    Governor(Governor),
}

macro_rules! lifecycle_field {
    ($self:expr, $e:ident => $body:expr) => {
        each_variant!($self, Lifecycle, $e => $body,
            [Startup, Alive, Shutdown, Provisioned, Upgraded, Governor])
    };
}

impl Lifecycle {
    /// Which of the six types this is.
    pub fn lifecycle_type(&self) -> LifecycleType {
        match self {
            Lifecycle::Startup(_) => LifecycleType::Startup,
            Lifecycle::Alive(_) => LifecycleType::Alive,
            Lifecycle::Shutdown(_) => LifecycleType::Shutdown,
            Lifecycle::Provisioned(_) => LifecycleType::Provisioned,
            Lifecycle::Upgraded(_) => LifecycleType::Upgraded,
            Lifecycle::Governor(_) => LifecycleType::Governor,
        }
    }

    /// The inner event id (equal to the envelope id).
    pub fn id(&self) -> &str {
        lifecycle_field!(self, e => &e.id)
    }

    /// Node identity.
    pub fn identity(&self) -> &str {
        lifecycle_field!(self, e => &e.identity)
    }

    /// Emitting component (last subject token).
    pub fn component(&self) -> &str {
        lifecycle_field!(self, e => &e.component)
    }

    /// Unix seconds.
    pub fn timestamp(&self) -> i64 {
        lifecycle_field!(self, e => e.timestamp)
    }

    pub(crate) fn protocol_field(&self) -> &str {
        lifecycle_field!(self, e => &e.protocol)
    }

    pub(crate) fn protocol_mut(&mut self) -> &mut String {
        lifecycle_field!(self, e => &mut e.protocol)
    }

    /// The document itself, as [`Lifecycle::to_value`] would give it.
    pub(crate) fn serialize_document<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::Serialize;
        lifecycle_field!(self, e => e.serialize(s))
    }

    pub(crate) fn to_value(&self) -> serde_json::Value {
        let value = lifecycle_field!(self, e => serde_json::to_value(e));
        // Plain structs of strings and integers always serialize.
        value.expect("lifecycle documents always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_forms_parse() {
        for t in LifecycleType::ALL {
            assert_eq!(LifecycleType::from_protocol(t.protocol()), Some(t));
            let legacy = format!("choria:lifecycle:{}:1", t.as_str());
            assert_eq!(LifecycleType::from_protocol(&legacy), Some(t));
        }
        for bad in [
            "",
            "io.choria.lifecycle.v1.",
            "io.choria.lifecycle.v2.startup",
            "choria:lifecycle:startup:2",
            "choria:lifecycle:startup",
            "io.choria.lifecycle.v1.Startup",
            "io.choria.machine.v1.transition",
        ] {
            assert_eq!(LifecycleType::from_protocol(bad), None, "{bad}");
        }
    }

    #[test]
    fn constructors_fill_protocol_id_timestamp() {
        let s = Startup::new("n1", "server", "1.0.0");
        assert_eq!(s.protocol, Startup::PROTOCOL);
        assert_eq!(uuid::Uuid::parse_str(&s.id).unwrap().get_version_num(), 7);
        assert!(s.timestamp > 1_700_000_000);
        let g = Governor::new("n1", "CLI", "g", 3, GovernorEventType::Enter);
        assert_eq!(Lifecycle::from(g).lifecycle_type(), LifecycleType::Governor);
    }
}
