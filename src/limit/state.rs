//! A key's limiter: the state of its limits, shared by every version of the key set
//! that keeps the key with the same limits.
//!
//! A key with one counting limit (a rate limit or a quota) decides with one
//! compare-and-swap loop on one word. A key with several takes a lock of its own,
//! held for a few comparisons: they must be decided together, since a request
//! refused by one is counted by none, and no lock-free scheme over several words
//! decides that exactly.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use super::{IpNet, Limits, gcra::Gcra};

/// What a limit is: a rate limit or the quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitKind {
    /// A named rate limit.
    Rate,
    /// The calendar quota (named `quota`).
    Quota,
}

/// Where one of a key's limits stands: what [`KeyInfo::limits`](crate::KeyInfo::limits)
/// and the admin API show, and what the `RateLimit` header fields say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitStatus {
    pub(crate) kind: LimitKind,
    pub(crate) name: Arc<str>,
    pub(crate) limit: u64,
    pub(crate) window: Duration,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

impl LimitStatus {
    /// A rate limit or the quota.
    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    /// The limit's name (`quota` for the quota).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many requests it lets in per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The window: a rate limit's `per`, or the length of the current quota period.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How many more requests it would let in now.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// How many requests of this window were let in (`limit − remaining`): for the
    /// quota, the count of the period.
    pub fn used(&self) -> u64 {
        self.limit.saturating_sub(self.remaining)
    }

    /// How long until the whole allowance is back: a rate limit refilled, or the
    /// next quota period.
    pub fn reset(&self) -> Duration {
        self.reset
    }
}

/// Why a limiter refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Rate limit `name`: the next request is let in after `wait`.
    Rate { name: Arc<str>, wait: Duration },
    /// The quota: the next period starts at `next` (Unix ms).
    Quota { next: u64 },
}

/// The quota's word: the period's number + 1 (0: never counted) in the high 24
/// bits, the count in the low 40.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// How long a request refused for a spent share of a fleet's limit is told to wait
/// (at most), when the fleet has not used the limit up: about the time the next
/// share takes.
const SHARE_WAIT_MS: u64 = 1_000;

/// One rate limit's TAT, on a cache line of its own: two limited keys served by two
/// cores never bounce one line.
#[derive(Default)]
#[repr(align(64))]
struct Cell(AtomicU64);

/// The state of one key's limits.
pub(crate) struct Limiter {
    pub(crate) limits: Limits,
    gcras: Box<[Gcra]>,
    tats: Box<[Cell]>,
    quota: Cell,
    /// Held while deciding, for a key with more than one counting limit.
    lock: Option<Mutex<()>>,
    /// Requests refused by these limits (address rules included).
    refused: AtomicU64,
    /// The layer's cache of the `RateLimit-Policy` field (see [`Limiter::policy_field`]).
    policy: OnceLock<Option<http::HeaderValue>>,
    /// For a key of a fleet source: this replica's shares of the fleet-wide limits.
    shares: Option<Box<Shares>>,
}

/// A key's shares of its fleet-wide limits, for a key of a source whose replicas share
/// them (see [`KeySource::fleet_limits`](crate::KeySource::fleet_limits)): one per
/// counting limit (the rate limits in order, then the quota), leased in the
/// background by the source. A request is let in only if every share has a token
/// left (and the local limits agree); a share that is never renewed runs out.
pub(crate) struct Shares {
    /// Tokens this replica may still spend, per counting limit; starts at none.
    pub(crate) left: Box<[AtomicI64]>,
    /// Tokens spent since the lessor last looked: the demand it sizes shares by.
    pub(crate) taken: Box<[AtomicU64]>,
    /// Requests refused since the lessor last looked because this share had no
    /// token left: demand too, which is how a share given back, or never leased,
    /// is asked for again.
    pub(crate) missed: Box<[AtomicU64]>,
    /// The quota period (+ 1; 0: none) the fleet is known to have used up: Redis
    /// granted none of what the lessor asked.
    used_up: AtomicU32,
    /// Per rate limit: the fleet's bucket is known to be empty (Redis granted none
    /// of what the lessor last asked).
    drained: Box<[AtomicBool]>,
}

