//! A coarse wall clock for the request path.
//!
//! Reading the system clock costs tens of nanoseconds; the request path only needs to
//! know "roughly now" (to stamp a key's last use, and to tell that a key is far from
//! the edges of its validity window). One background thread per process refreshes an
//! atomic every [`TICK`]; requests read the atomic. Near a window's edge the exact clock
//! is read instead, so keys still switch on and off at their instants.

use std::{
    sync::{
        Once,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// How often the coarse clock is refreshed.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// How far from a window edge the coarse clock is trusted, in milliseconds: well over a
/// tick, so that a ticker delayed by a busy machine cannot let a key through late.
pub(crate) const MARGIN_MS: u64 = 2_000;

/// Milliseconds since the Unix epoch as of the last tick; 0 until the ticker runs.
static NOW_MS: AtomicU64 = AtomicU64::new(0);
static START: Once = Once::new();

/// Starts the ticker thread once per process. Without it (if the thread cannot be
/// spawned) [`coarse_now_ms`] falls back to the exact clock.
pub(crate) fn start() {
    START.call_once(|| {
        NOW_MS.store(exact_now_ms(), Ordering::Relaxed);
        let spawned = thread::Builder::new()
            .name("tower-api-key-clock".into())
            .spawn(|| {
                loop {
                    thread::sleep(TICK);
                    NOW_MS.store(exact_now_ms(), Ordering::Relaxed);
                }
            });
        if spawned.is_err() {
            NOW_MS.store(0, Ordering::Relaxed);
        }
    });
}

/// Roughly now, in milliseconds since the Unix epoch (at most a tick or so behind).
#[inline]
pub(crate) fn coarse_now_ms() -> u64 {
    match NOW_MS.load(Ordering::Relaxed) {
        0 => exact_now_ms(),
        now => now,
    }
}

/// Exactly now, in milliseconds since the Unix epoch.
pub(crate) fn exact_now_ms() -> u64 {
    to_unix_ms(SystemTime::now())
}

/// Milliseconds since the Unix epoch; instants before it count as 0.
pub(crate) fn to_unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// An IMF-fixdate (RFC 9110 HTTP-date), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub(crate) fn http_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
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
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn http_dates() {
        assert_eq!(
            super::http_date(784_111_777),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(super::http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            super::http_date(1_796_083_200),
            "Tue, 01 Dec 2026 00:00:00 GMT"
        );
        assert_eq!(
            super::http_date(951_782_400),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }
}
