//! The envelope's `time` written as text without the `fmt` machinery.
//!
//! Every event a producer stores has its `time` written; through chrono's `Serialize` (a
//! `Display` fed to serde_json's `collect_str`, a few bytes per call) that was a seventh of
//! making and encoding a lifecycle event. The text is chrono's, byte for byte: RFC 3339 in
//! UTC with `Z`, and fractional seconds only when there are any, in 3, 6 or 9 digits
//! (chrono's `SecondsFormat::AutoSi`); a leap second is written as second 60.

use chrono::{DateTime, Datelike, Timelike, Utc};

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` at its longest.
const LONGEST: usize = 30;

/// A time written as RFC 3339 text, held inline.
pub(crate) struct Rfc3339 {
    text: [u8; LONGEST],
    len: usize,
}

impl Rfc3339 {
    /// `time` as chrono writes it; `None` for years outside 0000–9999, which chrono writes
    /// with a sign (a record's time is within them, see [`super::EventRecord`]).
    pub(crate) fn of(time: &DateTime<Utc>) -> Option<Self> {
        let year = time.year();
        if !(0..=9999).contains(&year) {
            return None;
        }
        let (mut second, mut nano) = (time.second(), time.nanosecond());
        if nano >= 1_000_000_000 {
            second += 1;
            nano -= 1_000_000_000;
        }
        let mut out = Rfc3339 { text: [0; LONGEST], len: 0 };
        out.digits(year as u32, 4);
        out.push(b'-');
        out.digits(time.month(), 2);
        out.push(b'-');
        out.digits(time.day(), 2);
        out.push(b'T');
        out.digits(time.hour(), 2);
        out.push(b':');
        out.digits(time.minute(), 2);
        out.push(b':');
        out.digits(second, 2);
        if nano != 0 {
            out.push(b'.');
            if nano % 1_000_000 == 0 {
                out.digits(nano / 1_000_000, 3);
            } else if nano % 1_000 == 0 {
                out.digits(nano / 1_000, 6);
            } else {
                out.digits(nano, 9);
            }
        }
        out.push(b'Z');
        Some(out)
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII digits and punctuation are written.
        std::str::from_utf8(&self.text[..self.len]).expect("RFC 3339 text is ASCII")
    }

    fn push(&mut self, byte: u8) {
        self.text[self.len] = byte;
        self.len += 1;
    }

    /// `value` in exactly `width` decimal digits, zero-padded (it is below 10^width).
    fn digits(&mut self, mut value: u32, width: usize) {
        for slot in self.text[self.len..self.len + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.len += width;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::rng::Rng;
    use chrono::{NaiveDate, TimeZone};

    fn chrono_text(time: &DateTime<Utc>) -> String {
        serde_json::to_value(time).unwrap().as_str().unwrap().to_owned()
    }

    #[test]
    fn writes_what_chrono_writes() {
        let mut times = vec![
            Utc.timestamp_opt(0, 0).unwrap(),
            Utc.timestamp_opt(1_764_640_000, 0).unwrap(),
            DateTime::from_timestamp(253_402_300_799, 999_999_999).unwrap(), // 9999-12-31T23:59:59.999999999
            NaiveDate::from_ymd_opt(0, 1, 1).unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc(),
            // Leap seconds: chrono keeps them as a nanosecond past 10^9 at second 59.
            NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_000_000_000)
                .unwrap()
                .and_utc(),
            NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc(),
            NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_000_000_001)
                .unwrap()
                .and_utc(),
        ];
        // Every kind of fraction: none, milli, micro and nano precision, at random times.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..20_000 {
            let secs = (rng.next() % 253_402_300_800) as i64 - 62_167_219_200; // years 0000..=9999
            let nano = (rng.next() % 1_000_000_000) as u32;
            let nano = match i % 4 {
                0 => 0,
                1 => nano / 1_000_000 * 1_000_000,
                2 => nano / 1_000 * 1_000,
                _ => nano,
            };
            times.push(DateTime::from_timestamp(secs, nano).unwrap());
        }
        for time in &times {
            assert_eq!(Rfc3339::of(time).unwrap().as_str(), chrono_text(time), "{time:?}");
        }
    }

    #[test]
    fn years_chrono_writes_with_a_sign_are_left_to_chrono() {
        for year in [-1, 10_000] {
            let time = NaiveDate::from_ymd_opt(year, 6, 1).unwrap().and_hms_opt(12, 0, 0).unwrap().and_utc();
            assert!(Rfc3339::of(&time).is_none());
        }
    }
}
