//! Calendar windows in an IANA time zone: where the current day, week, month or year starts
//! and ends, as Unix milliseconds. Pure arithmetic over jiff's bundled time zone database, so
//! every replica of the same binary computes the same bounds.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use super::limits::CalendarUnit;

/// Earliest batch time the engine accepts (the Unix epoch).
pub const MIN_TIME_MS: i64 = 0;
/// Latest batch time the engine accepts (5000-01-01: far inside jiff's range, so a year can
/// always be added to a window start).
pub const MAX_TIME_MS: i64 = 95_617_584_000_000;

/// The calendar window `[start_ms, end_ms)` containing `now_ms`.
///
/// `now_ms` must lie in `MIN_TIME_MS..=MAX_TIME_MS` (the engine clamps batch times to it), and
/// the anchors must have been validated (week start 1..=7, month day 1..=28, month 1..=12).
pub fn bounds(unit: CalendarUnit, tz: &TimeZone, now_ms: i64) -> (i64, i64) {
    let now_ms = now_ms.clamp(MIN_TIME_MS, MAX_TIME_MS);
    let ts = Timestamp::from_millisecond(now_ms).expect("clamped into jiff's range");
    let today = ts.to_zoned_datetime(tz.clone()).date();
    let (start, end) = match unit {
        CalendarUnit::Day => (today, today.tomorrow().expect("in range")),
        CalendarUnit::Week { start } => {
            let weekday = i64::from(today.weekday().to_monday_one_offset());
            let back = (weekday - i64::from(start)).rem_euclid(7);
            let first = today.checked_sub(back.days()).expect("in range");
            (first, first.checked_add(7.days()).expect("in range"))
        }
        CalendarUnit::Month { day } => {
            let this = today.with().day(day as i8).build().expect("day 1..=28");
            let first = if today >= this {
                this
            } else {
                this.checked_sub(1.month()).expect("in range")
            };
            (first, first.checked_add(1.month()).expect("in range"))
        }
        CalendarUnit::Year { month, day } => {
            let this = Date::new(today.year(), month as i8, day as i8).expect("validated anchor");
            let first = if today >= this {
                this
            } else {
                this.checked_sub(1.year()).expect("in range")
            };
            (first, first.checked_add(1.year()).expect("in range"))
        }
    };
    (start_ms(start, tz), start_ms(end, tz))
}

/// The first instant of `date` in `tz` (after a gap at midnight, the first instant that exists).
fn start_ms(date: Date, tz: &TimeZone) -> i64 {
    date.to_zoned_datetime(tz.clone())
        .expect("dates in range resolve in every zone")
        .timestamp()
        .as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn new_york_days_around_dst_are_23_and_25_hours() {
        let tz = TimeZone::get("America/New_York").unwrap();
        // 2026-03-08: clocks jump from 02:00 to 03:00 EST->EDT.
        let (s, e) = bounds(CalendarUnit::Day, &tz, ms("2026-03-08T12:00:00Z"));
        assert_eq!(s, ms("2026-03-08T05:00:00Z"));
        assert_eq!(e, ms("2026-03-09T04:00:00Z"));
        assert_eq!(e - s, 23 * 3_600_000);
        // 2026-11-01: clocks fall back from 02:00 EDT to 01:00 EST.
        let (s, e) = bounds(CalendarUnit::Day, &tz, ms("2026-11-01T12:00:00Z"));
        assert_eq!(s, ms("2026-11-01T04:00:00Z"));
        assert_eq!(e - s, 25 * 3_600_000);
    }

    #[test]
    fn weeks_months_and_years_follow_their_anchors() {
        let utc = TimeZone::UTC;
        // 2026-11-23 is a Monday.
        let now = ms("2026-11-25T10:00:00Z");
        assert_eq!(
            bounds(CalendarUnit::Week { start: 1 }, &utc, now),
            (ms("2026-11-23T00:00:00Z"), ms("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Week { start: 7 }, &utc, now),
            (ms("2026-11-22T00:00:00Z"), ms("2026-11-29T00:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Month { day: 28 }, &utc, now),
            (ms("2026-10-28T00:00:00Z"), ms("2026-11-28T00:00:00Z"))
        );
        assert_eq!(
            bounds(CalendarUnit::Year { month: 4, day: 6 }, &utc, now),
            (ms("2026-04-06T00:00:00Z"), ms("2027-04-06T00:00:00Z"))
        );
    }

    #[test]
    fn extreme_times_do_not_panic() {
        let tz = TimeZone::get("Pacific/Kiritimati").unwrap();
        for now in [i64::MIN, -1, 0, MAX_TIME_MS, i64::MAX] {
            for unit in [
                CalendarUnit::Day,
                CalendarUnit::Week { start: 3 },
                CalendarUnit::Month { day: 28 },
                CalendarUnit::Year { month: 12, day: 28 },
            ] {
                let (s, e) = bounds(unit, &tz, now);
                assert!(s < e);
            }
        }
    }
}
