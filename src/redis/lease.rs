//! Fleet-wide limits: each replica spends shares of a key's limits leased from Redis.
//!
//! No request waits for Redis. Redis keeps the fleet-wide state of each (key id,
//! limit): for a rate limit, a token bucket of `requests` tokens refilled at
//! `requests` per `per` (on Redis's clock); for the quota, the period's count of
//! tokens leased. A replica's [`Shares`] hold the tokens it may still spend; this
//! module's thread (the *lessor*) looks at them every [`TICK`], and when a share has
//! spent half of what it was last given, asks for more, sized by the demand it saw
//! (a few ticks' worth, at most [`MAX_SHARE`] of the limit). When the demand falls,
//! it gives the excess back; when a key or a limit goes, its whole share. A quota's
//! share idle for [`IDLE_TICKS`] goes back whole (but one token of a large quota:
//! [`IDLE_RESERVE_MIN`]), and is asked for again only when a request wants it; a
//! lease Redis refused is asked for again after a wait that doubles up to
//! [`MAX_BACKOFF_TICKS`] (see [`Lease::plan`]): a quota used up costs Redis nothing
//! while nobody asks for it.
//!
//! What this guarantees, and its slack:
//! - rate limits: over any interval `d`, the fleet admits at most
//!   `requests + d × requests / per` plus the tokens outstanding in shares at the
//!   start of `d` (at most one share per replica: [`MAX_SHARE`] of the limit each);
//! - the quota: at most `requests` per period, exactly (a token is leased before it
//!   is spent); short of it by the tokens leased and not yet spent: a busy
//!   replica's share, and an idle one's reserve of a quota of [`IDLE_RESERVE_MIN`]
//!   or more (one token). Tokens of a period still held when the next starts are
//!   spent in the new one (one share at most per replica).
//! - while Redis cannot be reached, a replica spends its last shares and then
//!   refuses: it is never unlimited. A new key is refused until its first share
//!   arrives, a tick or so after it is loaded, and so is a request to a replica that
//!   gave its share of a small quota back: a `429` whose `Retry-After` is at most a
//!   second away (a rate limit's interval, or the quota's next period, only once
//!   Redis said the fleet's bucket is empty or its quota used up).
//! - a limit's state is kept under the key's id and the limit's name (the quota's:
//!   its period), not its settings: a changed limit goes on from what the fleet
//!   counted, as one replica's limiter does.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    KeyUpdater,
    limit::{Limits, state::Limiter},
};

use super::model::Keys;

/// How often the lessor looks at the shares.
pub(super) const TICK: Duration = Duration::from_millis(20);

/// The largest share of a limit one replica holds, as a fraction of the limit.
const MAX_SHARE: f64 = 0.02;

/// How many ticks of demand a share is sized for.
const AHEAD: f64 = 4.0;

/// Ticks without a request for a token after which a replica's quota share is
/// idle, and goes back to the fleet (a second).
const IDLE_TICKS: u32 = 50;

/// The quotas of which an idle replica keeps one token, so that its next request
/// goes in at once: those of at least this many requests, of which a token is at
/// most 0.5% (ten idle replicas hold at most 5% back from a client of another).
/// Of a smaller quota an idle replica keeps none: a client can spend all of it on
/// any one replica.
const IDLE_RESERVE_MIN: u64 = 200;

/// The longest a share Redis refused waits before it is asked for again, in
/// ticks (a second): the wait doubles with each refusal, from one tick.
const MAX_BACKOFF_TICKS: u32 = 50;

/// A rate limit's bucket: refills, gives back, leases. Returns the grant.
/// KEYS[1] the bucket; ARGV requests, per (ms), wanted, given back. A bucket last
/// used with another `requests` keeps what the fleet used of it (as one replica's
/// limiter does): a lowered limit takes effect at once, a raised one counts what
/// was already let in.
const RATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then redis.call('DEL', KEYS[1]) end
local s = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'cap')
local tokens = tonumber(s[1])
local at = tonumber(s[2])
local was = tonumber(s[3])
if was ~= nil and was == was and was > 0 and was ~= cap and tokens ~= nil and tokens == tokens then
  tokens = math.max(0, math.min(cap, cap - (was - tokens)))
