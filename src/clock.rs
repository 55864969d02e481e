//! Wall-clock time as the store keeps it: Unix milliseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exactly now, in milliseconds since the Unix epoch: for validity windows.
pub(crate) fn exact_now_ms() -> u64 {
    to_unix_ms(SystemTime::now())
}

/// Now to the second, for last-use stamps. On Linux this reads the kernel's coarse
/// clock (a few nanoseconds, no system call); elsewhere the system clock.
#[inline]
pub(crate) fn now_secs() -> u32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let secs = {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        u64::try_from(now.tv_sec).unwrap_or(0)
    };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let secs = exact_now_ms() / 1000;
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Milliseconds since the Unix epoch; instants before it count as 0.
pub(crate) fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An RFC 3339 timestamp in UTC: `2026-12-01T00:00:00Z`, with milliseconds when
/// the instant has them (`…00.250Z`). Instants before 1970 count as 1970.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let ms = to_unix_ms(t);
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    match millis {
        0 => format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z"),
        _ => format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |ms| rfc3339(from_unix_ms(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(784_111_777_000), "1994-11-06T08:49:37Z");
        assert_eq!(at(951_782_400_250), "2000-02-29T00:00:00.250Z");
        assert_eq!(at(1_796_083_200_000), "2026-12-01T00:00:00Z");
    }

    #[test]
    fn coarse_seconds_agree_with_the_system_clock() {
        let exact = exact_now_ms() / 1000;
        let coarse = u64::from(now_secs());
        assert!(
            coarse + 1 >= exact && coarse <= exact + 1,
            "{coarse} vs {exact}"
        );
    }
}
