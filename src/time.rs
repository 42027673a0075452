//! Wall-clock time as the proxy writes it: Unix times turned into UTC
//! calendar dates, for log timestamps ([`crate::logging`]) and certificate
//! validity dates ([`crate::tls`]). One calendar algorithm for both, and no
//! date crate for two formatting needs.

use std::time::{SystemTime, UNIX_EPOCH};

/// Howard Hinnant's `civil_from_days`: the (year, month, day) of the day
/// `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The current time as a Unix time (0 if the clock is before 1970).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0)
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_unix_time(time: i64) -> String {
    format!("{} UTC", date_time(time, ' '))
}

/// The UTC date and time of `unix_seconds` as `YYYY-MM-DD`, `separator`,
/// `HH:MM:SS` (proleptic Gregorian calendar, before 1970 too).
pub(crate) fn date_time(unix_seconds: i64, separator: char) -> String {
    let (year, month, day) = civil_from_days(unix_seconds.div_euclid(86_400));
    let seconds = unix_seconds.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}{separator}{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_leap(year: i64) -> bool {
        year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
    }

    fn days_in_month(year: i64, month: i64) -> i64 {
        match month {
            2 if is_leap(year) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        // rcgen's default Not After.
        assert_eq!(civil_from_days(776_506), (4096, 1, 1));
    }

    #[test]
    fn every_day_follows_the_one_before() {
        // From 1600 to 2400: each day is the calendar's next date.
        let first = -135_140;
        assert_eq!(civil_from_days(first), (1600, 1, 1));
        let mut previous = civil_from_days(first);
        for days in first + 1..=157_054 {
            let (year, month, day) = previous;
            let expected = if day < days_in_month(year, month) {
                (year, month, day + 1)
            } else if month < 12 {
                (year, month + 1, 1)
            } else {
                (year + 1, 1, 1)
            };
            let current = civil_from_days(days);
            assert_eq!(current, expected, "day {days}");
            previous = current;
        }
        assert_eq!(previous, (2400, 1, 1));
    }

    #[test]
    fn times_of_day_and_negative_times() {
        assert_eq!(date_time(-1, ' '), "1969-12-31 23:59:59");
        assert_eq!(date_time(1_709_210_096, 'T'), "2024-02-29T12:34:56");
    }

    #[test]
    fn unix_times_format_as_utc() {
        assert_eq!(format_unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_time(951_825_600), "2000-02-29 12:00:00 UTC");
        assert_eq!(format_unix_time(1_767_225_599), "2025-12-31 23:59:59 UTC");
    }
}
