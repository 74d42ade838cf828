//! `expression` watcher: Choria's conditions over the machine's data store. While the
//! machine is in a matching state, every interval (default 10 s) and on every state change,
//! `success_when` and then `fail_when` are evaluated over `data` (the machine's data store),
//! `facts` and `identity`; the first that holds is the outcome. A state event is published
//! for every success, failure and error, and a transition fires when the outcome changes to
//! success or failure (a condition that keeps holding does not fire again).

use std::time::Duration;

use chorus_rpc::expression::Condition;
use chorus_schemas::machine::OutcomeDetails;
use chorus_schemas::WatcherDetails;
use serde_json::Value;
use tracing::warn;

use super::{next_wake, ticker, Wake, WatcherCtx};
use crate::machine::manifest::ExpressionProperties;

/// Choria's default interval.
const INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Fail,
    NoMatch,
    Skipped,
    Error,
}

impl Outcome {
    /// Choria's names (`previous_outcome`).
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success_when",
            Outcome::Fail => "failed_when",
            Outcome::NoMatch => "no_match",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
        }
    }
}

fn evaluate(ctx: &WatcherCtx, conditions: &[(Outcome, Condition)]) -> Result<Outcome, String> {
    let data = Value::Object(ctx.shared.data.snapshot());
    let identity = Value::String(ctx.shared.instance.identity.clone());
    let values = [("data", &data), ("facts", &*ctx.shared.facts), ("identity", &identity)];
    for (outcome, condition) in conditions {
        if condition.holds(&values)? {
            return Ok(*outcome);
        }
    }
    Ok(Outcome::NoMatch)
}

pub(super) async fn run(ctx: WatcherCtx, props: ExpressionProperties) {
    // Validated with the manifest; compiled again here.
    let conditions: Vec<(Outcome, Condition)> =
        [(Outcome::Success, &props.success_when), (Outcome::Fail, &props.fail_when)]
            .into_iter()
            .filter_map(|(o, text)| Some((o, Condition::compile(text.as_deref()?).ok()?)))
            .collect();
    let (mut states, _) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let mut every = ticker(Some(ctx.def.interval.unwrap_or(INTERVAL)));
    let mut announce = ticker(ctx.def.announce_interval);
    let mut previous = Outcome::Skipped;
    let mut check = true;
    loop {
        if check {
            // The machine's state, and other machines' (foreign_state_required), now.
            let outcome = if ctx.active_in(&ctx.current_state()) {
                evaluate(&ctx, &conditions).unwrap_or_else(|e| {
                    warn!(machine = %ctx.machine(), watcher = %ctx.name(), error = %e, "expression failed");
                    Outcome::Error
                })
            } else {
                Outcome::Skipped
            };
            let before = std::mem::replace(&mut previous, outcome);
            if matches!(outcome, Outcome::Success | Outcome::Fail | Outcome::Error) {
                ctx.notify(details(outcome)).await;
            }
            match outcome {
                Outcome::Success if before != Outcome::Success => ctx.success().await,
                Outcome::Fail if before != Outcome::Fail => ctx.fail().await,
                _ => {}
            }
            check = false;
        }
        match next_wake(&stop, &mut states, &mut every, &mut announce).await {
            Wake::Stop => return,
            Wake::Check => check = true,
            Wake::Announce => ctx.notify(details(previous)).await,
        }
    }
}

fn details(outcome: Outcome) -> WatcherDetails {
    WatcherDetails::Expression(OutcomeDetails { previous_outcome: outcome.as_str().into(), previous_run_time: None })
}
