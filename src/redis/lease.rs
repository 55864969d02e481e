//! Fleet-wide limits: each replica spends shares of a key's limits leased from Redis.
//!
//! No request waits for Redis. Redis keeps the fleet-wide state of each (key id,
//! limit): for a rate limit, a token bucket of `requests` tokens refilled at
//! `requests` per `per` (on Redis's clock); for the quota, the period's count of
//! tokens leased. A replica's [`Shares`] hold the tokens it may still spend; this
//! module's thread (the *lessor*) looks at them every [`TICK`], and when a share has
//! spent half of what it was last given, asks for more, sized by the demand it saw
//! (a few ticks' worth, at most [`MAX_SHARE`] of the limit). When the demand falls,
//! it gives the excess back; when a key or a limit goes, its whole share.
//!
//! What this guarantees, and its slack:
//! - rate limits: over any interval `d`, the fleet admits at most
//!   `requests + d × requests / per` plus the tokens outstanding in shares at the
//!   start of `d` (at most one share per replica: [`MAX_SHARE`] of the limit each);
//! - the quota: at most `requests` per period, exactly (a token is leased before it
//!   is spent); short of it by the tokens leased and not yet spent, which are given
//!   back when the demand falls. Tokens of a period still held when the next starts
//!   are spent in the new one (one share at most per replica).
//! - while Redis cannot be reached, a replica spends its last shares and then
//!   refuses: it is never unlimited. A new key is refused until its first share
//!   arrives, a tick or so after it is loaded: a `429` whose `Retry-After` is at most
//!   a second away (a rate limit's interval, or the quota's next period, only once
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
    /// longer needs.
    fn renew(&mut self, con: &mut redis::Connection, now_ms: u64) -> Result<(), redis::RedisError> {
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
                let taken = shares.taken[i].swap(0, Ordering::AcqRel);
                let (want, back, period) = {
                    let Some(lease) = self.held.get_mut(&ptr).and_then(|h| h.leases.get_mut(i))
                    else {
                        continue;
                    };
                    lease.demand = 0.5f64.mul_add(lease.demand, 0.5 * taken as f64);
                    let cap = (limit as f64 * MAX_SHARE).ceil().max(1.0);
                    let target = (lease.demand * AHEAD).ceil().clamp(1.0, cap) as i64;
                    if let Some(q) = limiter.limits.quota.filter(|_| i + 1 == shares.left.len()) {
                        lease.period = q.period.index(now_ms);
                    }
                    let left = shares.left[i].load(Ordering::Acquire);
                    if left * 2 <= lease.granted.max(1) || left < target / 2 {
                        ((target - left.max(0)).max(0), 0, lease.period)
                    } else if taken == 0 && left > 2 * target {
                        // The demand fell: the excess goes back.
                        let back = shares.left[i]
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                                (l > target).then_some(target)
                            })
                            .map_or(0, |before| before - target);
                        (0, back, lease.period)
                    } else {
                        continue;
                    }
                };
                if want == 0 && back == 0 {
                    continue;
                }
                let granted = self.call(con, &id, &limiter.limits, i, period, want, back)?;
                shares.left[i].fetch_add(granted, Ordering::AcqRel);
                // Asked for and none given: the fleet has used the period's quota up
                // (a quota's grant is all it has left). A refusal then names the
                // next period; until this is known, a spent share is only a short wait.
                if want > 0 {
                    if limiter.limits.quota.is_some() && i + 1 == shares.left.len() {
                        shares.quota_used_up(period, granted == 0);
                    } else {
                        shares.rate_drained(i, granted == 0);
                    }
                }
                if let Some(lease) = self.held.get_mut(&ptr).and_then(|h| h.leases.get_mut(i))
                    && granted > 0
                {
                    lease.granted = shares.left[i].load(Ordering::Acquire).max(granted);
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
