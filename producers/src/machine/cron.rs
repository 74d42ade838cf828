//! Five-field cron expressions for `schedule` watchers, with the semantics of robfig/cron's
//! standard parser that Choria uses: `*`, `?`, lists, ranges, steps (`*/5`, `1-30/2`, `5/15`
//! meaning `5-max/15`), month and weekday names, weekday `7` as Sunday, the `@hourly`-style
//! descriptors, and the classic rule that when both day-of-month and day-of-week are
//! restricted a day matching either one matches. Written here because the schedule watcher
//! only needs "does this minute match", which is a few bitmasks, not a scheduler.

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};

/// A parsed cron line: one bitmask per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CronSchedule {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    /// Day-of-month was `*`/`?`: then both day fields must match (AND), else either (OR).
    dom_star: bool,
    /// Day-of-week was `*`/`?`.
    dow_star: bool,
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field { name: "minute", min: 0, max: 59, names: &[] };
const HOUR: Field = Field { name: "hour", min: 0, max: 23, names: &[] };
const DOM: Field = Field { name: "day of month", min: 1, max: 31, names: &[] };
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
};
// 7 is accepted as Sunday and folded onto 0 after parsing.
const DOW: Field =
    Field { name: "day of week", min: 0, max: 7, names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"] };

impl CronSchedule {
    /// Parses a five-field line (`minute hour day-of-month month day-of-week`) or a
    /// descriptor (`@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`,
    /// `@hourly`). The error says which field is wrong.
    pub(crate) fn parse(line: &str) -> Result<Self, String> {
        let line = line.trim();
        let expanded = match line.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "unsupported descriptor {line:?} (use @yearly, @monthly, @weekly, @daily or @hourly)"
                ))
            }
            _ => line,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            ));
        }
        let (minutes, _) = parse_field(fields[0], &MINUTE)?;
        let (hours, _) = parse_field(fields[1], &HOUR)?;
        let (days_of_month, dom_star) = parse_field(fields[2], &DOM)?;
        let (months, _) = parse_field(fields[3], &MONTH)?;
        let (mut days_of_week, dow_star) = parse_field(fields[4], &DOW)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        Ok(CronSchedule { minutes, hours, days_of_month, months, days_of_week, dom_star, dow_star })
    }

    /// Whether the minute containing `t` matches, in `t`'s time zone.
    pub(crate) fn matches<Tz: TimeZone>(&self, t: &DateTime<Tz>) -> bool {
        let bit = |mask: u64, v: u32| mask & (1u64 << v) != 0;
        if !bit(self.minutes, t.minute()) || !bit(self.hours, t.hour()) || !bit(self.months, t.month()) {
            return false;
        }
        let dom = bit(self.days_of_month, t.day());
        let dow = bit(self.days_of_week, t.weekday().num_days_from_sunday());
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }
}

/// Returns the bitmask and whether the field was an unrestricted `*`/`?`.
fn parse_field(expr: &str, field: &Field) -> Result<(u64, bool), String> {
    let mut mask = 0u64;
    let mut star = false;
    for part in expr.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{}: invalid step {step:?} in {expr:?}", field.name))?;
                (range, Some(step))
            }
            None => (part, None),
        };
        let (start, end) = if range == "*" || range == "?" {
            if step.unwrap_or(1) == 1 {
                star = true;
            }
            (field.min, field.max)
        } else if let Some((lo, hi)) = range.split_once('-') {
            (value(lo, field, expr)?, value(hi, field, expr)?)
        } else {
            let v = value(range, field, expr)?;
            // `5/15` means "from 5 to the end, every 15", as in robfig/cron.
            (v, if step.is_some() { field.max } else { v })
        };
        if start > end {
            return Err(format!("{}: range {range:?} in {expr:?} goes backwards", field.name));
        }
        let step = step.unwrap_or(1);
        let mut v = start;
        while v <= end {
            mask |= 1 << v;
            v += step;
        }
    }
    Ok((mask, star))
}

fn value(s: &str, field: &Field, expr: &str) -> Result<u32, String> {
    let lower = s.to_ascii_lowercase();
    if let Some(i) = field.names.iter().position(|n| *n == lower) {
        // Month names start at 1 (jan), weekday names at 0 (sun): both at the field minimum.
        return Ok(i as u32 + field.min);
    }
    let v: u32 = s.parse().map_err(|_| format!("{}: invalid value {s:?} in {expr:?}", field.name))?;
    if v < field.min || v > field.max {
        return Err(format!("{}: {v} in {expr:?} is out of range {}-{}", field.name, field.min, field.max));
    }
    Ok(v)
}

