//! Wall-clock time as a UTC calendar date, for names and template helpers
//! (no time-zone database: the daemons work in UTC).

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Utc {
    pub year: i64,
    /// 1 to 12.
    pub month: u32,
    /// 1 to 31.
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 (Monday) to 6 (Sunday).
    pub weekday: u32,
    /// 1 to 366.
    pub day_of_year: u32,
}

impl Utc {
    /// `t` as a UTC date (times before 1970 read as 1970-01-01).
    pub fn of(t: SystemTime) -> Utc {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let days = (secs / 86_400) as i64;
        let tod = secs % 86_400;
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        const BEFORE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let day_of_year = BEFORE[(month - 1) as usize] + day + i64::from(leap && month > 2);
        Utc {
            year,
            month: month as u32,
            day: day as u32,
            hour: (tod / 3600) as u32,
            minute: (tod / 60 % 60) as u32,
            second: (tod % 60) as u32,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year: day_of_year as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_dates() {
        let at = |s: u64| Utc::of(UNIX_EPOCH + Duration::from_secs(s));
        let e = at(0);
        assert_eq!(
            (e.year, e.month, e.day, e.weekday, e.day_of_year),
            (1970, 1, 1, 3, 1)
        );
        // 2024-02-29T12:34:56Z, a Thursday, day 60 of a leap year.
        let l = at(1_709_210_096);
        assert_eq!(
            (l.year, l.month, l.day, l.hour, l.minute, l.second),
            (2024, 2, 29, 12, 34, 56)
        );
        assert_eq!((l.weekday, l.day_of_year), (3, 60));
        // 2026-11-30: a Monday, day 334.
        let n = at(1_795_996_800);
        assert_eq!(
            (n.year, n.month, n.day, n.weekday, n.day_of_year),
            (2026, 11, 30, 0, 334)
        );
    }
}
