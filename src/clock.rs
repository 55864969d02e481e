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

/// Now in Unix milliseconds from the kernel's coarse clock on Linux (a few
/// milliseconds behind at most, a few nanoseconds to read); elsewhere the system
/// clock. For what counts calendar days and months, not instants.
#[inline]
pub(crate) fn coarse_now_ms() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        let secs = u64::try_from(now.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
        secs.saturating_mul(1_000).saturating_add(nanos / 1_000_000)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    exact_now_ms()
}

/// Milliseconds since the Unix epoch; instants before it count as 0.
pub(crate) fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The instant `ms` Unix milliseconds name; past what the platform's `SystemTime`
/// holds (year 30828 on Windows; never on Unix), the last instant RFC 3339 writes.
pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    (UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .unwrap_or_else(|| UNIX_EPOCH + Duration::from_millis(LAST_RFC3339_MS))
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The last instant RFC 3339 and HTTP dates write, with their four-digit years:
/// `9999-12-31T23:59:59.999Z`.
pub(crate) const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

/// An HTTP date (`Tue, 01 Dec 2026 00:00:00 GMT`). Instants before 1970 count as
/// 1970 and instants past year 9999 as the last second of 9999: `httpdate` panics
/// on both.
pub(crate) fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(from_unix_ms(to_unix_ms(t).min(LAST_RFC3339_MS)))
}

/// An RFC 3339 timestamp in UTC: `2026-12-01T00:00:00Z`, with milliseconds when
/// the instant has them (`…00.250Z`). Instants before 1970 count as 1970, and
/// instants past year 9999 (a garbled record's, seconds read as milliseconds) as the
/// last instant of 9999: never a panic.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let ms = to_unix_ms(t).min(LAST_RFC3339_MS);
    let at = time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(ms);
    let (date, clock) = (at.date(), at.time());
    let (y, m, d) = (date.year(), u8::from(date.month()), date.day());
    let (h, min, s) = (clock.hour(), clock.minute(), clock.second());
    match ms % 1000 {
        0 => format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z"),
        millis => format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{millis:03}Z"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |ms| rfc3339(from_unix_ms(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        // Past what the format can write: the last instant it can, not a panic.
        assert_eq!(at(LAST_RFC3339_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(LAST_RFC3339_MS + 1), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(1_796_301_240_000 * 1000), "9999-12-31T23:59:59.999Z");
        assert_eq!(at(u64::MAX), "9999-12-31T23:59:59.999Z");
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
