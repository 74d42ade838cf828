//! Go-style duration strings (`"500ms"`, `"1m30s"`, `"1.5h"`), the format Choria manifests
//! use for `interval`, `timeout`, `timer` and friends, so existing `machine.yaml` files load
//! unchanged. Like go-choria's `util.ParseDuration` it also knows `d` (24h) and `w` (7d).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use thiserror::Error;

/// A duration string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses a Go-style duration: one or more `<number><unit>` pairs, where the number may have
/// a fraction and the unit is one of `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`, `d`, `w`.
/// A bare `0` is zero; negative durations are rejected since no manifest field means
/// anything by them.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError { input: input.to_string(), reason };
    let s = input.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s.starts_with('-') {
        return Err(err("negative"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }

    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let int_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(after) => {
                let len = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
                after.split_at(len)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err("expected a number"));
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            "w" => 7 * 86_400 * 1_000_000_000,
            "" => return Err(err("missing unit (ns, us, ms, s, m, h, d or w)")),
            _ => return Err(err("unknown unit (expected ns, us, ms, s, m, h, d or w)")),
        };
        let int: u128 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| err("number too large"))? };
        let mut value = int.checked_mul(unit_nanos).ok_or_else(|| err("too large"))?;
        // Fractions beyond nanosecond precision are truncated, as Go does.
        let frac_part = &frac_part[..frac_part.len().min(18)];
        if !frac_part.is_empty() {
            let frac: u128 = frac_part.parse().map_err(|_| err("invalid fraction"))?;
            // Checked: an integer part just below u128::MAX in nanoseconds plus a fraction
            // overflows (and wrapped to a short duration in release builds).
            value = value
                .checked_add(frac * unit_nanos / 10u128.pow(frac_part.len() as u32))
                .ok_or_else(|| err("too large"))?;
        }
        total = total.checked_add(value).ok_or_else(|| err("too large"))?;
        if total > u64::MAX as u128 {
            return Err(err("too large"));
        }
        rest = after;
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Formats a duration the way a manifest would spell it (`500ms`, `1m30s`), for messages.
pub(crate) fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let nanos = d.as_nanos();
    if nanos < 1_000_000_000 {
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            format!("{}us", nanos / 1_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    let sub = d.subsec_millis();
    if sub > 0 {
        let frac = format!("{sub:03}");
        out.push_str(&format!("{s}.{}s", frac.trim_end_matches('0')));
    } else if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// A manifest field holding a Go-style duration string. Deserializing through this type puts
/// parse errors at the field's path (`watchers[0].interval: invalid duration ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string such as \"500ms\", \"10s\", \"1m\" or \"1h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
                parse_duration(v).map(GoDuration).map_err(E::custom)
            }
            // `0` is the one number Go accepts without a unit.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoDuration, E> {
                if v == 0 {
                    Ok(GoDuration(Duration::ZERO))
                } else {
                    Err(E::invalid_type(de::Unexpected::Unsigned(v), &self))
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("1s").unwrap(), ms(1000));
        assert_eq!(parse_duration("500ms").unwrap(), ms(500));
        assert_eq!(parse_duration("1m").unwrap(), ms(60_000));
        assert_eq!(parse_duration("1h").unwrap(), ms(3_600_000));
        assert_eq!(parse_duration("1h30m").unwrap(), ms(5_400_000));
        assert_eq!(parse_duration("1.5s").unwrap(), ms(1500));
        assert_eq!(parse_duration(".5s").unwrap(), ms(500));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(2 * 86_400));
        assert_eq!(parse_duration("1w").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("10us").unwrap(), Duration::from_micros(10));
        assert_eq!(parse_duration("10µs").unwrap(), Duration::from_micros(10));
        assert_eq!(parse_duration("7ns").unwrap(), Duration::from_nanos(7));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration(" 3s ").unwrap(), ms(3000));
    }

    #[test]
    fn rejects_bad_durations() {
        let fraction_overflow = "340282366920938463463374607431.999999999s";
        for bad in ["", "5", "1x", "-1s", "s", "1.s.", "1h-2m", "99999999999999999999h", fraction_overflow] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
        let e = parse_duration("10").unwrap_err();
        assert_eq!(e.to_string(), "invalid duration \"10\": missing unit (ns, us, ms, s, m, h, d or w)");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(format_duration(ms(500)), "500ms");
        assert_eq!(format_duration(ms(60_000)), "1m");
        assert_eq!(format_duration(ms(90_000)), "1m30s");
        assert_eq!(format_duration(ms(1500)), "1.5s");
        assert_eq!(format_duration(ms(3_600_000)), "1h");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
