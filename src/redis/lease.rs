//! Fleet-wide limits: each replica spends shares of a key's limits leased from Redis.
//!
//! No request waits for Redis. Redis keeps the fleet-wide state of each (key id,
//! limit): for a rate limit, a token bucket of `requests` tokens refilled at
//! `requests` per `per` (on Redis's clock); for the quota, the period's count of
//! tokens leased. A replica's [`Shares`] hold the tokens it may still spend; this
//! module's thread (the *lessor*) looks at them every [`TICK`], and when a share has
//! spent half of what it was last given, asks for more, sized by the demand it saw
//! (a few ticks' worth, at most [`MAX_SHARE`] of the limit). When the demand falls,
//! it gives the excess back; when a key or a limit goes, its whole share. A share
//! idle for [`IDLE_TICKS`] keeps one token, so that its next request goes in at
//! once. A quota's share is asked for again only when a request wants it; a lease
//! Redis refused is asked for again after a wait that doubles up to
//! [`MAX_BACKOFF_TICKS`] (see [`Lease::plan`]): a quota used up costs Redis nothing
//! while nobody asks for it.
//!
//! A quota lease Redis grants short (the fleet's tokens all leased or spent) while
//! requests are being refused for want of a token lists the quota in the
//! namespace's `starved` set, for a few seconds ([`STARVED_FOR_MS`]). Every
//! [`LOOK_EVERY_TICKS`], a lessor that holds idle tokens of some quota reads that
//! set (one call, whatever the number of keys), and gives back all its tokens of
//! each starved quota no request wanted for [`IDLE_TICKS`] (see [`Lease::spare`]);
//! a share in use keeps its tokens. The starved replica's next lease gets them.
//!
//! What this guarantees, and its slack:
//! - rate limits: over any interval `d`, the fleet admits at most
//!   `requests + d × requests / per` plus the tokens outstanding in shares at the
//!   start of `d` (at most one share per replica: [`MAX_SHARE`] of the limit each);
//! - the quota: at most `requests` per period, exactly (a token is leased before it
//!   is spent); short of it by the tokens leased and not yet spent: the shares of
//!   replicas in use. An idle replica's token goes back when another replica
//!   starves: a client of one replica spends a quota whole, a second or two late.
//!   Tokens of a period still held when the next starts are spent in the new one
//!   (one share at most per replica).
//! - while Redis cannot be reached, a replica spends its last shares and then
//!   refuses: it is never unlimited. A new key is refused until its first share
//!   arrives, a tick or so after it is loaded: a `429` whose `Retry-After` is at most
//!   a second away. So is a request whose quota is starved, until idle tokens come
//!   back or [`USED_UP_AFTER_TICKS`] pass without any (then the refusal names the
//!   next period); a rate limit's refusal names its interval once Redis said the
//!   fleet's bucket is empty.
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

/// A key's id and its limiter, which leases shares of fleet-wide limits.
type Leased = (Arc<str>, Arc<Limiter>);

/// How often the lessor looks at the shares.
pub(super) const TICK: Duration = Duration::from_millis(20);

/// The largest share of a limit one replica holds, as a fraction of the limit.
const MAX_SHARE: f64 = 0.02;

/// How many ticks of demand a share is sized for.
const AHEAD: f64 = 4.0;

/// Ticks without a request for a token after which a replica's share is idle (a
/// second): its demand is taken as none, and of a quota it keeps one token (its next
/// request goes in at once) unless the quota is starved.
const IDLE_TICKS: u32 = 50;

/// The longest a share Redis refused waits before it is asked for again, in
/// ticks (a second): the wait doubles with each refusal, from one tick.
const MAX_BACKOFF_TICKS: u32 = 50;

/// How often a lessor holding idle quota tokens looks at the namespace's starved
/// quotas, in ticks (a second): one call to Redis, whatever the number of keys.
const LOOK_EVERY_TICKS: u64 = 50;

/// How long a starved quota stays listed after the last lease Redis granted short,
/// in ms. A replica that wants a quota asks again at least every
/// [`MAX_BACKOFF_TICKS`], so a starvation that goes on stays listed; one whose
/// requests stopped is gone after this.
const STARVED_FOR_MS: u64 = 2_000;

/// How long a share's requests are refused for want of the fleet's tokens before
/// its quota counts as used up, in ticks (a second and a half): time enough for
/// replicas holding idle tokens of it to see it starved and give them back. Until
/// then a refusal says the next share is on its way (`Retry-After: 1`), not the
/// next period.
const USED_UP_AFTER_TICKS: u64 = 75;

