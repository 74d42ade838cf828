//! Broker security: a typed description of a multi-tenant Chorus broker, rendered into a
//! `nats-server` configuration (`chorus broker config`) and an nftables snippet.
//!
//! What the generated configuration enforces:
//!
//! * **TLS** on the client port (certificate, key, CA), optionally verifying client
//!   certificates (mutual TLS).
//! * **One NATS account per tenant.** Subjects, streams and consumers of one account are
//!   invisible to every other: nothing is exported or imported between tenant accounts, so
//!   tenant A cannot read tenant B's streams or receive B's messages, and A's publishes never
//!   land in B's streams. Each account has its own JetStream (optionally with limits).
//! * **One user per component** (agent, RPC client, AAA service, replicator, consumers,
//!   admin), with publish and subscribe permissions limited to what that component does, for
//!   the tenant's collectives only (see [`Role`]). Only standard client connections are
//!   allowed with these credentials (no websocket, MQTT or leafnode).
//! * **Passwords as bcrypt hashes**: hashed from the plain text (or a file) in the
//!   description, or given already hashed. The generated file never holds a clear password.
//! * A **system account** for the operators' `$SYS` tooling.
//!
//! What it cannot enforce: nats-server 2.9 has no per-user source-address allow list. The
//! client port is protected by *where it listens* (`listen` on one interface) and by the host
//! firewall: [`BrokerConfig::render_nftables`] writes a rule set that lets only the configured
//! networks reach the client (and monitoring) port. Tenants that must be reachable from
//! different networks get a broker (or a listener address) each. See `docs/SECURITY.md`.

/// Appends a line to a `String`: the generated files are built in memory, and writing to a
/// `String` cannot fail.
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        writeln!($out, $($arg)*).expect("writing to a String cannot fail");
    }};
}

/// [`emit!`] without the line end.
macro_rules! emit_part {
    ($out:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        write!($out, $($arg)*).expect("writing to a String cannot fail");
    }};
}

mod config;
mod password;
mod render;
mod roles;

#[cfg(test)]
mod tests;

pub use config::{
    parse_cidr, AccountJetStream, BrokerConfig, BrokerJetStream, BrokerTls, ClientNetworks, FirewallConfig,
    TenantConfig, UserSpec, DEFAULT_BCRYPT_COST, SYSTEM_ACCOUNT,
};
pub use password::{hash_password, is_bcrypt};
pub use render::RenderedBroker;
pub use roles::{node_buckets, node_only, permissions, Permissions, Role};

/// Results of the broker description: every error is a configuration error naming its field.
pub type Result<T, E = chorus_runtime::ConfigError> = std::result::Result<T, E>;
