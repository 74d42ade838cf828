//! `metric` watcher: Choria's metric gathering. Runs its command every interval (the first
//! run splayed within it) while the machine is in a matching state; the output is a JSON
//! `{"labels": {...}, "metrics": {"name": value}}` (label `format: choria`) or Nagios
//! performance data (label `format: nagios`), the manifest's labels added. Each run publishes
//! a `metric` state event and fires `success_transition`; a command that fails or prints
//! neither fires `fail_transition`.

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_schemas::machine::{MetricDetails, MetricSample};
use chorus_schemas::WatcherDetails;
use tracing::warn;

use super::process::Ran;
use super::{next_state, splayed_ticker, tick, ticker, WatcherCtx};
use crate::machine::manifest::MetricProperties;

/// Choria gives the command a second; Chorus a little more, for slow starts.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(serde::Deserialize)]
struct Output {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    metrics: BTreeMap<String, serde_json::Number>,
}

/// The sample in the command's output, or why there is none.
fn parse(output: &str, extra: &BTreeMap<String, String>) -> Result<MetricSample, String> {
    let (mut labels, metrics) = if output.trim_start().starts_with('{') {
        let parsed: Output = serde_json::from_str(output).map_err(|e| format!("output: {e}"))?;
        let mut labels = BTreeMap::from([("format".to_string(), "choria".to_string())]);
        labels.extend(parsed.labels);
        (labels, parsed.metrics)
    } else {
        let (_, perfdata) = super::nagios::parse_output(output);
        let metrics = perfdata
            .iter()
            .filter_map(|p| {
                let label = p.get("label")?.as_str()?.to_owned();
                let value = serde_json::Number::from_f64(p.get("value")?.as_f64()?)?;
                Some((label, value))
            })
            .collect();
        (BTreeMap::from([("format".to_string(), "nagios".to_string())]), metrics)
    };
    labels.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(MetricSample { labels, metrics, time: chrono::Utc::now().timestamp() })
}

pub(super) async fn run(ctx: WatcherCtx, props: MetricProperties) {
    let Some(period) = props.interval.or(ctx.def.interval).filter(|p| !p.is_zero()) else { return };
    let (mut states, _) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let mut announce = ticker(ctx.def.announce_interval);
    let mut every = splayed_ticker(period);
    let mut last: Option<MetricSample> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.requested() => return,
            state = next_state(&mut states) => if state.is_none() { return },
            _ = tick(&mut announce) => {
                if let Some(sample) = &last {
                    ctx.notify(WatcherDetails::Metric(MetricDetails { metrics: sample.clone() })).await;
                }
            }
            _ = every.tick() => {
                if !ctx.active_in(&ctx.current_state()) {
                    continue;
                }
                let result = tokio::select! {
                    biased;
                    _ = stop.requested() => return,
                    r = super::process::run(&ctx, &props.command, TIMEOUT, &[]) => r,
                };
                let sample = match result {
                    Ran::Exited { code: Some(0), stdout, .. } => parse(&stdout, &props.labels),
                    Ran::Exited { code, stderr, .. } => Err(format!("exit {code:?}: {}", stderr.trim())),
                    Ran::Failed(e) => Err(e),
                    Ran::TimedOut => Err(format!("timed out after {TIMEOUT:?}")),
                };
                match sample {
                    Ok(sample) => {
                        if props.extra.get("store").is_some_and(|v| v == "true") {
                            // Choria's `store`: the sample under `metric`, by watcher name (each
                            // watcher's kept beside the others').
                            let value = serde_json::to_value(&sample).unwrap_or_default();
                            let stored = ctx.shared.data.update("metric", |before| {
                                let mut all = match before {
                                    Some(serde_json::Value::Object(all)) => all,
                                    _ => serde_json::Map::new(),
                                };
                                all.insert(ctx.name().to_owned(), value);
                                serde_json::Value::Object(all)
                            });
                            if let Err(e) = stored {
                                warn!(machine = %ctx.machine(), watcher = %ctx.name(), error = %e, "could not store the metrics as data");
                            }
                        }
                        ctx.notify(WatcherDetails::Metric(MetricDetails { metrics: sample.clone() })).await;
                        last = Some(sample);
                        ctx.success().await;
                    }
                    Err(e) => {
                        warn!(machine = %ctx.machine(), watcher = %ctx.name(), command = %props.command, error = %e, "metric gathering failed");
                        ctx.fail().await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_nagios_outputs_are_samples() {
        let extra = BTreeMap::from([("dc".to_string(), "lon".to_string())]);
        let s = parse(r#"{"labels": {"disk": "/"}, "metrics": {"free": 12.5}}"#, &extra).unwrap();
        assert_eq!(s.labels.get("format").map(String::as_str), Some("choria"));
        assert_eq!((s.labels["disk"].as_str(), s.labels["dc"].as_str()), ("/", "lon"));
        assert_eq!(s.metrics["free"].as_f64(), Some(12.5));
        let s = parse("OK | load1=0.5;1;2 users=3", &BTreeMap::new()).unwrap();
        assert_eq!(s.labels["format"], "nagios");
        assert_eq!((s.metrics["load1"].as_f64(), s.metrics["users"].as_f64()), (Some(0.5), Some(3.0)));
        assert!(parse("{broken", &BTreeMap::new()).is_err());
    }
}