/// A pause in a share's requests after which a refusal starts a new wait for
/// idle tokens (three seconds): a quota refused long ago is not taken as used up
/// at once, since idle replicas may hold tokens of it by now.
const PAUSE_TICKS: u32 = 150;

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
/// `KEYS[1]` the count, `KEYS[2]` the namespace's starved quotas; `ARGV` requests,
/// wanted, given back, time to live (ms), how long a starved quota stays listed
/// (ms), whether requests were refused for want of a token (`1`). Such a lease
/// granted less than it asked for lists the count in `KEYS[2]` (scored by Redis's
/// time), trimming what is older.
const QUOTA: &str = r"
local requests = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local back = tonumber(ARGV[3])
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then redis.call('DEL', KEYS[1]) end
local used = tonumber(redis.call('GET', KEYS[1]) or '0') or requests
used = math.max(0, used - back)
local grant = math.max(0, math.min(want, requests - used))
redis.call('SET', KEYS[1], used + grant, 'PX', ARGV[4])
if grant < want and ARGV[6] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local keep = tonumber(ARGV[5])
  if redis.call('TYPE', KEYS[2]).ok ~= 'zset' then redis.call('DEL', KEYS[2]) end
  redis.call('ZADD', KEYS[2], now, KEYS[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - keep)
  redis.call('PEXPIRE', KEYS[2], keep * 2)
end
return grant
";

/// The quotas listed as starved in the last `ARGV[1]` ms (by Redis's clock): their
/// counts' Redis keys. `KEYS[1]` the namespace's starved quotas.
const STARVED: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'zset' then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf')
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
    /// The tick of the first lease Redis refused since the last grant (or the last
    /// pause in requests): how long the share has waited for the fleet's tokens.
    refused_since: Option<u64>,
    /// Whether the quota counts as used up: refused for [`USED_UP_AFTER_TICKS`].
    used_up: bool,
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
    ///   [`IDLE_TICKS`], all but one token (the next request's). That token, of a
    ///   quota, goes back only when the quota is starved (see [`Lease::spare`]); of
    ///   a rate limit, it stays (its bucket refills: nothing is lost to the fleet).
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
        if active && self.idle >= PAUSE_TICKS {
            (self.refused_since, self.used_up) = (None, false);
        }
        if let Some(period) = quota
            && period != self.period
        {
            self.period = period;
            self.asked = false;
            self.retry_at = 0;
            (self.refused_since, self.used_up) = (None, false);
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
        let target = ((self.demand * AHEAD).ceil() as i64).clamp(1, cap);
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
    /// tokens, the share now holding `left`. Returns whether the quota counts as
    /// used up: none granted, and none for [`USED_UP_AFTER_TICKS`] (until then,
    /// tokens idle on other replicas may still come back to the fleet).
    fn answered(&mut self, tick: u64, granted: i64, left: i64) -> bool {
        if granted > 0 {
            self.granted = left.max(granted);
            self.backoff = 0;
            self.retry_at = 0;
            (self.refused_since, self.used_up) = (None, false);
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF_TICKS);
            self.retry_at = tick + u64::from(self.backoff);
            let since = *self.refused_since.get_or_insert(tick);
            self.used_up |= tick.saturating_sub(since) >= USED_UP_AFTER_TICKS;
        }
        self.used_up
    }

    /// The tokens of `left` this quota share gives back when its quota is starved
    /// (another replica was lately granted less than it asked for): all of them if
    /// no request wanted one for [`IDLE_TICKS`], none if the share is in use. The
    /// share is then not asked for again until a request wants it.
    fn spare(&mut self, left: i64) -> i64 {
        if self.idle < IDLE_TICKS || left <= 0 {
            return 0;
        }
        self.asked = true;
        left
    }
}

/// One key's limiter and its shares' leases.
struct Held {
    id: Arc<str>,
    limiter: Arc<Limiter>,
    leases: Vec<Lease>,
}

impl Held {
    /// Whether this key's quota share holds tokens no request wanted for
    /// [`IDLE_TICKS`]: tokens to give back if the quota starves.
    fn holds_idle_quota(&self) -> bool {
        let (Some(shares), Some(_)) = (self.limiter.shares(), self.limiter.limits.quota) else {
            return false;
        };
        // The quota's share is the last.
        let left = shares.left.last().map(|l| l.load(Ordering::Acquire));
        let idle = self.leases.last().map(|l| l.idle);
        left.is_some_and(|l| l > 0) && idle.is_some_and(|i| i >= IDLE_TICKS)
    }
}

