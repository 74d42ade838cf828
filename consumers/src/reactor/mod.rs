//! The reactor: rules that watch the streams and act, exactly once per (rule, event).
//!
//! A rule matches events (stream, CloudEvents type, NATS subject, an expression in Choria's
//! expr language), groups them by a key (the node by default), fires on a condition across
//! events (every match, N within a window, a key gone silent, a field that changed), held
//! back by a throttle, a debounce or once-per-key, and runs actions: an RPC request to
//! nodes chosen from the event, an HTTP webhook, a local command, a published event. Every
//! firing and every action's result is an `io.chorus.reactor.v1.reaction` event on
//! `chorus.reactor.<outcome>.<rule>` (stream `CHORUS_REACTOR`).
//!
//! # Exactly once
//!
//! Salt's reactor loses bursts and StackStorm's sensors fire twice under HA; the reactor
//! avoids both by being a deterministic function of the streams:
//!
//! * The reactor reads each stream from its own position, kept in its state store (`state_dir`)
//!   beside the rules' state by key. Each batch of events is evaluated, then its positions,
//!   the state it changed and the firings it produced are written in **one atomic, flushed
//!   write** before anything acts on them.
//! * Evaluation depends only on the events and their CloudEvents `time`, and a firing's id
//!   is derived from its rule and the stream sequence of its cause. A crash before the write
//!   re-reads the same events from the same state into the same firings; a crash after it
//!   finds the firings pending in the store.
//! * The `fired` record is published with the firing id as its event id (the stream drops a
//!   second copy), then the actions run in order; each action's completion is committed
//!   before the next starts, so after a crash only the action that was running runs again,
//!   with the same idempotency key (`<firing>.<n>`): the event id of a `publish` action (so
//!   it is stored once), the `Idempotency-Key` of a webhook, `CHORUS_FIRING` of a command.
//! * Timed conditions (absence, debounce) compare deadlines with the clock, but only for
//!   streams read up to their end (a node is not called silent while its events are still
//!   being read), and their firing is committed like any other before it acts.
//!
//! # Active-standby
//!
//! With `election:`, instances sharing a name elect a leader (see
//! [`chorus_platform::election`]); every instance reads and evaluates, only the leader acts,
//! and a standby that takes over skips what the leader recorded as done (see `standby`).
//!
//! Malformed messages go to `chorus.deadletter.<reactor>` with the reason; `--dry-run` prints
//! the `fired` records and changes nothing.

mod actions;
mod config;
mod engine;
mod error;
mod event;
pub mod metrics;
mod rules;
mod standby;
mod store;
mod template;

#[cfg(test)]
mod tests;

pub use config::{
    Action, CommandAction, Match, PublishAction, ReactorConfig, RpcAction, Rule, Start, WebhookAction, When,
};
pub use engine::{Monitor, Reactor, StatsSnapshot};
pub use error::ReactorError;
pub use event::{read as read_event, Needs, ReadEvent};
pub use rules::{Counts, Firing, KeyState, Rules, Seen};
pub use template::{ExprValue, Expression, Template};
