//! The NATS subject scheme, shared by publishers and by the JetStream streams that capture
//! events (whose subject filters are the constants below).
//!
//! Choria's subjects are kept unchanged so Choria tooling subscribes to a Chorus fleet as it
//! does to its own (`choria tool event`, tally, the provisioner, `choria machine watch`):
//!
//! | Events | Subject |
//! |---|---|
//! | lifecycle | `choria.lifecycle.event.<type>.<component>` |
//! | transitions | `choria.machine.transition` |
//! | watcher states | `choria.machine.watcher.<type>.state` |
//!
//! Chorus's own records use the `chorus.` prefix:
//!
//! | Events | Subject |
//! |---|---|
//! | RPC requests | `chorus.rpc.request.<collective>.<agent>` |
//! | RPC replies | `chorus.rpc.reply.<collective>.<agent>` |
//! | audit | `chorus.audit.<decision>.<site>` |
//! | registration | `choria.registration.<identity>` (Choria's documented custom target) |
//! | dead letters | `chorus.deadletter.<origin>` |
//! | reactor records | `chorus.reactor.<outcome>.<rule>` |
//!
//! Every variable token is validated: a component such as `web.prod` would otherwise shift
//! every token after it and silently break consumers' wildcard filters. See `docs/SUBJECTS.md`.

use crate::audit::AuditAction;
use crate::envelope::Event;
use crate::lifecycle::LifecycleType;

/// Stream of node registrations (each node's metadata, republished on change and on an
/// interval).
pub const CHORUS_REGISTRATION: &str = "CHORUS_REGISTRATION";
/// Subjects of [`CHORUS_REGISTRATION`].
pub const CHORUS_REGISTRATION_SUBJECTS: &[&str] = &["choria.registration.>"];

/// Stream of lifecycle events.
pub const CHORUS_LIFECYCLE: &str = "CHORUS_LIFECYCLE";
/// Subjects captured by [`CHORUS_LIFECYCLE`].
pub const CHORUS_LIFECYCLE_SUBJECTS: &[&str] = &["choria.lifecycle.>"];
/// Stream of machine transitions and watcher states.
pub const CHORUS_MACHINE: &str = "CHORUS_MACHINE";
/// Subjects captured by [`CHORUS_MACHINE`].
pub const CHORUS_MACHINE_SUBJECTS: &[&str] = &["choria.machine.>"];
/// Stream of RPC request and reply records.
pub const CHORUS_RPC: &str = "CHORUS_RPC";
/// Subjects captured by [`CHORUS_RPC`].
pub const CHORUS_RPC_SUBJECTS: &[&str] = &["chorus.rpc.>"];
/// Stream of audit records.
pub const CHORUS_AUDIT: &str = "CHORUS_AUDIT";
/// Subjects captured by [`CHORUS_AUDIT`].
pub const CHORUS_AUDIT_SUBJECTS: &[&str] = &["chorus.audit.>"];
/// Stream of messages consumers could not process.
pub const CHORUS_DEADLETTER: &str = "CHORUS_DEADLETTER";
/// Subjects captured by [`CHORUS_DEADLETTER`].
pub const CHORUS_DEADLETTER_SUBJECTS: &[&str] = &["chorus.deadletter.>"];

/// Stream of the reactor's records: firings and action results.
pub const CHORUS_REACTOR: &str = "CHORUS_REACTOR";
/// Subjects captured by [`CHORUS_REACTOR`].
pub const CHORUS_REACTOR_SUBJECTS: &[&str] = &["chorus.reactor.>"];

/// Subject of every machine transition.
pub const MACHINE_TRANSITION: &str = "choria.machine.transition";

/// Longest variable token accepted, in bytes. NATS caps the whole protocol line at 4 KiB by
/// default; names longer than this are mistakes, not identifiers.
pub const MAX_TOKEN_BYTES: usize = 255;