end
if tokens == nil or at == nil or tokens ~= tokens or tokens > cap or tokens < 0 then
  tokens = cap
  at = now
end
if now > at then
  tokens = math.min(cap, tokens + (now - at) * cap / per)
  at = now
end
tokens = math.min(cap, tokens + back)
local grant = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - grant
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', at, 'cap', cap)
redis.call('PEXPIRE', KEYS[1], per * 2 + 60000)
return grant
";

/// A quota period's count of tokens leased: gives back, leases. Returns the grant.
/// KEYS[1] the count; ARGV requests, wanted, given back, time to live (ms).
const QUOTA: &str = r"
local requests = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local back = tonumber(ARGV[3])
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then redis.call('DEL', KEYS[1]) end
local used = tonumber(redis.call('GET', KEYS[1]) or '0') or requests
used = math.max(0, used - back)
local grant = math.max(0, math.min(want, requests - used))
redis.call('SET', KEYS[1], used + grant, 'PX', ARGV[4])
return grant
";

/// What the lessor remembers of one share.
#[derive(Default)]
struct Lease {
    /// Tokens given at the last grant.
    granted: i64,
    /// Demand, in tokens per tick (a moving average).
    demand: f64,
    /// The quota period the share is of.
    period: u32,
    /// Ticks since a request last wanted a token of this share.
    idle: u32,
    /// Whether the lessor has asked for this share (of this quota period).
    asked: bool,
    /// The wait after the last refused lease, in ticks (0: the last was granted).
    backoff: u32,
    /// The tick before which the share is not asked for again.
    retry_at: u64,
}

/// What a look at a share leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Nothing to do.
    Keep,
    /// Lease this many tokens.
    Ask(i64),
    /// Give back all but this many tokens.
    GiveBackAbove(i64),
}

impl Lease {
    /// Looks at a share at tick `tick`: since the last look, `taken` tokens were
    /// spent and `missed` requests refused for want of one; `left` tokens are held.
    /// `limit` is the limit's size, `quota` whether it is the quota, `period` its
    /// current period.
    ///
    /// - A share is renewed when half of it is spent, sized by the demand (a few
    ///   ticks' worth, at most [`MAX_SHARE`] of the limit).
    /// - The demand fell: what is well over it goes back at once; idle for
    ///   [`IDLE_TICKS`], all of a quota's share goes back but the reserve of a
    ///   large quota (see [`IDLE_RESERVE_MIN`]). A rate limit's share keeps a token
    ///   (its bucket refills: nothing is lost to the fleet).
    /// - A quota share is asked for only when requests want it, or for the first
    ///   share of a key or a period: a quota used up and idle costs Redis nothing.
    /// - A lease Redis refused (none granted) is asked for again after a wait that
    ///   doubles up to [`MAX_BACKOFF_TICKS`]; a grant, a new period, or requests
    ///   after a pause longer than the wait end it.
    fn plan(
        &mut self,
        tick: u64,
        (taken, missed, left): (u64, u64, i64),
        limit: u64,
        quota: Option<u32>,
    ) -> Plan {
        let active = taken > 0 || missed > 0;
        if active && self.idle >= self.backoff.max(1) {
            self.retry_at = 0;
        }
        if let Some(period) = quota
            && period != self.period
        {
            self.period = period;
            self.asked = false;
            self.retry_at = 0;
        }
        self.idle = if active {
            0
        } else {
            self.idle.saturating_add(1)
        };
        // A request refused for want of a token would have spent one.
        let sample = taken.saturating_add(u64::from(missed > 0));
        self.demand = if self.idle >= IDLE_TICKS {
            0.0
        } else {
            0.5f64.mul_add(self.demand, 0.5 * sample as f64)
        };
        let cap = (limit as f64 * MAX_SHARE).ceil().max(1.0) as i64;
        let floor = match quota {
            Some(_) if self.idle >= IDLE_TICKS => i64::from(limit >= IDLE_RESERVE_MIN),
            _ => 1,
        };
        let target = ((self.demand * AHEAD).ceil() as i64).clamp(floor, cap);
        if !active && (left > 2 * target || (self.idle >= IDLE_TICKS && left > target)) {
            return Plan::GiveBackAbove(target);
        }
        let want = (target - left.max(0)).max(0);
        let low = left * 2 <= self.granted.max(1) || left < target / 2;
        if want == 0 || !low || tick < self.retry_at || (quota.is_some() && !active && self.asked) {
            return Plan::Keep;
        }
        self.asked = true;
        Plan::Ask(want)
    }