/// Whether a schedule window is open at `now`: some schedule matched a minute that started
/// less than `duration` ago. Computing this from the clock (rather than counting starts)
/// means a machine that starts, or re-enters a matching state, in the middle of a window
/// sees it as open.
pub(crate) fn window_open<Tz: TimeZone>(
    schedules: &[CronSchedule],
    duration: Duration,
    now: DateTime<Utc>,
    tz: &Tz,
) -> bool {
    let duration_ms = duration.as_millis() as i64;
    let now_ms = now.timestamp_millis();
    let mut minute_ms = now_ms.div_euclid(60_000) * 60_000;
    while now_ms - minute_ms < duration_ms {
        if let Some(t) = DateTime::<Utc>::from_timestamp_millis(minute_ms) {
            let local = t.with_timezone(tz);
            if schedules.iter().any(|s| s.matches(&local)) {
                return true;
            }
        }
        minute_ms -= 60_000;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn m(line: &str, t: &str) -> bool {
        CronSchedule::parse(line).unwrap().matches(&at(t))
    }

    #[test]
    fn matches_fields() {
        // 2024-01-15 is a Monday.
        assert!(m("* * * * *", "2024-01-15T10:30:00Z"));
        assert!(m("30 10 * * *", "2024-01-15T10:30:59Z"));
        assert!(!m("30 10 * * *", "2024-01-15T10:31:00Z"));
        assert!(m("*/15 * * * *", "2024-01-15T10:45:00Z"));
        assert!(!m("*/15 * * * *", "2024-01-15T10:40:00Z"));
        assert!(m("0-10/5 * * * *", "2024-01-15T10:10:00Z"));
        assert!(!m("0-10/5 * * * *", "2024-01-15T10:15:00Z"));
        assert!(m("5/20 * * * *", "2024-01-15T10:45:00Z"));
        assert!(m("0,30 9-17 * * 1-5", "2024-01-15T17:30:00Z"));
        assert!(!m("0,30 9-17 * * 1-5", "2024-01-14T12:00:00Z")); // Sunday
        assert!(m("0 0 * * 7", "2024-01-14T00:00:00Z")); // 7 = Sunday
        assert!(m("0 0 * * sun", "2024-01-14T00:00:00Z"));
        assert!(m("0 0 1 jan *", "2024-01-01T00:00:00Z"));
        assert!(!m("0 0 1 feb *", "2024-01-01T00:00:00Z"));
        assert!(m("@hourly", "2024-01-15T11:00:00Z"));
        assert!(m("@daily", "2024-01-15T00:00:00Z"));
        assert!(!m("@daily", "2024-01-15T00:01:00Z"));
    }

    #[test]
    fn day_of_month_and_week_or_when_both_restricted() {
        // 13th OR Friday: Monday the 15th matches neither, Friday the 19th matches.
        assert!(m("0 0 13 * 5", "2024-01-19T00:00:00Z"));
        assert!(m("0 0 13 * 5", "2024-02-13T00:00:00Z"));
        assert!(!m("0 0 13 * 5", "2024-01-15T00:00:00Z"));
        // With day-of-week `*` both must match (AND).
        assert!(!m("0 0 13 * *", "2024-01-15T00:00:00Z"));
    }

    #[test]
    fn rejects_bad_lines() {
        for (line, needle) in [
            ("* * * *", "expected 5 fields"),
            ("* * * * * *", "expected 5 fields"),
            ("60 * * * *", "minute: 60"),
            ("* 24 * * *", "hour: 24"),
            ("* * 0 * *", "day of month: 0"),
            ("* * * 13 *", "month: 13"),
            ("* * * * 8", "day of week: 8"),
            ("*/0 * * * *", "invalid step"),
            ("10-5 * * * *", "goes backwards"),
            ("x * * * *", "invalid value"),
            ("@every 5m", "unsupported descriptor"),
        ] {
            let e = CronSchedule::parse(line).unwrap_err();
            assert!(e.contains(needle), "{line:?}: {e}");
        }
    }

    #[test]
    fn window_is_open_for_duration_after_a_match() {
        let s = vec![CronSchedule::parse("0 2 * * *").unwrap()];
        let hour = Duration::from_secs(3600);
        assert!(!window_open(&s, hour, at("2024-01-15T01:59:59Z"), &Utc));
        assert!(window_open(&s, hour, at("2024-01-15T02:00:00Z"), &Utc));
        assert!(window_open(&s, hour, at("2024-01-15T02:59:59Z"), &Utc));
        assert!(!window_open(&s, hour, at("2024-01-15T03:00:00Z"), &Utc));
        // Short windows close within the minute.
        let thirty = Duration::from_secs(30);
        assert!(window_open(&s, thirty, at("2024-01-15T02:00:29Z"), &Utc));
        assert!(!window_open(&s, thirty, at("2024-01-15T02:00:30Z"), &Utc));
        // Overlapping schedules keep the window open.
        let s = vec![CronSchedule::parse("0 2 * * *").unwrap(), CronSchedule::parse("30 2 * * *").unwrap()];
        assert!(window_open(&s, hour, at("2024-01-15T03:15:00Z"), &Utc));
    }
}
