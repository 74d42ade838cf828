//! `timer` watcher: starts a timer on entering a matching state (restarting it on every
//! state change into a matching state) and fires `fail_transition` when it runs out; leaving
//! the matching states stops it early. State events: `running` on start, `stopped` on
//! expiry or early stop.

use std::future::pending;
use std::time::Duration;

use chorus_schemas::machine::TimerDetails;
use chorus_schemas::WatcherDetails;
use tokio::time::Instant;
use tracing::debug;

use super::{next_state, tick, ticker, WatcherCtx};
use crate::machine::manifest::TimerProperties;
use crate::machine::random_below;

fn details(running: bool, length: Duration) -> WatcherDetails {
    WatcherDetails::Timer(TimerDetails {
        state: if running { "running" } else { "stopped" }.into(),
        timer: length.as_nanos().min(u64::MAX as u128) as u64,
    })
}

async fn expiry(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => pending().await,
    }
}

pub(super) async fn run(ctx: WatcherCtx, props: TimerProperties) {
    // Picked once per start, as Choria does.
    let length = if props.splay { random_below(props.timer) } else { props.timer };
    let (mut states, state) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let mut announce = ticker(ctx.def.announce_interval);

    let mut deadline = None;
    if ctx.active_in(&state) {
        deadline = Some(Instant::now() + length);
        ctx.notify(details(true, length)).await;
    }
    loop {
        tokio::select! {
            biased;
            _ = stop.requested() => return,
            _ = expiry(deadline) => {
                debug!(machine = %ctx.machine(), watcher = %ctx.name(), "timer expired");
                deadline = None;
                ctx.notify(details(false, length)).await;
                ctx.fail().await;
            }
            state = next_state(&mut states) => match state {
                None => return,
                Some(state) if ctx.active_in(&state) => {
                    debug!(machine = %ctx.machine(), watcher = %ctx.name(), restart = deadline.is_some(), "timer started");
                    deadline = Some(Instant::now() + length);
                    ctx.notify(details(true, length)).await;
                }
                Some(_) => {
                    if deadline.take().is_some() {
                        debug!(machine = %ctx.machine(), watcher = %ctx.name(), "timer stopped early on state change");
                        ctx.notify(details(false, length)).await;
                    }
                }
            },
            _ = tick(&mut announce) => ctx.notify(details(deadline.is_some(), length)).await,
        }
    }
}