    /// Takes in Redis's answer to a lease asked for at tick `tick`: `granted`
    /// tokens, the share now holding `left`.
    fn answered(&mut self, tick: u64, granted: i64, left: i64) {
        if granted > 0 {
            self.granted = left.max(granted);
            self.backoff = 0;
            self.retry_at = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF_TICKS);
            self.retry_at = tick + u64::from(self.backoff);
        }
    }
}

/// One key's limiter and its shares' leases.
struct Held {
    id: Arc<str>,
    limiter: Arc<Limiter>,
    leases: Vec<Lease>,
}

/// The lessor of one Redis source: a thread that ends when the store is gone.
pub(super) struct Lessor {
    client: redis::Client,
    keys: Keys,
    updater: KeyUpdater,
    timeout: Duration,
    rate: redis::Script,
    quota: redis::Script,
    /// By the limiter's address (each held here, so none is reused meanwhile).
    held: HashMap<usize, Held>,
    /// The store's version `held` is of.
    version: Option<u64>,
    /// Ticks looked at so far: the clock of the leases' waits.
    ticks: u64,
}

impl Lessor {
    pub(super) fn spawn(client: redis::Client, keys: Keys, updater: KeyUpdater, timeout: Duration) {
        let lessor = Self {
            client,
            keys,
            updater,
            timeout,
            rate: redis::Script::new(RATE),
            quota: redis::Script::new(QUOTA),
            held: HashMap::new(),
            version: None,
            ticks: 0,
        };
        let spawned = thread::Builder::new()
            .name("tower-api-key-lease".into())
            .spawn(move || lessor.run());
        if let Err(error) = spawned {
            #[cfg(feature = "tracing")]
            tracing::error!(target: "tower_api_key::reload", %error, "cannot start the Redis lessor; fleet-wide limits will refuse");
            #[cfg(not(feature = "tracing"))]
            let _ = error;
        }
    }

    fn run(mut self) {
        let mut con: Option<redis::Connection> = None;
        let mut backoff = TICK;
        let mut retry_at = Instant::now();
        loop {
            if self.updater.is_closed() {
                return;
            }
            let started = Instant::now();
            if con.is_none() && started >= retry_at {
                match super::read::connect(&self.client, self.timeout) {
                    Ok(c) => {
                        backoff = TICK;
                        con = Some(c);
                    }
                    Err(_) => {
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        retry_at = started + backoff;
                    }
                }
            }
            if let Some(c) = con.as_mut()
                && let Err(error) = self.tick(c)
            {
                #[cfg(feature = "tracing")]
                tracing::debug!(target: "tower_api_key::reload", error = %super::describe(&error), "fleet-wide limits: Redis did not answer; shares are spent and not renewed");
                #[cfg(not(feature = "tracing"))]
                let _ = error;
                con = None;
                retry_at = Instant::now() + backoff;
            }
            thread::sleep(TICK.saturating_sub(started.elapsed()));
        }
    }

    /// One look at every share: renews, gives back, forgets.
    fn tick(&mut self, con: &mut redis::Connection) -> Result<(), redis::RedisError> {
        let now_ms = crate::clock::exact_now_ms();
        // The store's keys are looked at again only when they changed.
        if let Some((version, current)) = self.updater.fleet_limiters(self.version) {
            self.forget_gone(con, current)?;
            self.version = Some(version);
        }
        self.renew(con, now_ms)
    }

