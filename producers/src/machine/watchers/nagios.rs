//! `nagios` watcher: Choria's Scout checks. Runs a Nagios-compatible check plugin (or a
//! builtin) every `interval` (the first run splayed within it) and on entering a matching
//! state; its exit code is the check state (0 `OK`, 1 `WARNING`, 2 `CRITICAL`, anything else
//! `UNKNOWN`). Each check publishes a `nagios` state event (status, output, performance data,
//! the last 15 results) and fires the machine's transition *named after the state* (`OK`,
//! `WARNING`, `CRITICAL`, `UNKNOWN`), as Choria's Scout machines expect. Entering the state
//! `FORCE_CHECK` runs a check at once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chorus_schemas::machine::NagiosDetails;
use chorus_schemas::WatcherDetails;
use serde_json::{json, Value};
use tracing::debug;

use super::process::Ran;
use super::{next_state, splayed_ticker, tick, ticker, WatcherCtx};
use crate::machine::manifest::NagiosProperties;

/// Results kept in `history`, as Choria keeps them.
const HISTORY: usize = 15;
/// The state that asks for a check now (Choria's `choria scout trigger`).
pub(crate) const FORCE_CHECK: &str = "FORCE_CHECK";

/// A check result.
#[derive(Clone, Debug, PartialEq)]
struct Check {
    code: i64,
    output: String,
    perfdata: Vec<Value>,
    at: i64,
    runtime: Duration,
}

fn status(code: i64) -> &'static str {
    match code {
        0 => "OK",
        1 => "WARNING",
        2 => "CRITICAL",
        _ => "UNKNOWN",
    }
}

/// Nagios plugin output: `TEXT | perfdata` on the first line; perfdata entries are
/// `label=value[UOM];[warn];[crit];[min];[max]`, space separated (labels may be quoted).
pub(super) fn parse_output(raw: &str) -> (String, Vec<Value>) {
    let first = raw.lines().next().unwrap_or_default();
    let (text, perf) = match first.split_once('|') {
        Some((t, p)) => (t.trim(), p.trim()),
        None => (first.trim(), ""),
    };
    let mut perfdata = Vec::new();
    for item in split_perf(perf) {
        let Some((label, rest)) = item.rsplit_once('=') else { continue };
        let label = label.trim_matches('\'');
        let value_uom = rest.split(';').next().unwrap_or_default();
        let number_end =
            value_uom.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))).unwrap_or(value_uom.len());
        let (number, unit) = value_uom.split_at(number_end);
        if let Ok(value) = number.parse::<f64>() {
            perfdata.push(json!({"label": label, "value": value, "unit": unit}));
        }
    }
    (text.to_owned(), perfdata)
}

/// Splits perfdata on spaces outside single quotes.
fn split_perf(perf: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in perf.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if i > start {
                    out.push(&perf[start..i]);
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < perf.len() {
        out.push(&perf[start..]);
    }
    out
}

fn details(props: &NagiosProperties, last: Option<&Check>, history: &VecDeque<Check>) -> WatcherDetails {
    let (code, output, perfdata, at, runtime) = match last {
        Some(c) => (c.code, c.output.clone(), c.perfdata.clone(), c.at, c.runtime.as_secs_f64()),
        None => (3, String::new(), Vec::new(), 0, 0.0),
    };
    WatcherDetails::Nagios(NagiosDetails {
        plugin: props.plugin.clone().or_else(|| props.builtin.clone()).unwrap_or_default(),
        status: if last.is_some() { status(code).into() } else { "UNKNOWN".into() },
        status_code: code,
        output,
        check_time: at,
        perfdata,
        runtime: serde_json::Number::from_f64(runtime),
        history: history
            .iter()
            .map(|c| {
                let executed = chrono::DateTime::from_timestamp(c.at, 0).unwrap_or_default();
                json!({"execute": executed.to_rfc3339(), "status": c.code, "perfdata": c.perfdata})
            })
            .collect(),
        annotations: props.annotations.clone(),
    })
}

async fn check(ctx: &WatcherCtx, props: &NagiosProperties) -> Check {
    let started = Instant::now();
    let at = chrono::Utc::now().timestamp();
    let (code, raw) = match (&props.plugin, props.builtin.as_deref()) {
        (Some(plugin), _) => match super::process::run(ctx, plugin, props.timeout, &[]).await {
            Ran::Exited { code: Some(code), stdout, stderr } => {
                (i64::from(code), if stdout.trim().is_empty() { stderr } else { stdout })
            }
            Ran::Exited { code: None, .. } => (3, "killed by a signal".into()),
            Ran::Failed(e) => (3, e),
            Ran::TimedOut => (3, format!("timed out after {:?}", props.timeout)),
        },
        (None, Some("heartbeat")) => (0, format!("heartbeat | heartbeat={at}s")),
        (None, Some(other)) => (3, format!("builtin {other} is not available on Chorus nodes")),
        (None, None) => (3, "no plugin".into()),
    };
    let (output, perfdata) = parse_output(&raw);
    Check { code: if (0..=3).contains(&code) { code } else { 3 }, output, perfdata, at, runtime: started.elapsed() }
}

pub(super) async fn run(ctx: WatcherCtx, props: NagiosProperties) {
    let (mut states, state) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let mut announce = ticker(ctx.def.announce_interval);
    // The first periodic check is splayed within the interval, so a fleet does not check
    // in lockstep; the period stays the interval.
    let mut interval = ctx.def.interval.filter(|i| !i.is_zero()).map(splayed_ticker);
    let mut history: VecDeque<Check> = VecDeque::with_capacity(HISTORY);
    let mut was_active = ctx.active_in(&state);
    let mut due = was_active || state == FORCE_CHECK;
    loop {
        if due {
            due = false;
            let result = tokio::select! {
                biased;
                _ = stop.requested() => return,
                c = check(&ctx, &props) => c,
            };
            debug!(machine = %ctx.machine(), watcher = %ctx.name(), status = status(result.code), "check");
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(result.clone());
            ctx.notify(details(&props, Some(&result), &history)).await;
            ctx.fire(Some(status(result.code))).await;
        }
        tokio::select! {
            biased;
            _ = stop.requested() => return,
            state = next_state(&mut states) => match state {
                None => return,
                // A check on FORCE_CHECK, and on coming back from states where the watcher
                // does not check (MAINTENANCE); not on the states its own checks move to.
                Some(state) => {
                    let active = ctx.active_in(&state);
                    due = state == FORCE_CHECK || (active && !was_active);
                    was_active = active;
                }
            },
            _ = tick(&mut interval) => due = ctx.active_in(&ctx.current_state()),
            _ = tick(&mut announce) => ctx.notify(details(&props, history.back(), &history)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_output_and_perfdata_are_parsed_as_nagios_writes_them() {
        let (text, perf) = parse_output(
            "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968 'free space'=56%;;\nlong text",
        );
        assert_eq!(text, "DISK OK - free space: / 3326 MB (56%);");
        assert_eq!(
            perf,
            vec![
                json!({"label": "/", "value": 2643.0, "unit": "MB"}),
                json!({"label": "free space", "value": 56.0, "unit": "%"}),
            ]
        );
        assert_eq!(parse_output("OK").0, "OK");
        assert!(parse_output("OK | broken=;;").1.is_empty());
        assert_eq!(["OK", "WARNING", "CRITICAL", "UNKNOWN", "UNKNOWN"], [0, 1, 2, 3, 9].map(status));
    }
}
