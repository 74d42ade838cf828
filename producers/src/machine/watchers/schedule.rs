//! `schedule` watcher: "on" for `duration` after each minute matching one of its cron lines
//! (node local time), otherwise "off". Turning on fires `success_transition`, turning off
//! `fail_transition`, each with a state event. Overlapping windows keep it on.
//!
//! The state is computed from the clock every second rather than by counting starts, so a
//! machine started (or a state re-entered) inside a window sees it as on. The first check
//! after start, and after re-entering a matching state, always fires, unless
//! `skip_trigger_on_reenter` is set and nothing changed while away.

use std::time::Duration;

use chorus_schemas::machine::ScheduleDetails;
use chorus_schemas::WatcherDetails;
use chrono::{Local, Utc};
use tracing::{debug, error};

use super::{next_state, tick, ticker, WatcherCtx};
use crate::machine::cron::{window_open, CronSchedule};
use crate::machine::manifest::ScheduleProperties;

const CHECK_EVERY: Duration = Duration::from_secs(1);

fn details(on: Option<bool>) -> WatcherDetails {
    let state = match on {
        Some(true) => "on",
        Some(false) => "off",
        None => "unknown",
    };
    WatcherDetails::Schedule(ScheduleDetails { state: state.into() })
}

pub(super) async fn run(ctx: WatcherCtx, props: ScheduleProperties) {
    let schedules = match props.schedules.iter().map(|s| CronSchedule::parse(s)).collect::<Result<Vec<_>, _>>() {
        Ok(schedules) => schedules,
        // Manifests are validated before a machine starts, so this is a bug, not bad input.
        Err(e) => {
            error!(machine = %ctx.machine(), watcher = %ctx.name(), error = %e, "invalid schedule, watcher not started");
            return;
        }
    };
    let (mut states, _) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let mut announce = ticker(ctx.def.announce_interval);
    // Checks once right away, then every second.
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // One random offset for this watcher's life: every window opens that long after its
    // match (Choria's start_splay), still closing at match + duration.
    let splay = crate::machine::random_below(props.start_splay);
    let mut reported: Option<bool> = None;
    let mut away = true; // not yet checked in a matching state
    loop {
        let due = tokio::select! {
            biased;
            _ = stop.requested() => return,
            state = next_state(&mut states) => match state {
                None => return,
                Some(_) => true,
            },
            _ = check.tick() => true,
            _ = tick(&mut announce) => {
                ctx.notify(details(reported)).await;
                false
            }
        };
        if !due {
            continue;
        }
        if !ctx.active_in(&ctx.current_state()) {
            away = true;
            continue;
        }
        let since = chrono::Duration::from_std(splay).unwrap_or_default();
        let on = window_open(&schedules, props.duration.saturating_sub(splay), Utc::now() - since, &Local);
        let reentered = std::mem::replace(&mut away, false);
        let changed = reported != Some(on);
        if changed || (reentered && !props.skip_trigger_on_reenter) {
            debug!(machine = %ctx.machine(), watcher = %ctx.name(), on, "schedule state");
            reported = Some(on);
            ctx.notify(details(reported)).await;
            if on {
                ctx.success().await;
            } else {
                ctx.fail().await;
            }
        }
    }
}
