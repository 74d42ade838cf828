//! Watcher states: the latest state of every autonomous-agent watcher of every node, of
//! every type Choria has (exec, file, schedule, timer, nagios, kv, metric, ...), and for
//! `nagios` watchers the Scout-style check result, folded from the machine stream
//! (`CHORUS_MACHINE`, or Choria's `CHORIA_MACHINE`).
//!
//! Applied by event time, like the rest of the inventory: an older result (an outbox
//! forwarding a backlog) never replaces a newer one.

use chorus_schemas::machine::WatcherDetails;
use chorus_schemas::{Event, EventRecord};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::projection::{Txn, View, ViewError};

/// Name of the watcher view (store tree, `chorus.deadletter.watchers`). It was `checks` when
/// it kept nagios checks alone; the new name makes an existing store build it from the
/// stream's start.
pub const WATCHERS_VIEW: &str = "watchers";

/// Key prefix of check records (nagios watchers).
pub(super) const CHECK_PREFIX: &[u8] = b"c/";

/// Key prefix of watcher records (every watcher).
pub(super) const WATCHER_PREFIX: &[u8] = b"w/";

/// The subjects watcher states are published on.
const WATCHER_SUBJECTS: &str = "choria.machine.watcher.>";

/// One watcher of one node, as last reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WatcherSummary {
    /// The node.
    pub identity: String,
    /// The autonomous agent (machine).
    pub machine: String,
    /// The watcher's name.
    pub watcher: String,
    /// Its type (`exec`, `nagios`, `kv`, ...).
    #[serde(rename = "type")]
    pub watcher_type: String,
    /// Its state in one word (see `WatcherDetails::state`).
    pub state: String,
    /// The event's time.
    pub time: DateTime<Utc>,
    /// Stream sequence of the state.
    pub sequence: u64,
}

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

/// Folds watcher states into the latest [`WatcherSummary`] per (node, machine, watcher), and
/// nagios watcher states into the latest [`CheckState`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WatchersView;

impl View for WatchersView {
    fn name(&self) -> &str {
        WATCHERS_VIEW
    }

    fn filter_subjects(&self) -> Vec<String> {
        vec![WATCHER_SUBJECTS.into()]
    }

    fn apply(&mut self, sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        let Event::Watcher(w) = &record.data else { return Ok(()) };
        let id = [w.identity.as_bytes(), b"\0", w.machine.as_bytes(), b"\0", w.name.as_bytes()].concat();
        let key = [WATCHER_PREFIX, &id].concat();
        if let Some(seen) = txn.get_json::<WatcherSummary>(&key)? {
            if seen.time > record.time {
                return Ok(());
            }
        }
        let summary = WatcherSummary {
            identity: w.identity.clone(),
            machine: w.machine.clone(),
            watcher: w.name.clone(),
            watcher_type: w.watcher_type().into(),
            state: w.details.state().into(),
            time: record.time,
            sequence,
        };
        txn.insert_json(&key, &summary)?;
        let WatcherDetails::Nagios(n) = &w.details else { return Ok(()) };
        let key = [CHECK_PREFIX, &id].concat();
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