/// The lessor of one Redis source: a thread that ends when the store is gone.
pub(super) struct Lessor {
    client: redis::Client,
    keys: Keys,
    updater: KeyUpdater,
    timeout: Duration,
    rate: redis::Script,
    quota: redis::Script,
    starved: redis::Script,
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
            starved: redis::Script::new(STARVED),
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

    /// The limiters of this source's keys that lease shares of fleet-wide limits, with
    /// the keys' ids, and the store's version they are of; `None` while the version is
    /// still the one last looked at (nothing changed) or the store is gone.
    fn fleet_limiters(&self) -> Option<(u64, Vec<Leased>)> {
        let snapshot = self.updater.live()?;
        if self.version == Some(snapshot.version) {
            return None;
        }
        let list = (self.updater.own(&snapshot))
            .filter_map(|(_, e, _)| {
                let limiter = e.limiter.as_ref()?;
                limiter.shares()?;
                Some((e.id.clone(), limiter.clone()))
            })
            .collect();
        Some((snapshot.version, list))
    }

    /// One look at every share: renews, gives back, forgets; and once every
    /// [`LOOK_EVERY_TICKS`], gives idle tokens of starved quotas back.
    fn tick(&mut self, con: &mut redis::Connection) -> Result<(), redis::RedisError> {
        let now_ms = crate::clock::exact_now_ms();
        // The store's keys are looked at again only when they changed.
        if let Some((version, current)) = self.fleet_limiters() {
            self.forget_gone(con, current)?;
            self.version = Some(version);
        }
        self.renew(con, now_ms)?;
        if self.ticks.is_multiple_of(LOOK_EVERY_TICKS) {
            self.relieve(con)?;
        }
        Ok(())
    }

