//! Calendar periods in UTC, numbered so that a quota's count can say which one it is.

use std::{fmt, str::FromStr};

/// The calendar period a [`Quota`](super::Quota) counts over, in UTC: a day from
/// midnight, or a month from its first day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuotaPeriod {
    /// A calendar day (UTC): `per = "day"` in the key file.
    Day,
    /// A calendar month (UTC): `per = "month"` in the key file.
    Month,
}

const DAY_MS: u64 = 86_400_000;

impl QuotaPeriod {
    /// The name the key file and the admin API use: `day` or `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }

    /// The number of the period holding `unix_ms`: days or months since 1970.
    pub(crate) fn index(self, unix_ms: u64) -> u32 {
        let days = unix_ms / DAY_MS;
        let n = match self {
            Self::Day => days,
            Self::Month => {
                let (y, m) = year_month(days);
                (y - 1970) * 12 + (m - 1)
            }
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// When period `index` starts, in Unix milliseconds.
    pub(crate) fn start(self, index: u32) -> u64 {
        match self {
            Self::Day => u64::from(index) * DAY_MS,
            Self::Month => {
                let (y, m) = (1970 + u64::from(index) / 12, u64::from(index) % 12 + 1);
                days_from_civil(y, m) * DAY_MS
            }
        }
    }
}

impl fmt::Display for QuotaPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuotaPeriod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "day" => Ok(Self::Day),
            "month" => Ok(Self::Month),
            _ => Err("`quota`: `per` must be \"day\" or \"month\"".into()),
        }
    }
}

/// The year and month (1–12) of the day `days` since 1970-01-01 (Howard Hinnant's
/// civil-from-days, for dates from 1970 on).
fn year_month(days: u64) -> (u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m)
}

/// Days since 1970-01-01 of the first day of month `m` (1–12) of year `y` ≥ 1970.
fn days_from_civil(y: u64, m: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> u64 {
        let at =
            time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
                .unwrap();
        u64::try_from(at.unix_timestamp()).unwrap() * 1_000 + u64::from(at.millisecond())
    }

    #[test]
    fn periods_start_at_utc_midnight_and_on_the_first() {
        let at = ms("2026-12-02T21:46:36.5Z");
        let day = QuotaPeriod::Day.index(at);
        assert_eq!(QuotaPeriod::Day.start(day), ms("2026-12-02T00:00:00Z"));
        assert_eq!(QuotaPeriod::Day.start(day + 1), ms("2026-12-03T00:00:00Z"));
        let month = QuotaPeriod::Month.index(at);
        assert_eq!(QuotaPeriod::Month.start(month), ms("2026-12-01T00:00:00Z"));
        assert_eq!(
            QuotaPeriod::Month.start(month + 1),
            ms("2027-01-01T00:00:00Z")
        );
        let leap = QuotaPeriod::Month.index(ms("2028-02-29T23:59:59.999Z"));
        assert_eq!(
            QuotaPeriod::Month.start(leap + 1),
            ms("2028-03-01T00:00:00Z")
        );
        assert_eq!(
            QuotaPeriod::Month.index(ms("2028-03-01T00:00:00Z")),
            leap + 1
        );
        assert_eq!(QuotaPeriod::Month.index(0), 0);
    }

    #[test]
    fn every_month_of_four_centuries_round_trips() {
        for index in 0..(400 * 12) {
            let start = QuotaPeriod::Month.start(index);
            assert_eq!(QuotaPeriod::Month.index(start), index);
            if index > 0 {
                assert_eq!(QuotaPeriod::Month.index(start - 1), index - 1);
            }
        }
    }
}
