//! Scout-style check states: the latest result of every `nagios` watcher of every node,
//! folded from the machine stream (`CHORUS_MACHINE`, or Choria's `CHORIA_MACHINE`).
//!
//! Applied by event time, like the rest of the inventory: an older result (an outbox
//! forwarding a backlog) never replaces a newer one.

use chorus_schemas::machine::WatcherDetails;
use chorus_schemas::{Event, EventRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::projection::{Txn, View, ViewError};

/// Name of the check view (store tree, `chorus.deadletter.checks`).
pub const CHECKS_VIEW: &str = "checks";

/// Key prefix of check records.
pub(super) const CHECK_PREFIX: &[u8] = b"c/";

/// The subject nagios watcher states are published on.
const NAGIOS_SUBJECT: &str = "choria.machine.watcher.nagios.state";

/// One check of one node, as last reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckState {
    /// The node.
    pub identity: String,
    /// The autonomous agent (machine) that runs the check.
    pub machine: String,
    /// The watcher (the check's name).
    pub check: String,
    /// `OK`, `WARNING`, `CRITICAL` or `UNKNOWN`.
    pub status: String,
    /// The plugin's exit code.
    pub status_code: i64,
    /// The plugin's output.
    pub output: String,
    /// The plugin (command line), empty for a builtin check.
    pub plugin: String,
    /// When the check ran, as the node says (Unix seconds).
    pub check_time: i64,
    /// The event's time.
    pub time: DateTime<Utc>,
    /// Stream sequence of the result.
    pub sequence: u64,
}

/// Folds nagios watcher states into the latest [`CheckState`] per (node, machine, check).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChecksView;

impl View for ChecksView {
    fn name(&self) -> &str {
        CHECKS_VIEW
    }

    fn filter_subjects(&self) -> Vec<String> {
        vec![NAGIOS_SUBJECT.into()]
    }

    fn apply(&mut self, sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        let Event::Watcher(w) = &record.data else { return Ok(()) };
        let WatcherDetails::Nagios(n) = &w.details else { return Ok(()) };
        let key = [CHECK_PREFIX, w.identity.as_bytes(), b"\0", w.machine.as_bytes(), b"\0", w.name.as_bytes()].concat();
        if let Some(seen) = txn.get_json::<CheckState>(&key)? {
            if seen.time > record.time {
                return Ok(());
            }
        }
        let state = CheckState {
            identity: w.identity.clone(),
            machine: w.machine.clone(),
            check: w.name.clone(),
            status: n.status.clone(),
            status_code: n.status_code,
            output: n.output.clone(),
            plugin: n.plugin.clone(),
            check_time: n.check_time,
            time: record.time,
            sequence,
        };
        txn.insert_json(&key, &state)
    }
}
