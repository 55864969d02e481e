//! The generic cell rate algorithm: a rate limit in one number, the *theoretical
//! arrival time* (TAT) of the next request if requests came evenly.

use std::time::Duration;

/// A rate limit's schedule, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// The time each request takes of the window: `per / requests`, rounded up, so
    /// that the sustained rate never exceeds the limit.
    pub(crate) interval: u64,
    /// How far ahead of now the TAT may run: `requests × interval`, the burst.
    pub(crate) capacity: u64,
}

impl Gcra {
    /// The schedule of `requests` per `per` (checked before: `1 ≤ requests ≤ per`
    /// in nanoseconds, `per` at most a year).
    pub(crate) fn new(requests: u64, per: Duration) -> Self {
        let per = u64::try_from(per.as_nanos()).unwrap_or(u64::MAX / 4);
        let requests = requests.clamp(1, per.max(1));
        let interval = per.div_ceil(requests);
        Self {
            interval,
            capacity: interval.saturating_mul(requests),
        }
    }

    /// Decides a request at `now` against `tat`: the new TAT if it is let in, or
    /// how long until it would be.
    #[inline]
    pub(crate) fn decide(self, tat: u64, now: u64) -> Result<u64, u64> {
        let new = tat.max(now).saturating_add(self.interval);
        if new - now <= self.capacity {
            Ok(new)
        } else {
            Err(new - now - self.capacity)
        }
    }

    /// How many more requests would be let in at `now`, and how long until the
    /// whole burst is available again.
    pub(crate) fn status(self, tat: u64, now: u64) -> (u64, u64) {
        let ahead = tat.saturating_sub(now);
        (self.capacity.saturating_sub(ahead) / self.interval, ahead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        let g = Gcra::new(3, Duration::from_secs(3));
        assert_eq!(g.interval, 1_000_000_000);
        let now = 10_000_000_000;
        let mut tat = 0;
        for left in [2, 1, 0] {
            tat = g.decide(tat, now).unwrap();
            assert_eq!(g.status(tat, now).0, left);
        }
        assert_eq!(g.decide(tat, now), Err(1_000_000_000));
        assert_eq!(g.decide(tat, now + 999_999_999), Err(1));
        assert!(g.decide(tat, now + 1_000_000_000).is_ok());
        assert_eq!(g.status(tat, now), (0, 3_000_000_000));
    }

    #[test]
    fn uneven_windows_round_the_rate_down() {
        // 3 per second: each request takes 333,333,334 ns, so the sustained rate is
        // at most 3 a second, never a fraction more.
        let g = Gcra::new(3, Duration::from_secs(1));
        assert!(g.interval * 3 >= 1_000_000_000);
        let g = Gcra::new(1_000_000_000, Duration::from_secs(1));
        assert_eq!((g.interval, g.capacity), (1, 1_000_000_000));
    }
}