impl Shares {
    fn new(n: usize) -> Self {
        Self {
            left: (0..n).map(|_| AtomicI64::new(0)).collect(),
            taken: (0..n).map(|_| AtomicU64::new(0)).collect(),
            missed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            used_up: AtomicU32::new(0),
            drained: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Says whether the fleet's bucket of rate limit `i` is empty, as the lessor
    /// learned it from a lease.
    #[cfg_attr(not(any(feature = "redis", test)), allow(dead_code))]
    pub(crate) fn rate_drained(&self, i: usize, drained: bool) {
        if let Some(flag) = self.drained.get(i) {
            flag.store(drained, Ordering::Release);
        }
    }

    /// Whether the fleet's bucket of rate limit `i` is known to be empty.
    fn is_drained(&self, i: usize) -> bool {
        self.drained
            .get(i)
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// Says whether the fleet has used quota period `period` up, as the lessor
    /// learned it from a lease.
    #[cfg_attr(not(any(feature = "redis", test)), allow(dead_code))]
    pub(crate) fn quota_used_up(&self, period: u32, used_up: bool) {
        let mark = if used_up { period.saturating_add(1) } else { 0 };
        self.used_up.store(mark, Ordering::Release);
    }

    /// Whether the fleet is known to have used quota period `period` up.
    fn is_used_up(&self, period: u32) -> bool {
        self.used_up.load(Ordering::Acquire) == period.saturating_add(1)
    }

    /// Takes a token from each share, or from none: the index of the first share
    /// that has none left.
    #[inline]
    fn take(&self) -> Result<(), usize> {
        for (i, left) in self.left.iter().enumerate() {
            if left.fetch_sub(1, Ordering::AcqRel) <= 0 {
                for undo in &self.left[..=i] {
                    undo.fetch_add(1, Ordering::AcqRel);
                }
                return Err(i);
            }
        }
        Ok(())
    }

    /// Gives back the tokens of a request the local limits refused.
    fn give_back(&self) {
        for left in &*self.left {
            left.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Nanoseconds on the monotonic clock: on Linux, since boot, read straight from the
/// kernel's clock (the vDSO, no system call) without `Instant`'s arithmetic, which
/// costs more than the rest of a decision; elsewhere since the first limiter looked.
#[inline]
pub(crate) fn now_ns() -> u64 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let secs = u64::try_from(now.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        use std::time::Instant;
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let epoch = *EPOCH.get_or_init(Instant::now);
        u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Limiter {
    /// Fresh state for `limits`; with `fleet`, with empty shares of the fleet-wide
    /// limits, which refuse until the source leases tokens.
    pub(crate) fn new(limits: &Limits, fleet: bool) -> Self {
        let counting = limits.rates.len().min(16) + usize::from(limits.quota.is_some());
        Self {
            limits: limits.clone(),
            // At most 16 (checked with the key): `admit_all` decides them on the stack.
            gcras: (limits.rates.iter().take(16))
                .map(|r| Gcra::new(r.requests, r.per))
                .collect(),
            tats: limits
                .rates
                .iter()
                .take(16)
                .map(|_| Cell::default())
                .collect(),
            quota: Cell::default(),
            lock: (counting > 1).then(Mutex::default),
            refused: AtomicU64::new(0),
            policy: OnceLock::new(),
            shares: (fleet && counting > 0).then(|| Box::new(Shares::new(counting))),
        }
    }

    /// State for `limits`, the key's new limits, carried from `old`, its limiter
    /// until now (at `now`, from [`now_ns`]): what a request let in counted stays
    /// counted when another limit, or the address rules, change.
    ///
    /// - a rate limit of the same name and schedule keeps its state as it is; one of
    ///   the same name with another `requests` or `per` keeps the requests it counted
    ///   (at most a whole burst of the new schedule), so that raising a limit does not
    ///   hand out a fresh burst and lowering one takes effect at once; a new or
    ///   renamed limit starts afresh;
    /// - the quota keeps this period's count while its period (day or month) stays;
    /// - the count of refusals is kept.
    ///
    /// A request decided by `old` after the copy is not carried: the swap of a key
    /// set is a moment, not a window.
    pub(crate) fn carried(old: &Self, limits: &Limits, now: u64, fleet: bool) -> Self {
        let new = Self::new(limits, fleet);
        for ((rate, gcra), tat) in limits.rates.iter().zip(&*new.gcras).zip(&*new.tats) {
            let Some(i) = old.limits.rates.iter().position(|r| r.name == rate.name) else {
                continue;
            };
            let (before, was) = (old.gcras[i], old.tats[i].0.load(Ordering::Acquire));
            let carried = if before == *gcra {
                was
            } else {
                let counted = was.saturating_sub(now).div_ceil(before.interval);
                now.saturating_add(counted.saturating_mul(gcra.interval).min(gcra.capacity))
            };
            tat.0.store(carried, Ordering::Release);
        }
        if let (Some(quota), Some(before)) = (&limits.quota, &old.limits.quota)
            && quota.period == before.period
        {
            new.quota
                .0
                .store(old.quota.0.load(Ordering::Acquire), Ordering::Release);
        }
        new.refused.store(old.refused(), Ordering::Relaxed);
        new
    }

    /// This replica's shares of the fleet-wide limits, for a key of a fleet source.
    #[cfg_attr(not(any(feature = "redis", test)), allow(dead_code))]
    pub(crate) fn shares(&self) -> Option<&Shares> {
        self.shares.as_deref()
    }

    /// Whether `client` may use the key: always without `allowed_ips`, never with
    /// them and no known address.
    #[inline]
    pub(crate) fn allows(
        &self,
        client: impl FnOnce() -> Option<IpAddr>,
    ) -> Result<(), Option<IpAddr>> {
        let Some(nets) = &self.limits.allowed_ips else {
            return Ok(());
        };
        match client() {
            Some(addr) if IpNet::any_contains(nets, addr) => Ok(()),
            other => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(other)
            }
        }
    }

    /// Decides one request at `now` (from [`now_ns`]) and `unix_ms` (the wall
    /// clock, read only for a quota): counted by every limit, or by none.
    #[inline]
    pub(crate) fn admit(&self, now: u64, unix_ms: impl Fn() -> u64) -> Result<(), Refusal> {
        let Some(shares) = &self.shares else {
            return self.admit_here(now, unix_ms);
        };
        if let Err(i) = shares.take() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(missed) = shares.missed.get(i) {
                missed.fetch_add(1, Ordering::Relaxed);
            }
            return Err(match self.gcras.get(i) {
                // The fleet's bucket empty: about one request's interval, as one
                // replica's limiter would say. Otherwise the next share is on its
                // way: at most a moment (a limit of 10 an hour waits no 6 minutes
                // for a share not yet leased).
                Some(gcra) if shares.is_drained(i) => self.rate_refusal(i, gcra.interval),
                Some(gcra) => self.rate_refusal(i, gcra.interval.min(SHARE_WAIT_MS * 1_000_000)),
                // The quota's share is spent. Used up fleet-wide: until the next
                // period. Otherwise the next share is on its way: a moment.
                None => Refusal::Quota {
                    next: self.limits.quota.map_or(0, |q| {
                        let at = unix_ms();
                        let period = q.period.index(at);
                        if shares.is_used_up(period) {
                            q.period.start(period.saturating_add(1))
                        } else {
                            at.saturating_add(SHARE_WAIT_MS)
                        }
                    }),
                },
            });
        }
        let result = self.admit_here(now, unix_ms);
        match result {
            Ok(()) => {
                for taken in &*shares.taken {
                    taken.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => shares.give_back(),
        }
        result
    }

    /// Decides one request by this replica's own state of the limits.
    #[inline]
    fn admit_here(&self, now: u64, unix_ms: impl Fn() -> u64) -> Result<(), Refusal> {
        let result = match (&self.lock, &*self.gcras, &self.limits.quota) {
            (None, [], None) => Ok(()),
            (None, [gcra], None) => update(&self.tats[0].0, |tat| gcra.decide(tat, now))
                .map_err(|wait| self.rate_refusal(0, wait)),
            (None, [], Some(quota)) => {
                let at = unix_ms();
                let period = quota.period.index(at);
                update(&self.quota.0, |word| {
                    quota_decide(word, period, quota.requests)
                })
                .map_err(|()| Refusal::Quota {
                    next: quota.period.start(period.saturating_add(1)),
                })
            }
            (lock, _, _) => {
                let _held = lock
                    .as_ref()
                    .map(|l| l.lock().unwrap_or_else(PoisonError::into_inner));
                self.admit_all(now, unix_ms)
            }
        };
        if result.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Decides every limit, then counts in all of them or none: under the lock.
    fn admit_all(&self, now: u64, unix_ms: impl Fn() -> u64) -> Result<(), Refusal> {
        let mut new = [0u64; 16];
        let mut refusal: Option<Refusal> = None;
        let mut longest = 0;
        for (i, (gcra, tat)) in self.gcras.iter().zip(&*self.tats).enumerate() {
            match gcra.decide(tat.0.load(Ordering::Acquire), now) {
                Ok(next) => new[i] = next,
                Err(wait) if refusal.is_none() || wait > longest => {
                    longest = wait;
                    refusal = Some(self.rate_refusal(i, wait));
                }
                Err(_) => {}
            }
        }
        let mut quota_word = None;
        if let Some(quota) = &self.limits.quota {
            let at = unix_ms();
            let period = quota.period.index(at);
            match quota_decide(self.quota.0.load(Ordering::Acquire), period, quota.requests) {
                Ok(word) => quota_word = Some(word),
                Err(()) => {
                    let next = quota.period.start(period.saturating_add(1));
                    // The quota's wait is the longest unless a rate limit's is longer.
                    let wait = next.saturating_sub(at).saturating_mul(1_000_000);
                    if refusal.is_none() || wait >= longest {
                        refusal = Some(Refusal::Quota { next });
                    }
                }
            }
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        for (tat, next) in self.tats.iter().zip(new) {
            tat.0.store(next, Ordering::Release);
        }
        if let Some(word) = quota_word {
            self.quota.0.store(word, Ordering::Release);
        }
        Ok(())
    }

    fn rate_refusal(&self, i: usize, wait: u64) -> Refusal {
        Refusal::Rate {
            name: self.limits.rates[i].name.clone(),
            wait: Duration::from_nanos(wait),
        }
    }

    /// Where each limit stands at `now` and `unix_ms`: rate limits in order, then the
    /// quota.
    pub(crate) fn status(&self, now: u64, unix_ms: u64) -> Vec<LimitStatus> {
        let mut all = Vec::with_capacity(self.gcras.len() + 1);
        for ((rate, gcra), tat) in self.limits.rates.iter().zip(&*self.gcras).zip(&*self.tats) {
            let (remaining, ahead) = gcra.status(tat.0.load(Ordering::Acquire), now);
            all.push(LimitStatus {
                kind: LimitKind::Rate,
                name: rate.name.clone(),
                limit: rate.requests,
                window: rate.per,
                remaining: remaining.min(rate.requests),
                reset: Duration::from_nanos(ahead),
            });
        }
        all.extend(self.quota_status(unix_ms));
        all
    }

    /// Each rate limit's remaining requests and nanoseconds until its whole burst is
    /// back, in order, without allocating: what an allowed response's `RateLimit`
    /// field says.
    pub(crate) fn rate_states(&self, now: u64) -> impl Iterator<Item = (&str, u64, u64)> {
        (self.limits.rates.iter().zip(&*self.gcras).zip(&*self.tats)).map(
            move |((rate, gcra), tat)| {
                let (remaining, ahead) = gcra.status(tat.0.load(Ordering::Acquire), now);
                (&*rate.name, remaining.min(rate.requests), ahead)
            },
        )
    }

    /// The quota's status at `unix_ms`, if the key has one.
    pub(crate) fn quota_status(&self, unix_ms: u64) -> Option<LimitStatus> {
        let quota = self.limits.quota.as_ref()?;
        {
            let period = quota.period.index(unix_ms);
            // As `quota_decide` reads it: the status never contradicts the decision.
            let used = quota_used(self.quota.0.load(Ordering::Acquire), period);
            let (start, next) = (
                quota.period.start(period),
                quota.period.start(period.saturating_add(1)),
            );
            static QUOTA: OnceLock<Arc<str>> = OnceLock::new();
            Some(LimitStatus {
                kind: LimitKind::Quota,
                name: QUOTA.get_or_init(|| Arc::from("quota")).clone(),
                limit: quota.requests,
                window: Duration::from_millis(next - start),
                remaining: quota.requests.saturating_sub(used),
                reset: Duration::from_millis(next.saturating_sub(unix_ms)),
            })
        }
    }

    /// The `RateLimit-Policy` field of a key with rate limits and no quota, which
    /// never changes: made once, by the layer, and cloned (a reference count) for
    /// each response. A quota's window is the month's length: not cached.
    pub(crate) fn policy_field(
        &self,
        make: impl FnOnce() -> Option<http::HeaderValue>,
    ) -> Option<http::HeaderValue> {
        if self.limits.quota.is_some() {
            return make();
        }
        self.policy.get_or_init(make).clone()
    }

    /// Requests these limits refused.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The count of period `period` that the quota's `word` holds.
///
/// The invariant: a count is never lowered by the wall clock going back. A word of
/// an earlier period (or never counted) holds none of this one; a word of a *later*
/// period than the clock's (the clock went back, or it had jumped ahead and was set
/// right) holds its count for this period too, carried back rather than refused
/// outright. So a clock set back never grants a fresh quota, and a clock that
/// jumped ahead and was corrected costs at most the rest of the current period,
/// never a lock-out until the period it had jumped to. The count starts afresh only
/// when the clock enters a period after the word's.
#[inline]
fn quota_used(word: u64, period: u32) -> u64 {
    // The word's tag is its period + 1: this period's, or a later one's.
    if word >> COUNT_BITS > u64::from(period) {
        word & COUNT_MASK
    } else {
        0
    }
}

/// The quota's new word if one more request fits in period `period`: stamped with
/// `period`, counting what [`quota_used`] reads in it and this request.
#[inline]
fn quota_decide(word: u64, period: u32, requests: u64) -> Result<u64, ()> {
    let used = quota_used(word, period);
    if used >= requests {
        return Err(());
    }
    Ok(((u64::from(period) + 1) << COUNT_BITS) | (used + 1))
}

/// Compare-and-swap `cell` to `decide`'s answer until it sticks or `decide` refuses.
#[inline]
fn update<E>(cell: &AtomicU64, decide: impl Fn(u64) -> Result<u64, E>) -> Result<(), E> {
    let mut current = cell.load(Ordering::Acquire);
    loop {
        let next = decide(current)?;
        match cell.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(now) => current = now,
        }
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.limits)
            .field("refused", &self.refused())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;
    use crate::limit::{Quota, QuotaPeriod, RateLimit};

    const SEC: u64 = 1_000_000_000;
    const DAY_MS: u64 = 86_400_000;

    fn limiter(rates: &[(&str, u64, u64)], quota: Option<u64>) -> Limiter {
        Limiter::new(
            &Limits {
                rates: rates
                    .iter()
                    .map(|&(n, r, s)| RateLimit::new(n, r, Duration::from_secs(s)))
                    .collect(),
                quota: quota.map(|q| Quota::new(q, QuotaPeriod::Day)),
                allowed_ips: None,
            },
            false,
        )
    }

    /// `threads` threads try `tries` requests each at the same instant: how many got in.
    fn hammer(l: &Arc<Limiter>, threads: usize, tries: usize, now: u64, unix_ms: u64) -> u64 {
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (l, barrier) = (l.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..tries)
                        .filter(|_| l.admit(now, || unix_ms).is_ok())
                        .count() as u64
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    }

    #[test]
    fn many_threads_at_the_boundary_get_exactly_the_burst() {
        for (rates, quota, want) in [
            (&[("burst", 1_000, 1)][..], None, 1_000),
            (&[][..], Some(777), 777),
            (
                &[("burst", 500, 1), ("daily", 100_000, 86_400)][..],
                None,
                500,
            ),
            (&[("burst", 500, 1)][..], Some(321), 321),
        ] {
            let l = Arc::new(limiter(rates, quota));
            let got = hammer(&l, 8, 400, 5 * SEC, 40 * DAY_MS);
            assert_eq!(got, want, "{rates:?} {quota:?}");
            // Then exactly one more each time a request's interval has passed.
            if let [(_, requests, secs)] = rates
                && quota.is_none()
            {
                let interval = secs * SEC / requests;
                assert_eq!(hammer(&l, 4, 50, 5 * SEC + interval, 40 * DAY_MS), 1);
            }
        }
    }

    #[test]
    fn a_request_refused_by_one_limit_is_counted_by_none() {
        let l = Arc::new(limiter(
            &[("burst", 500, 1), ("daily", 100_000, 86_400)],
            Some(321),
        ));
        assert_eq!(hammer(&l, 8, 100, 5 * SEC, 40 * DAY_MS), 321);
        let status = l.status(5 * SEC, 40 * DAY_MS);
        let used: Vec<u64> = status.iter().map(LimitStatus::used).collect();
        assert_eq!(used, [321, 321, 321], "{status:?}");
        assert_eq!(l.refused(), 800 - 321);
        // The next day the quota is back, the rate limits are not.
        let next_day = 41 * DAY_MS;
        assert_eq!(hammer(&l, 8, 100, 5 * SEC, next_day), 500 - 321);
        match l.admit(5 * SEC, || next_day) {
            Err(Refusal::Rate { name, wait }) => {
                assert_eq!(&*name, "burst");
                assert_eq!(wait, Duration::from_millis(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_quota_refusal_names_the_next_period() {
        let l = limiter(&[], Some(2));
        let at = 40 * DAY_MS + 5;
        assert!(l.admit(0, || at).is_ok() && l.admit(0, || at).is_ok());
        assert_eq!(l.admit(0, || at), Err(Refusal::Quota { next: 41 * DAY_MS }));
        assert_eq!(
            l.status(0, at)[0].reset(),
            Duration::from_millis(DAY_MS - 5)
        );
        assert!(l.admit(0, || 41 * DAY_MS).is_ok());
        assert!(l.admit(0, || 41 * DAY_MS).is_ok());
        // A clock set back a day does not give the day's requests again.
        assert!(l.admit(0, || at).is_err());
    }

    /// What the status says of the quota at `unix_ms`: (used, remaining).
    fn quota_seen(l: &Limiter, unix_ms: u64) -> (u64, u64) {
        let status = l.quota_status(unix_ms).unwrap();
        (status.used(), status.remaining())
    }

    /// Admits at `unix_ms` until refused: how many were let in, and the refusal.
    fn spend(l: &Limiter, unix_ms: u64) -> (u64, Refusal) {
        let mut admitted = 0;
        loop {
            match l.admit(5 * SEC, || unix_ms) {
                Ok(()) => admitted += 1,
                Err(refusal) => return (admitted, refusal),
            }
            assert!(admitted <= 1_000, "never refused");
        }
    }

    /// Both deciders: the quota alone (one word) and with a rate limit (the lock).
    fn quota_limiters(requests: u64) -> [Limiter; 2] {
        [
            limiter(&[], Some(requests)),
            limiter(&[("burst", 1_000, 1)], Some(requests)),
        ]
    }

    #[test]
    fn a_clock_set_back_carries_the_count_and_grants_no_fresh_quota() {
        let (day40, day41, day42) = (40 * DAY_MS + 7, 41 * DAY_MS + 7, 42 * DAY_MS + 7);
        for l in quota_limiters(3) {
            // One of three spent on day 41; the clock goes back to day 40: the two
            // left, not a fresh three, and the status says so.
            assert!(l.admit(5 * SEC, || day41).is_ok());
            assert_eq!(quota_seen(&l, day40), (1, 2));
            let (admitted, refusal) = spend(&l, day40);
            assert_eq!(admitted, 2, "{l:?}");
            assert_eq!(refusal, Refusal::Quota { next: 41 * DAY_MS });
            assert_eq!(quota_seen(&l, day40), (3, 0));
            // Set back further still: nothing more.
            assert_eq!(spend(&l, 7), (0, Refusal::Quota { next: DAY_MS }));
            assert_eq!(quota_seen(&l, 7), (3, 0));
            // The clock's next period starts afresh.
            assert_eq!(spend(&l, day42).0, 3);
        }
    }

    #[test]
    fn a_clock_that_jumped_ahead_and_was_set_right_locks_the_quota_out_no_longer_than_its_period() {
        let (day40, day41) = (40 * DAY_MS + 7, 41 * DAY_MS + 7);
        let ahead = 440 * DAY_MS + 7;
        for l in quota_limiters(3) {
            assert!(l.admit(5 * SEC, || day40).is_ok());
            // A bad clock before NTP: 400 days ahead, one request counted there.
            assert!(l.admit(5 * SEC, || ahead).is_ok());
            // Set right: the count goes on in the real period (one more than the
            // clock's jump forgot, never a lock-out until day 440), and the status,
            // the `RateLimit` header's source, agrees with the decisions.
            assert_eq!(quota_seen(&l, day40), (1, 2));
            let (admitted, refusal) = spend(&l, day40);
            assert_eq!(admitted, 2, "{l:?}");
            assert_eq!(refusal, Refusal::Quota { next: 41 * DAY_MS });
            assert_eq!(quota_seen(&l, day40), (3, 0));
            // The real next day: the whole quota.
            assert_eq!(quota_seen(&l, day41), (0, 3));
            assert_eq!(spend(&l, day41).0, 3);
        }
    }

    /// A seeded xorshift: the same seed, the same run.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn over_any_interval_admitted_stays_within_the_bound() {
        // GCRA's contract: over [a, b], at most requests + (b - a) / interval.
        let seed = std::env::var("LIMIT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_u64);
        let mut next = rng(seed);
        for _ in 0..8 {
            let requests = 1 + next() % 20;
            let secs = 1 + next() % 5;
            let l = Arc::new(limiter(&[("r", requests, secs)], None));
            let gcra = Gcra::new(requests, Duration::from_secs(secs));
            // Four threads admit, each moving the shared clock forward at random
            // now and then: a thread may decide with a time another has passed.
            let clock = Arc::new(AtomicU64::new(SEC));
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let (l, clock) = (l.clone(), clock.clone());
                    let mut next = rng(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    std::thread::spawn(move || {
                        let mut admitted = Vec::new();
                        for _ in 0..3_000 {
                            if next().is_multiple_of(4) {
                                clock.fetch_add(next() % (gcra.interval / 2 + 1), Ordering::AcqRel);
                            }
                            let now = clock.load(Ordering::Acquire);
                            if l.admit(now, || 0).is_ok() {
                                admitted.push(now);
                            }
                        }
                        admitted
                    })
                })
                .collect();
            let mut times: Vec<u64> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            times.sort_unstable();
            for i in 0..times.len() {
                for j in i..times.len().min(i + 200) {
                    let allowed = requests + (times[j] - times[i]) / gcra.interval;
                    assert!(
                        (j - i + 1) as u64 <= allowed,
                        "{} admitted in {} ns, limit {requests}/{secs}s: replay with LIMIT_SEED={seed} cargo test --lib limit::state",
                        j - i + 1,
                        times[j] - times[i]
                    );
                }
            }
        }
    }

    #[test]
    fn allowed_ips_refuse_an_unknown_address() {
        let l = Limiter::new(
            &Limits {
                allowed_ips: Some(Box::new(["203.0.113.0/24".parse().unwrap()])),
                ..Limits::default()
            },
            false,
        );
        assert!(l.allows(|| Some("203.0.113.9".parse().unwrap())).is_ok());
        assert!(
            l.allows(|| Some("::ffff:203.0.113.9".parse().unwrap()))
                .is_ok()
        );
        assert!(l.allows(|| Some("198.51.100.1".parse().unwrap())).is_err());
        assert_eq!(l.allows(|| None), Err(None));
        assert_eq!(l.refused(), 2);
    }

    #[test]
    fn a_spent_rate_share_waits_a_moment_unless_the_fleet_bucket_is_empty() {
        let limits = Limits {
            rates: vec![RateLimit::new("hourly", 10, Duration::from_secs(3_600))].into(),
            quota: None,
            allowed_ips: None,
        };
        let l = Limiter::new(&limits, true);
        let wait = |l: &Limiter| match l.admit(SEC, || 0) {
            Err(Refusal::Rate { wait, .. }) => wait,
            other => panic!("{other:?}"),
        };
        // Not leased yet: a second, not the six minutes of one request's interval.
        assert_eq!(wait(&l), Duration::from_secs(1));
        // Redis said the fleet's bucket is empty: the interval, as one replica says.
        l.shares().unwrap().rate_drained(0, true);
        assert_eq!(wait(&l), Duration::from_secs(360));
        l.shares().unwrap().rate_drained(0, false);
        assert_eq!(wait(&l), Duration::from_secs(1));
    }

    #[test]
    fn a_fleet_key_spends_its_shares_and_no_more() {
        let limits = Limits {
            rates: vec![RateLimit::new("burst", 1_000, Duration::from_secs(1))].into(),
            quota: Some(Quota::new(1_000, QuotaPeriod::Day)),
            allowed_ips: None,
        };
        let l = Limiter::new(&limits, true);
        let shares = l.shares().unwrap();
        // No share leased yet: refused, by the first share that has none.
        assert!(matches!(l.admit(SEC, || 0), Err(Refusal::Rate { .. })));
        shares.left[0].store(5, Ordering::Release);
        // The quota's share not leased yet, the fleet's quota not used up: a wait of
        // a moment, not until the next period (which a client would take at its word).
        assert!(matches!(
            l.admit(SEC, || 5_000),
            Err(Refusal::Quota { next: 6_000 })
        ));
        // Once the lessor learned the fleet used this period up: its end.
        shares.quota_used_up(0, true);
        assert!(matches!(
            l.admit(SEC, || 5_000),
            Err(Refusal::Quota { next: DAY_MS })
        ));
        // Only this period: the next day's spent share is a moment again.
        assert!(matches!(
            l.admit(SEC, || DAY_MS + 5_000),
            Err(Refusal::Quota { next }) if next == DAY_MS + 6_000
        ));
        shares.quota_used_up(0, false);
        assert!(matches!(
            l.admit(SEC, || 5_000),
            Err(Refusal::Quota { next: 6_000 })
        ));
        shares.left[1].store(3, Ordering::Release);
        // Three requests fit both shares; the rate share keeps what the quota's refused.
        for _ in 0..3 {
            assert!(l.admit(SEC, || 0).is_ok());
        }
        assert!(l.admit(SEC, || 0).is_err());
        assert_eq!(shares.left[0].load(Ordering::Acquire), 2);
        assert_eq!(shares.left[1].load(Ordering::Acquire), 0);
        assert_eq!(shares.taken[0].load(Ordering::Acquire), 3);
        // The refusals for want of a token are the lessor's demand to lease: one
        // for each share that had none, here the rate share once, the quota's five
        // times (three before its share was leased, once after it was spent).
        let missed: Vec<u64> = (shares.missed.iter())
            .map(|m| m.load(Ordering::Acquire))
            .collect();
        assert_eq!(missed, [1, 5]);
        // Many threads on a share of 100: exactly 100 let in.
        shares.left[0].store(100, Ordering::Release);
        shares.left[1].store(1_000, Ordering::Release);
        assert_eq!(hammer(&Arc::new(l), 8, 100, 2 * SEC, 0), 100);
        // A key of a source that is not a fleet's has no shares.
        assert!(Limiter::new(&limits, false).shares().is_none());
    }
}