    /// Gives back the tokens of the quota shares no request wanted for a second
    /// whose quota is starved: another replica was lately granted less than it
    /// asked for. One call to Redis, and none unless some idle share holds tokens.
    fn relieve(&mut self, con: &mut redis::Connection) -> Result<(), redis::RedisError> {
        if !self.held.values().any(Held::holds_idle_quota) {
            return Ok(());
        }
        let starved: Vec<String> = self
            .starved
            .key(&self.keys.starved)
            .arg(STARVED_FOR_MS)
            .invoke(con)?;
        if starved.is_empty() {
            return Ok(());
        }
        let starved: std::collections::HashSet<String> = starved.into_iter().collect();
        let keys: Vec<_> = self.held.keys().copied().collect();
        for ptr in keys {
            let Some(held) = self.held.get_mut(&ptr) else {
                continue;
            };
            let (id, limiter) = (held.id.clone(), held.limiter.clone());
            let (Some(shares), Some(quota)) = (limiter.shares(), limiter.limits.quota) else {
                continue;
            };
            let i = shares.left.len().saturating_sub(1);
            let (Some(left), Some(lease)) = (shares.left.get(i), held.leases.get_mut(i)) else {
                continue;
            };
            let period = lease.period;
            if !starved.contains(&quota_key(&self.keys, &id, quota, period)) {
                continue;
            }
            if lease.spare(left.load(Ordering::Acquire)) == 0 {
                continue;
            }
            // As much as is left when taken: requests may spend some meanwhile.
            let back = left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                    (l > 0).then_some(0)
                })
                .unwrap_or(0);
            if back > 0 {
                self.call(con, &id, &limiter.limits, i, period, (0, back), false)?;
            }
        }
        Ok(())
    }

    /// Takes in the limiters of `current`, and gives back the shares of those gone.
    fn forget_gone(
        &mut self,
        con: &mut redis::Connection,
        current: Vec<Leased>,
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
                        let (id, limits) = (&held.id, &limiter.limits);
                        self.call(con, id, limits, i, lease.period, (0, back), false)?;
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
                let refused = seen.1 > 0;
                let granted =
                    self.call(con, &id, &limiter.limits, i, period, (want, back), refused)?;
                shares.left[i].fetch_add(granted, Ordering::AcqRel);
                if want == 0 {
                    continue;
                }
                let left = shares.left[i].load(Ordering::Acquire);
                let used_up = (self.held.get_mut(&ptr).and_then(|h| h.leases.get_mut(i)))
                    .is_some_and(|lease| lease.answered(tick, granted, left));
                // Asked for and none given: a rate limit's bucket is empty; a quota
                // is used up once none is given for a while (other replicas give
                // their idle tokens of a starved quota back). A refusal then names
                // the interval or the next period; until then, a spent share is
                // only a short wait.
                if quota.is_some() {
                    shares.quota_used_up(period, used_up);
                } else {
                    shares.rate_drained(i, granted == 0);
                }
            }
        }
        Ok(())
    }

    /// Leases `want` tokens of counting limit `i` of key `id` and gives `back` back:
    /// the tokens granted. `refused`: requests were refused for want of a token (a
    /// quota granted short is then listed as starved).
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        con: &mut redis::Connection,
        id: &str,
        limits: &Limits,
        i: usize,
        period: u32,
        (want, back): (i64, i64),
        refused: bool,
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
                    .key(&self.keys.starved)
                    .arg(quota.requests)
                    .arg(want)
                    .arg(back)
                    .arg(ttl)
                    .arg(STARVED_FOR_MS)
                    .arg(u8::from(refused))
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
        /// Requests let in, and refused.
        spent: u64,
        refused: u64,
        /// The tick of the last lease granted less than asked while requests were
        /// refused: when the quota was last listed as starved.
        starved_at: Option<u64>,
        /// The last answer's verdict: the quota used up.
        used_up: bool,
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
                spent: 0,
                refused: 0,
                starved_at: None,
                used_up: false,
            }
        }

        /// One tick in which requests wanted `requests` tokens (spent while there
        /// were any, refused once there were none).
        fn tick(&mut self, requests: u64) -> Plan {
            self.tick += 1;
            let taken = requests.min(self.left.max(0) as u64);
            self.left -= taken as i64;
            let missed = requests - taken;
            (self.spent, self.refused) = (self.spent + taken, self.refused + missed);
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
                    if granted < want && missed > 0 {
                        self.starved_at = Some(self.tick);
                    }
                    self.used_up = self.lease.answered(self.tick, granted, self.left);
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

        /// The look at the starved quotas, with `starved` whether this quota is
        /// listed: gives back what [`Lease::spare`] says. The tokens given back.
        fn look(&mut self, starved: bool) -> i64 {
            let back = if starved {
                self.lease.spare(self.left)
            } else {
                0
            };
            self.left -= back;
            if let Some(f) = &mut self.fleet {
                *f += back;
            }
            back
        }
    }

    /// Two replicas of one quota over one fleet, `a`'s fleet the count: a tick of
    /// each, with `ra` and `rb` requests, and every [`LOOK_EVERY_TICKS`] each looks
    /// at the starved quotas as the lessor does (listed for [`STARVED_FOR_MS`]
    /// after the last short lease). The tokens given back by each look.
    fn tick_pair(a: &mut Sim, b: &mut Sim, (ra, rb): (u64, u64)) -> (i64, i64) {
        a.tick(ra);
        b.fleet = a.fleet;
        b.tick(rb);
        a.fleet = b.fleet;
        if !a.tick.is_multiple_of(LOOK_EVERY_TICKS) {
            return (0, 0);
        }
        let now = a.tick;
        let listed = (a.starved_at.into_iter().chain(b.starved_at))
            .any(|t| (now - t) * TICK.as_millis() as u64 <= STARVED_FOR_MS);
        let back_a = a.look(listed);
        b.fleet = a.fleet;
        let back_b = b.look(listed);
        a.fleet = b.fleet;
        (back_a, back_b)
    }

    #[test]
    fn an_idle_replica_keeps_a_token_for_its_next_request() {
        // A quota of 3: the first share is leased with the key; a second without
        // requests, the replica still holds a token, and asks for nothing more.
        let mut sim = Sim::new(3, true, Some(3));
        assert_eq!(sim.tick(0), Plan::Ask(1));
        sim.tick(1);
        assert_eq!(sim.spent, 1);
        sim.idle(IDLE_TICKS + 1);
        assert_eq!(sim.left, 1, "{:?}", sim.asks);
        let asked = sim.asks.len();
        sim.idle(10_000);
        assert_eq!((sim.left, sim.asks.len()), (1, asked));
        // Its next request goes in at once (it used to be refused, the share given
        // back), and the share is renewed the same tick.
        sim.tick(1);
        assert_eq!((sim.spent, sim.refused), (2, 0));
        assert_eq!(sim.asks.last(), Some(&sim.tick));

        // A busy share of a large quota, once idle, goes back but for a token,
        // never asked for again without requests.
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
    fn an_idle_share_of_a_starved_quota_goes_to_the_replica_that_wants_it() {
        // A quota of 3 over two replicas, each with a token from the start; a
        // client of `a` alone, a request a tick.
        let (mut a, mut b) = (Sim::new(3, true, Some(3)), Sim::new(3, true, None));
        tick_pair(&mut a, &mut b, (0, 0));
        assert_eq!((a.left, b.left, a.fleet), (1, 1, Some(1)));
        let mut given = 0;
        let mut third = None;
        for _ in 0..(5 * LOOK_EVERY_TICKS) {
            let (back_a, back_b) = tick_pair(&mut a, &mut b, (1, 0));
            assert_eq!(back_a, 0, "a busy replica keeps its share");
            given += back_b;
            if a.spent == 3 && third.is_none() {
                third = Some(a.tick);
            }
            // Until `b`'s token is back, a refusal is a short wait.
            if a.spent < 3 {
                assert!(!a.used_up, "used up at tick {} with a token idle", a.tick);
            }
        }
        // `b`'s token went back once `a` was starved, and `a` spent it: the whole
        // quota, within two seconds, never more.
        assert_eq!((a.spent, b.spent, given), (3, 0, 1));
        assert_eq!((a.left, b.left, a.fleet), (0, 0, Some(0)));
        let third = third.unwrap_or(u64::MAX);
        assert!(
            third <= 2 * LOOK_EVERY_TICKS + 1,
            "the third at tick {third}"
        );
        // Then used up: refusals name the next period.
        assert!(a.used_up);
        // And `b` is not asked for again while nobody wants it.
        assert_eq!(b.asks.len(), 1);
    }

    #[test]
    fn a_first_share_refused_without_requests_starves_nobody() {
        // A quota of 1 over two replicas: `b`'s first share, leased with the key,
        // is refused, but no request wanted it: `a` keeps its token for its next
        // request, however long idle.
        let (mut a, mut b) = (Sim::new(1, true, Some(1)), Sim::new(1, true, None));
        for _ in 0..(10 * LOOK_EVERY_TICKS) {
            assert_eq!(tick_pair(&mut a, &mut b, (0, 0)), (0, 0));
        }
        assert_eq!((a.left, b.left, b.starved_at), (1, 0, None));
        // A request to `b` starves it: `a`'s token comes over.
        for _ in 0..(3 * LOOK_EVERY_TICKS) {
            tick_pair(&mut a, &mut b, (0, 1));
        }
        assert_eq!((a.left, b.spent), (0, 1));
    }

    #[test]
    fn a_replica_in_use_keeps_its_share_of_a_starved_quota() {
        // `b` sees a request every 20 ticks (never idle for a second): its token is
        // its own, though `a` starves.
        let (mut a, mut b) = (Sim::new(4, true, Some(4)), Sim::new(4, true, None));
        for t in 0..(10 * LOOK_EVERY_TICKS) {
            let (_, back_b) = tick_pair(&mut a, &mut b, (1, u64::from(t % 20 == 0)));
            assert_eq!(back_b, 0, "gave back at tick {t}");
        }
        assert_eq!(a.spent + b.spent, 4);
        assert!(b.spent > 0);
    }

    #[test]
    fn a_quota_counts_as_used_up_after_a_wait_and_again_after_a_pause() {
        let mut sim = Sim::new(3, true, Some(0));
        // Refused on every tick: a short wait for a second and a half, then used up.
        let mut first = None;
        for _ in 0..(4 * LOOK_EVERY_TICKS) {
            sim.tick(1);
            if sim.used_up && first.is_none() {
                first = Some(sim.tick);
            }
        }
        let first = first.unwrap_or(u64::MAX);
        assert!(
            (USED_UP_AFTER_TICKS..=USED_UP_AFTER_TICKS + u64::from(MAX_BACKOFF_TICKS))
                .contains(&first),
            "used up at tick {first}"
        );
        // Requests after a long pause wait again: tokens may have come back idle.
        sim.idle(PAUSE_TICKS);
        sim.tick(1);
        assert!(!sim.used_up);
        // A grant ends it.
        for _ in 0..(4 * LOOK_EVERY_TICKS) {
            sim.tick(1);
        }
        assert!(sim.used_up);
        sim.fleet = Some(5);
        sim.idle(MAX_BACKOFF_TICKS);
        sim.tick(1);
        assert!(!sim.used_up);
        assert!(sim.left > 0);
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
