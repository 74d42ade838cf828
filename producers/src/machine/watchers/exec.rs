//! `exec` watcher: runs a command on entering a matching state and every `interval`; exit 0
//! fires `success_transition`, anything else (including a timeout) `fail_transition`.
//!
//! The command runs with `sh -c` in the machine directory, with a clean environment as in
//! Choria (so a check behaves the same whatever started the agent): `PATH` (the agent's plus
//! the machine directory), `MACHINE_NAME`, `MACHINE_WATCHER_NAME` and the manifest's
//! `environment`. It gets its own process group, which is killed on timeout or stop, so a
//! script's children do not outlive it.

use std::time::Duration;

use chorus_schemas::machine::ExecDetails;
use chorus_schemas::WatcherDetails;
use tracing::{debug, warn};

use super::process::Ran;
use super::{next_state, tick, ticker, WatcherCtx};
use crate::machine::manifest::ExecProperties;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Unknown,
    Skipped,
    Error,
    Success,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Unknown => "unknown",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
            Outcome::Success => "success",
        }
    }
}

struct Last {
    outcome: Outcome,
    run_time: Duration,
}

fn details(props: &ExecProperties, last: &Last) -> WatcherDetails {
    WatcherDetails::Exec(ExecDetails {
        command: props.command.clone(),
        previous_outcome: last.outcome.as_str().into(),
        previous_run_time: last.run_time.as_nanos().min(u64::MAX as u128) as u64,
    })
}

pub(super) async fn run(ctx: WatcherCtx, props: ExecProperties) {
    let (mut states, state) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let mut interval = ticker(ctx.def.interval);
    let mut announce = ticker(ctx.def.announce_interval);
    let mut last = Last { outcome: Outcome::Unknown, run_time: Duration::ZERO };
    // Starting in a matching state counts as entering it.
    let mut due = ctx.active_in(&state);
    loop {
        if due {
            due = false;
            last = tokio::select! {
                biased;
                _ = stop.requested() => return,
                last = execute(&ctx, &props) => last,
            };
            if last.outcome == Outcome::Error || !props.suppress_success_announce {
                ctx.notify(details(&props, &last)).await;
            }
            match last.outcome {
                Outcome::Success => ctx.success().await,
                _ => ctx.fail().await,
            }
            // A transition fired just now shows up as a state change below.
        }
        tokio::select! {
            biased;
            _ = stop.requested() => return,
            state = next_state(&mut states) => match state {
                None => return,
                Some(state) if ctx.active_in(&state) => due = true,
                Some(_) => last.outcome = Outcome::Skipped,
            },
            _ = tick(&mut interval) => {
                if ctx.active_in(&ctx.current_state()) {
                    due = true;
                } else {
                    last.outcome = Outcome::Skipped;
                }
            }
            _ = tick(&mut announce) => ctx.notify(details(&props, &last)).await,
        }
    }
}

async fn execute(ctx: &WatcherCtx, props: &ExecProperties) -> Last {
    let started = std::time::Instant::now();
    let outcome = match &props.governor {
        None => run_command(ctx, props).await,
        Some(name) => match super::governed::enter(ctx, name, props.governor_timeout).await {
            Ok(lease) => {
                let outcome = run_command(ctx, props).await;
                lease.exit(ctx).await;
                outcome
            }
            Err(e) => {
                warn!(machine = %ctx.machine(), watcher = %ctx.name(), governor = %name, error = %e, "cannot enter the governor");
                Outcome::Error
            }
        },
    };
    Last { outcome, run_time: started.elapsed() }
}

async fn run_command(ctx: &WatcherCtx, props: &ExecProperties) -> Outcome {
    match super::process::run(ctx, &props.command, props.timeout, &props.environment).await {
        Ran::Exited { code: Some(0), stdout, stderr } => {
            debug!(machine = %ctx.machine(), watcher = %ctx.name(), command = %props.command,
                stdout = %tail(&stdout), stderr = %tail(&stderr), "command finished");
            if props.parse_as_data {
                if let Err(e) = store_output(ctx, &stdout) {
                    warn!(machine = %ctx.machine(), watcher = %ctx.name(), command = %props.command, error = %e,
                        "could not save the output as data");
                    return Outcome::Error;
                }
            }
            Outcome::Success
        }
        Ran::Exited { code, stderr, .. } => {
            warn!(machine = %ctx.machine(), watcher = %ctx.name(), command = %props.command,
                status = ?code, stderr = %tail(&stderr), "command failed");
            Outcome::Error
        }
        Ran::Failed(e) => {
            warn!(machine = %ctx.machine(), watcher = %ctx.name(), command = %props.command, error = %e, "command failed");
            Outcome::Error
        }
        Ran::TimedOut => {
            warn!(machine = %ctx.machine(), watcher = %ctx.name(), command = %props.command,
                timeout = ?props.timeout, "command timed out, killing it");
            Outcome::Error
        }
    }
}

/// `parse_as_data`: each key of the JSON object the command printed, into the machine's
/// data store.
fn store_output(ctx: &WatcherCtx, stdout: &str) -> Result<(), String> {
    let values: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(stdout).map_err(|e| format!("the output is not a JSON object: {e}"))?;
    for (key, value) in values {
        ctx.shared.data.put(&key, value).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The end of a command's output, for logs.
pub(super) fn tail(s: &str) -> &str {
    let s = s.trim_end();
    let mut start = s.len().saturating_sub(1024);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
