//! Logging of the Chorus programs, set up the same way by each of them.

use std::io::IsTerminal as _;

/// Logs to standard error with the `tracing` filter in `CHORUS_LOG` (`info`,
/// `chorus_replicator=debug,warn`; `warn` when unset). Colours only on a terminal: a log
/// written to a file, a pipe or the journal carries no escape codes.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHORUS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