/// Every stream as (name, subject filters), for whoever creates streams.
pub fn streams() -> [(&'static str, &'static [&'static str]); 7] {
    [
        (CHORUS_LIFECYCLE, CHORUS_LIFECYCLE_SUBJECTS),
        (CHORUS_MACHINE, CHORUS_MACHINE_SUBJECTS),
        (CHORUS_RPC, CHORUS_RPC_SUBJECTS),
        (CHORUS_AUDIT, CHORUS_AUDIT_SUBJECTS),
        (CHORUS_REGISTRATION, CHORUS_REGISTRATION_SUBJECTS),
        (CHORUS_DEADLETTER, CHORUS_DEADLETTER_SUBJECTS),
        (CHORUS_REACTOR, CHORUS_REACTOR_SUBJECTS),
    ]
}

/// A value cannot be used as a NATS subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// The value is empty.
    #[error("{field} must not be empty: it is a NATS subject token")]
    Empty {
        /// What the token is (`component`, `site`, ...).
        field: &'static str,
    },
    /// The value contains a character NATS gives meaning to or forbids in subjects.
    #[error("{field} {token:?} cannot be a NATS subject token: it contains {problem}")]
    InvalidToken {
        /// What the token is (`component`, `site`, ...).
        field: &'static str,
        /// The offending value.
        token: String,
        /// The offending character class.
        problem: &'static str,
    },
    /// The value is longer than [`MAX_TOKEN_BYTES`].
    #[error("{field} is {len} bytes long; a NATS subject token here may be at most {max}")]
    TooLong {
        /// What the token is (`component`, `site`, ...).
        field: &'static str,
        /// Its length, bytes.
        len: usize,
        /// The limit, bytes.
        max: usize,
    },
}

/// Checks that `token` can stand as one subject token: non-empty, at most
/// [`MAX_TOKEN_BYTES`], and free of `.` (separator), `*` and `>` (wildcards), whitespace and
/// control characters. `field` names the value in the error.
pub fn validate_token(field: &'static str, token: &str) -> Result<(), SubjectError> {
    if token.is_empty() {
        return Err(SubjectError::Empty { field });
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(SubjectError::TooLong { field, len: token.len(), max: MAX_TOKEN_BYTES });
    }
    let problem = token.chars().find_map(|c| match c {
        '.' => Some("'.'"),
        '*' => Some("'*'"),
        '>' => Some("'>'"),
        c if c.is_whitespace() => Some("whitespace"),
        c if c.is_control() => Some("a control character"),
        _ => None,
    });
    match problem {
        Some(problem) => Err(SubjectError::InvalidToken { field, token: token.to_owned(), problem }),
        None => Ok(()),
    }
}

/// `choria.lifecycle.event.<type>.<component>`.
pub fn lifecycle(event_type: LifecycleType, component: &str) -> Result<String, SubjectError> {
    validate_token("component", component)?;
    Ok(["choria.lifecycle.event.", event_type.as_str(), ".", component].concat())
}

/// `choria.machine.watcher.<type>.state`.
pub fn watcher(watcher_type: &str) -> Result<String, SubjectError> {
    validate_token("watcher type", watcher_type)?;
    Ok(["choria.machine.watcher.", watcher_type, ".state"].concat())
}

/// `chorus.rpc.request.<collective>.<agent>`.
pub fn rpc_request(collective: &str, agent: &str) -> Result<String, SubjectError> {
    validate_token("collective", collective)?;
    validate_token("agent", agent)?;
    Ok(["chorus.rpc.request.", collective, ".", agent].concat())
}

/// `chorus.rpc.reply.<collective>.<agent>`.
pub fn rpc_reply(collective: &str, agent: &str) -> Result<String, SubjectError> {
    validate_token("collective", collective)?;
    validate_token("agent", agent)?;
    Ok(["chorus.rpc.reply.", collective, ".", agent].concat())
}

/// `chorus.audit.<decision>.<site>`.
pub fn audit(decision: AuditAction, site: &str) -> Result<String, SubjectError> {
    validate_token("site", site)?;
    Ok(format!("chorus.audit.{}.{site}", decision.as_str()))
}

/// `choria.registration.<identity>`: an identity is usually a FQDN, so its dots make
/// several tokens, each validated (no wildcards, no empty token).
pub fn registration(identity: &str) -> Result<String, SubjectError> {
    for token in identity.split('.') {
        validate_token("identity", token)?;
    }
    Ok(format!("choria.registration.{identity}"))
}

/// `chorus.deadletter.<origin>`, where `origin` names the stream or consumer that gave up.
pub fn deadletter(origin: &str) -> Result<String, SubjectError> {
    validate_token("dead-letter origin", origin)?;
    Ok(format!("chorus.deadletter.{origin}"))
}

/// `chorus.reactor.<outcome>.<rule>`.
pub fn reaction(outcome: crate::ReactionOutcome, rule: &str) -> Result<String, SubjectError> {
    validate_token("rule", rule)?;
    Ok(format!("chorus.reactor.{}.{rule}", outcome.as_str()))
}

/// The subject an event is published on.
pub(crate) fn for_event(event: &Event) -> Result<String, SubjectError> {
    match event {
        Event::Lifecycle(l) => lifecycle(l.lifecycle_type(), l.component()),
        Event::Transition(_) => Ok(MACHINE_TRANSITION.to_owned()),
        Event::Watcher(w) => watcher(w.watcher_type()),
        Event::RpcRequest(r) => rpc_request(&r.collective, &r.agent),
        Event::RpcReply(r) => rpc_reply(&r.collective, &r.agent),
        Event::Audit(a) => audit(a.action, &a.site),
        Event::Registration(r) => registration(r.identity()),
        Event::Reaction(r) => reaction(r.outcome, &r.rule),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_validated() {
        assert!(validate_token("component", "server").is_ok());
        assert!(validate_token("component", "provision_mode_server").is_ok());
        assert_eq!(validate_token("component", ""), Err(SubjectError::Empty { field: "component" }));
        for bad in ["web.prod", "a*", ">", "a b", "tab\t", "nl\n", "nul\0", "nbsp\u{a0}"] {
            assert!(matches!(validate_token("component", bad), Err(SubjectError::InvalidToken { .. })), "{bad:?}");
        }
        assert!(matches!(
            validate_token("component", &"x".repeat(MAX_TOKEN_BYTES + 1)),
            Err(SubjectError::TooLong { .. })
        ));
    }

    #[test]
    fn subjects_follow_the_scheme() {
        assert_eq!(lifecycle(LifecycleType::Alive, "server").unwrap(), "choria.lifecycle.event.alive.server");
        assert_eq!(watcher("exec").unwrap(), "choria.machine.watcher.exec.state");
        assert_eq!(rpc_request("choria", "rpcutil").unwrap(), "chorus.rpc.request.choria.rpcutil");
        assert_eq!(rpc_reply("choria", "rpcutil").unwrap(), "chorus.rpc.reply.choria.rpcutil");
        assert_eq!(audit(AuditAction::Deny, "london").unwrap(), "chorus.audit.deny.london");
        assert_eq!(deadletter("tally").unwrap(), "chorus.deadletter.tally");
        assert!(lifecycle(LifecycleType::Startup, "a.b").is_err());
        assert!(rpc_request("choria", "").is_err());
        assert!(audit(AuditAction::Allow, "lon don").is_err());
    }

    #[test]
    fn every_subject_is_captured_by_exactly_one_stream() {
        let subjects = [
            lifecycle(LifecycleType::Governor, "CLI").unwrap(),
            MACHINE_TRANSITION.to_owned(),
            watcher("timer").unwrap(),
            rpc_request("c", "a").unwrap(),
            rpc_reply("c", "a").unwrap(),
            audit(AuditAction::Unknown, "s").unwrap(),
            deadletter("o").unwrap(),
        ];
        for subject in &subjects {
            let owners: Vec<_> = streams()
                .into_iter()
                .filter(|(_, filters)| filters.iter().any(|f| chorus_backbone::subject::matches(f, subject)))
                .map(|(name, _)| name)
                .collect();
            assert_eq!(owners.len(), 1, "{subject} captured by {owners:?}");
        }
    }
}