    /// Takes in the limiters of `current`, and gives back the shares of those gone.
    fn forget_gone(
        &mut self,
        con: &mut redis::Connection,
        current: Vec<(Arc<str>, Arc<Limiter>)>,
    ) -> Result<(), redis::RedisError> {
        let mut seen = HashMap::with_capacity(current.len());
        for (id, limiter) in current {
            let ptr = Arc::as_ptr(&limiter) as usize;
            seen.insert(ptr, ());
            let n = limiter.shares().map_or(0, |s| s.left.len());
            self.held.entry(ptr).or_insert_with(|| Held {
                id,
                limiter,
                leases: (0..n).map(|_| Lease::default()).collect(),
            });
        }
        // Keys and limits gone: their shares go back.
        let gone: Vec<_> = (self.held.keys().copied())
            .filter(|p| !seen.contains_key(p))
            .collect();
        for ptr in gone {
            if let Some(held) = self.held.remove(&ptr) {
                let limiter = held.limiter.clone();
                for (i, lease) in held.leases.iter().enumerate() {
                    let Some(shares) = limiter.shares() else {
                        break;
                    };
                    let back = shares.left[i].swap(0, Ordering::AcqRel).max(0);
                    if back > 0 {
                        self.call(con, &held.id, &limiter.limits, i, lease.period, 0, back)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Renews the shares that are half spent, and gives back what the demand no
    /// longer needs (see [`Lease::plan`]).
    fn renew(&mut self, con: &mut redis::Connection, now_ms: u64) -> Result<(), redis::RedisError> {
        self.ticks += 1;
        let tick = self.ticks;
        let keys: Vec<_> = self.held.keys().copied().collect();
        for ptr in keys {
            let Some(held) = self.held.get(&ptr) else {
                continue;
            };
            let (id, limiter) = (held.id.clone(), held.limiter.clone());
            let Some(shares) = limiter.shares() else {
                continue;
            };
            for i in 0..shares.left.len() {
                let limit = limit_of(&limiter.limits, i);
                let quota = (limiter.limits.quota)
                    .filter(|_| i + 1 == shares.left.len())
                    .map(|q| q.period.index(now_ms));
                let seen = (
                    shares.taken[i].swap(0, Ordering::AcqRel),
                    shares.missed[i].swap(0, Ordering::AcqRel),
                    shares.left[i].load(Ordering::Acquire),
                );
                let Some(lease) = self.held.get_mut(&ptr).and_then(|h| h.leases.get_mut(i)) else {
                    continue;
                };
                let (want, back) = match lease.plan(tick, seen, limit, quota) {
                    Plan::Keep => continue,
                    Plan::Ask(want) => (want, 0),
                    Plan::GiveBackAbove(keep) => {
                        let back = shares.left[i]
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                                (l > keep).then_some(keep)
                            })
                            .map_or(0, |before| before - keep);
                        (0, back)
                    }
                };
                let period = quota.unwrap_or(0);
                if want == 0 && back == 0 {
                    continue;
                }
                let granted = self.call(con, &id, &limiter.limits, i, period, want, back)?;
                shares.left[i].fetch_add(granted, Ordering::AcqRel);
                if want == 0 {
                    continue;
                }
                // Asked for and none given: the fleet has used the period's quota up
                // (a quota's grant is all it has left). A refusal then names the
                // next period; until this is known, a spent share is only a short wait.
                if quota.is_some() {
                    shares.quota_used_up(period, granted == 0);
                } else {
                    shares.rate_drained(i, granted == 0);
                }
                if let Some(lease) = self.held.get_mut(&ptr).and_then(|h| h.leases.get_mut(i)) {
                    lease.answered(tick, granted, shares.left[i].load(Ordering::Acquire));
                }
            }
        }
        Ok(())
    }

    /// Leases `want` tokens of counting limit `i` of key `id` and gives `back` back:
    /// the tokens granted.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        con: &mut redis::Connection,
        id: &str,
        limits: &Limits,
        i: usize,
        period: u32,
        want: i64,
        back: i64,
    ) -> Result<i64, redis::RedisError> {
        match limits.rates.get(i) {
            Some(rate) => {
                let per_ms = u64::try_from(rate.per.as_millis()).unwrap_or(u64::MAX);
                // By name only: a changed limit goes on from what the fleet counted,
                // as one replica's does (a lowered one takes effect at once, a raised
                // one hands out no fresh burst).
                let key = self.keys.lease(id, &format!("rate:{}", rate.name));
                self.rate
                    .key(key)
                    .arg(rate.requests)
                    .arg(per_ms)
                    .arg(want)
                    .arg(back)
                    .invoke(con)
            }
            None => {
                let Some(quota) = limits.quota else {
                    return Ok(0);
                };
                let next = quota.period.start(period.saturating_add(1));
                let ttl = next
                    .saturating_sub(crate::clock::exact_now_ms())
                    .saturating_add(86_400_000);
                let key = quota_key(&self.keys, id, quota, period);
                self.quota
                    .key(key)
                    .arg(quota.requests)
                    .arg(want)
                    .arg(back)
                    .arg(ttl)
                    .invoke(con)
            }
        }
    }
}

/// The size of counting limit `i`: a rate limit's `requests`, or the quota's.
fn limit_of(limits: &Limits, i: usize) -> u64 {
    limits
        .rates
        .get(i)
        .map(|r| r.requests)
        .or(limits.quota.map(|q| q.requests))
        .unwrap_or(1)
}

/// The Redis key of the count of `quota`'s tokens leased by the fleet in `period`.
/// Its `requests` are not part of the name: a quota raised or lowered keeps the
/// period's count, and a lowered one below it admits no more.
pub(crate) fn quota_key(keys: &Keys, id: &str, quota: crate::limit::Quota, period: u32) -> String {
    keys.lease(id, &format!("quota:{}:{period}", quota.period.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica's share, driven tick by tick as the lessor drives it, with Redis
    /// granting what the fleet has (`fleet`: tokens left to lease; `None`:
    /// plenty).
    struct Sim {
        lease: Lease,
        tick: u64,
        left: i64,
        fleet: Option<i64>,
        limit: u64,
        quota: Option<u32>,
        asks: Vec<u64>,
        given_back: i64,
    }

    impl Sim {
        fn new(limit: u64, quota: bool, fleet: Option<i64>) -> Self {
            Self {
                lease: Lease::default(),
                tick: 0,
                left: 0,
                fleet,
                limit,
                quota: quota.then_some(7),
                asks: Vec::new(),
                given_back: 0,
            }
        }

        /// One tick in which requests wanted `requests` tokens (spent while there
        /// were any, refused once there were none).
        fn tick(&mut self, requests: u64) -> Plan {
            self.tick += 1;
            let taken = requests.min(self.left.max(0) as u64);
            self.left -= taken as i64;
            let missed = requests - taken;
            let plan = self.lease.plan(
                self.tick,
                (taken, missed, self.left),
                self.limit,
                self.quota,
            );
            match plan {
                Plan::Keep => {}
                Plan::Ask(want) => {
                    self.asks.push(self.tick);
                    let granted = self.fleet.map_or(want, |f| f.min(want));
                    if let Some(f) = &mut self.fleet {
                        *f -= granted;
                    }
                    self.left += granted;
                    self.lease.answered(self.tick, granted, self.left);
                }
                Plan::GiveBackAbove(keep) => {
                    let back = (self.left - keep).max(0);
                    self.left -= back;
                    self.given_back += back;
                    if let Some(f) = &mut self.fleet {
                        *f += back;
                    }
                }
            }
            plan
        }

        fn idle(&mut self, ticks: u32) {
            for _ in 0..ticks {
                self.tick(0);
            }
        }
    }

    #[test]
    fn an_idle_replica_gives_its_quota_share_back_within_a_second() {
        // A quota of 3: the first share is leased with the key, then goes back
        // whole a second after the last request wanted it.
        let mut sim = Sim::new(3, true, Some(3));
        assert_eq!(sim.tick(0), Plan::Ask(1));
        sim.tick(1);
        sim.tick(1);
        assert_eq!(sim.left + sim.fleet.unwrap_or(0), 1, "{:?}", sim.asks);
        sim.idle(IDLE_TICKS + 1);
        assert_eq!((sim.left, sim.fleet), (0, Some(1)));
        // And it is not asked for again until a request wants it.
        let asked = sim.asks.len();
        sim.idle(10_000);
        assert_eq!(sim.asks.len(), asked);
        // A request then is refused for want of a token, and leases the next tick.
        sim.tick(1);
        assert_eq!(sim.asks.last(), Some(&sim.tick));
        assert!(sim.left > 0);

        // Of a quota of 200 or more, an idle replica keeps one token, never asked
        // for again once spent without requests.
        let mut sim = Sim::new(1_000, true, None);
        for _ in 0..20 {
            sim.tick(5);
        }
        sim.idle(IDLE_TICKS + 1);
        assert_eq!(sim.left, 1);
        sim.tick(1);
        let asked = sim.asks.len();
        sim.idle(1_000);
        assert!(sim.asks.len() <= asked + 1, "{:?}", sim.asks);
    }

    #[test]
    fn a_used_up_quota_is_not_asked_for_without_requests_and_backs_off_with_them() {
        let mut sim = Sim::new(3, true, Some(3));
        sim.tick(0);
        for _ in 0..10 {
            sim.tick(1);
        }
        assert_eq!((sim.left, sim.fleet), (0, Some(0)));
        // Used up, no requests: not one lease in a month of ticks' worth here.
        let asked = sim.asks.len();
        sim.idle(100_000);
        assert_eq!(sim.asks.len(), asked);
        // Requests refused on every tick: asked again after 1, 2, 4, ... ticks, at
        // most a second apart, not on every tick.
        for _ in 0..1_000 {
            sim.tick(3);
        }
        let asks: Vec<u64> = sim.asks[asked..].to_vec();
        assert!(asks.len() <= 30, "{} leases in 1,000 ticks", asks.len());
        let gaps: Vec<u64> = asks.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
        assert_eq!(gaps.last(), Some(&u64::from(MAX_BACKOFF_TICKS)), "{gaps:?}");
        // Tokens back in the fleet (another replica returned its share), and a
        // request after a pause: asked for at once, and the grant ends the wait.
        sim.fleet = Some(2);
        sim.idle(MAX_BACKOFF_TICKS);
        let asked = sim.asks.len();
        sim.tick(1);
        assert_eq!(sim.asks.len(), asked + 1);
        assert_eq!((sim.left, sim.lease.backoff), (1, 0));
        // Used up again, refused, backing off: the next period is asked for at
        // once, requests or not.
        for _ in 0..10 {
            sim.tick(1);
        }
        assert_eq!((sim.left, sim.fleet), (0, Some(0)));
        assert!(sim.lease.backoff > 0);
        sim.quota = Some(8);
        sim.fleet = Some(3);
        let asked = sim.asks.len();
        sim.tick(0);
        assert_eq!(sim.asks.len(), asked + 1);
    }

    #[test]
    fn a_busy_share_is_renewed_without_giving_back() {
        for quota in [false, true] {
            let mut sim = Sim::new(100_000, quota, None);
            for _ in 0..1_000 {
                assert!(
                    !matches!(sim.tick(5), Plan::GiveBackAbove(_)),
                    "gave back at tick {}",
                    sim.tick
                );
            }
            // A share of four ticks' demand, renewed at half: every other tick.
            assert!(sim.asks.len() <= 520, "{} leases", sim.asks.len());
            assert_eq!(sim.given_back, 0);
        }
    }

    #[test]
    fn a_drained_rate_bucket_is_asked_for_again_after_a_doubling_wait() {
        let mut sim = Sim::new(120, false, Some(0));
        for _ in 0..500 {
            sim.tick(0);
        }
        let gaps: Vec<u64> = sim.asks.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[..6], [1, 2, 4, 8, 16, 32]);
        assert!(gaps[6..].iter().all(|&g| g == u64::from(MAX_BACKOFF_TICKS)));
        // Refilled: granted, and the wait is over.
        sim.fleet = Some(10);
        sim.idle(MAX_BACKOFF_TICKS);
        assert_eq!(sim.left, 1);
        assert_eq!((sim.lease.backoff, sim.lease.retry_at), (0, 0));
    }
}
