//! The two text formats `/metrics` speaks: OpenMetrics, which `prometheus-client` writes,
//! and the Prometheus text format (0.0.4), which scrapers that do not ask for OpenMetrics
//! (and `promtool check metrics`) expect.
//!
//! Written here because `prometheus-client` only writes OpenMetrics. The two differ in a
//! few lines, all rewritten from the OpenMetrics text: counters are named with their
//! `_total` suffix in `# TYPE`/`# HELP`; `info` and `stateset` families become gauges (their
//! samples unchanged), `unknown` becomes `untyped`; `# UNIT` lines, exemplars and the final
//! `# EOF` are dropped.

/// The content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.split(',').any(|part| part.trim().starts_with("application/openmetrics-text")))
}

/// The Prometheus text format of an OpenMetrics exposition.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            let name_as = match kind {
                "counter" if !name.ends_with("_total") => format!("{name}_total"),
                "info" => format!("{name}_info"),
                _ => name.to_string(),
            };
            renamed.insert(name.to_string(), name_as);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            let kind = match kind {
                "info" | "stateset" => "gauge",
                "gaugehistogram" => "histogram",
                "unknown" => "untyped",
                other => other,
            };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed.get(name).map_or(name, String::as_str)));
        } else if let Some((name, help)) = line.strip_prefix("# HELP ").and_then(|r| r.split_once(' ')) {
            out.push_str(&format!("# HELP {} {help}\n", renamed.get(name).map_or(name, String::as_str)));
        } else {
            // A sample, without its exemplar (` # {...} value`).
            let sample = line.find(" # {").map_or(line, |at| &line[..at]);
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENMETRICS_TEXT: &str = "\
# HELP chorus_replicator_copied Events the target acknowledged.
# TYPE chorus_replicator_copied counter
chorus_replicator_copied_total{link=\"east\",stream=\"S\"} 30000
# HELP chorus_build Build.
# TYPE chorus_build info
chorus_build_info{version=\"1\"} 1
# HELP chorus_lag_seconds Lag.
# TYPE chorus_lag_seconds gauge
# UNIT chorus_lag_seconds seconds
chorus_lag_seconds 0.5
# HELP chorus_took Took.
# TYPE chorus_took histogram
chorus_took_bucket{le=\"1.0\"} 3 # {trace_id=\"x\"} 0.5
chorus_took_bucket{le=\"+Inf\"} 4
chorus_took_sum 2.5
chorus_took_count 4
# EOF
";

    #[test]
    fn counters_are_named_with_their_total_and_openmetrics_only_lines_go() {
        let text = prometheus_text(OPENMETRICS_TEXT);
        assert!(text.contains("# HELP chorus_replicator_copied_total Events the target acknowledged.\n"), "{text}");
        assert!(text.contains("# TYPE chorus_replicator_copied_total counter\n"), "{text}");
        assert!(text.contains("chorus_replicator_copied_total{link=\"east\",stream=\"S\"} 30000\n"), "{text}");
        assert!(text.contains("# TYPE chorus_build_info gauge\nchorus_build_info{version=\"1\"} 1\n"), "{text}");
        assert!(text.contains("chorus_took_bucket{le=\"1.0\"} 3\n"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT") && !text.contains("trace_id"), "{text}");
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        assert!(wants_openmetrics(Some("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")));
        assert!(!wants_openmetrics(Some("text/plain; version=0.0.4")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}
