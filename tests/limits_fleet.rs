//! Fleet-wide limits on Redis: replicas (each its own store, `RedisSource` and
//! server, here in one process) spend shares of a key's limits leased from a real
//! `redis-server`, with no call to Redis on the request path. Clients saturate every
//! replica over loopback; the tests count what the fleet let in.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "redis")]

mod common;
mod redis_support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redis_support::*;

/// `n` replicas of namespace `ns`, which holds `file`.
async fn fleet(redis: &Redis, ns: &str, file: &str, n: usize) -> Vec<Replica> {
    import(redis, ns, file).await;
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(replica(redis, ns, false).await);
    }
    replicas
}

/// Two clients per replica send `key` as fast as they are answered until `stop`:
/// the instants of the `200`s, and how many answers were `429`.
async fn saturate(
    addrs: Vec<SocketAddr>,
    key: &'static str,
    stop: Arc<AtomicBool>,
) -> (Vec<Instant>, u64) {
    let mut tasks = Vec::new();
    for &addr in addrs.iter().chain(&addrs) {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let client = common::client();
            let (mut admitted, mut refused) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let res = client
                    .get(format!("http://{addr}/"))
                    .header("x-api-key", key)
                    .send()
                    .await
                    .unwrap();
                match res.status().as_u16() {
                    200 => admitted.push(Instant::now()),
                    429 => refused += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            (admitted, refused)
        }));
    }
    let (mut all, mut refused) = (Vec::new(), 0);
    for task in tasks {
        let (a, r) = task.await.unwrap();
        all.extend(a);
        refused += r;
    }
    all.sort_unstable();
    (all, refused)
}

/// Saturates for `run`, then stops.
async fn saturate_for(
    addrs: &[SocketAddr],
    key: &'static str,
    run: Duration,
) -> (Vec<Instant>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let work = tokio::spawn(saturate(addrs.to_vec(), key, stop.clone()));
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    work.await.unwrap()
}

const RATE_KEY: &str = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
    rate_limits = [ { name = \"burst\", requests = 120, per = \"6s\" } ]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_saturating_a_rate_limit_let_in_the_limit_per_window() {
    let Some(redis) = Redis::start() else { return };
    let replicas = fleet(&redis, "rate", RATE_KEY, 4).await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let start = Instant::now();
    // One window to spend the first burst (120 at once, as on one replica), then
    // three in the steady state.
    let window = Duration::from_secs(6);
    let (admitted, refused) = saturate_for(&addrs, "fleet-secret", window * 4).await;
    assert!(refused > 1_000, "not saturated: {refused} refused");
    let counts: Vec<usize> = (1..4)
        .map(|w| {
            let (from, to) = (start + window * w, start + window * (w + 1));
            admitted.iter().filter(|t| **t >= from && **t < to).count()
        })
        .collect();
    println!("admitted per 6 s window after the first: {counts:?}");
    for (w, &count) in counts.iter().enumerate() {
        assert!(
            (114..=126).contains(&count),
            "window {}: {count} admitted of a limit of 120 per 6 s ({counts:?}; {} in all)",
            w + 1,
            admitted.len()
        );
    }
}

const QUOTA_KEY: &str = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
    quota = { requests = 400, per = \"day\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_saturating_a_quota_let_in_all_of_it_and_no_more() {
    let Some(redis) = Redis::start() else { return };
    let file = format!(
        "{QUOTA_KEY}[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n"
    );
    let replicas = fleet(&redis, "quota", &file, 4).await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let (admitted, _) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(4)).await;
    // The fleet never leases more than the quota; saturated, every share is spent.
    assert!(
        (396..=400).contains(&admitted.len()),
        "{} admitted of a quota of 400",
        admitted.len()
    );
    // And after: refused everywhere.
    for addr in &addrs {
        assert_eq!(status(*addr, "fleet-secret").await, 429);
    }
    // The key-management API of a replica that served none of it shows the fleet's
    // use: every token leased, all of them spent.
    let operator = replica(&redis, "quota", true).await;
    eventually(
        "the operator's replica loaded",
        Duration::from_secs(15),
        || operator.store.get("root").is_some(),
    )
    .await;
    let (code, key) = api(
        operator.addr,
        reqwest::Method::GET,
        "/v1/api-keys/fleet",
        None,
    )
    .await;
    assert_eq!(code, 200, "{key}");
    assert_eq!(key["quota"]["used"], 400, "{key}");
    assert_eq!(key["quota"]["remaining"], 0, "{key}");
}

/// A quota changed by a reload goes on from what the fleet counted this period, as
/// one replica's does: lowered below it, it admits no more; raised, only the
/// difference. (Its count used to be kept under the quota's settings, so any change
/// handed out a whole fresh quota.) A request refused for a spent share while the
/// fleet has quota left is told to come back in a moment, not the next period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_quota_goes_on_from_the_fleets_count() {
    let Some(redis) = Redis::start() else { return };
    let quota = |n: u32| {
        format!(
            "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
             quota = {{ requests = {n}, per = \"day\" }}\n"
        )
    };
    let replicas = fleet(&redis, "requota", &quota(40), 2).await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let (first, _) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(2)).await;
    // All of it, but a token leased as the clients stopped (spent later).
    assert!(
        (38..=40).contains(&first.len()),
        "{} of a quota of 40",
        first.len()
    );
    let loaded = |n: u64| {
        let stores: Vec<_> = replicas.iter().map(|r| r.store.clone()).collect();
        move || {
            stores.iter().all(|s| {
                s.get("fleet")
                    .is_some_and(|k| k.limits().iter().any(|l| l.limit() == n))
            })
        }
    };
    import(&redis, "requota", &quota(30)).await;
    eventually(
        "the lowered quota loaded",
        Duration::from_secs(10),
        loaded(30),
    )
    .await;
    let (admitted, refused) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(1)).await;
    assert!(refused > 0);
    assert_eq!(
        admitted.len(),
        0,
        "a quota lowered below its count admits no more"
    );
    import(&redis, "requota", &quota(45)).await;
    eventually(
        "the raised quota loaded",
        Duration::from_secs(10),
        loaded(45),
    )
    .await;
    let (admitted, _) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(2)).await;
    assert_eq!(
        first.len() + admitted.len(),
        45,
        "a quota raised from 40 to 45 admits 5 more in all"
    );
    // Used up fleet-wide: the refusal names the next period (an HTTP date), where a
    // share merely spent says a second. It says so once the replica has waited a
    // second and a half for idle tokens of the other to come back, and none came.
    let (client, start) = (common::client(), Instant::now());
    let retry = loop {
        let res = client
            .get(format!("http://{}/", addrs[0]))
            .header("x-api-key", "fleet-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        let retry = res.headers()["retry-after"].to_str().unwrap().to_owned();
        if retry != "1" {
            break retry;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still `Retry-After: 1` after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // An HTTP date, or whole seconds in the last minute of the day.
    let wait = match retry.parse::<u64>() {
        Ok(secs) => secs,
        Err(_) => httpdate::parse_http_date(&retry)
            .unwrap()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .as_secs(),
    };
    let to_midnight = 86_400
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 86_400;
    assert!(
        wait.abs_diff(to_midnight) <= 2,
        "Retry-After {retry}: {wait} s, midnight in {to_midnight} s"
    );
}

/// A rate limit lowered by a reload keeps what the fleet let in under it, as one
/// replica's limiter does: 20 of 100 used, lowered to 30, leaves 10 (the fleet's
/// bucket used to be clamped to the new size, a fresh 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_rate_limit_keeps_what_the_fleet_used() {
    let Some(redis) = Redis::start() else { return };
    let rate = |n: u32| {
        format!(
            "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
             rate_limits = [ {{ name = \"burst\", requests = {n}, per = \"600s\" }} ]\n"
        )
    };
    let replicas = fleet(&redis, "lowered", &rate(100), 2).await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    // Twenty let in, one at a time (a spent share waits for the next lease).
    let (mut admitted, start) = (0, Instant::now());
    while admitted < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{admitted} let in"
        );
        match status(addrs[admitted % 2], "fleet-secret").await {
            200 => admitted += 1,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    import(&redis, "lowered", &rate(30)).await;
    let stores: Vec<_> = replicas.iter().map(|r| r.store.clone()).collect();
    eventually("the lowered limit loaded", Duration::from_secs(10), || {
        stores.iter().all(|s| {
            s.get("fleet")
                .is_some_and(|k| k.limits().iter().any(|l| l.limit() == 30))
        })
    })
    .await;
    let (after, _) = saturate_for(&addrs, "fleet-secret", Duration::from_millis(1500)).await;
    // At most the 10 the fleet had not used (fewer by the tokens leased and not
    // spent when the limit changed, at most 2 a replica).
    assert!(
        (5..=10).contains(&after.len()),
        "{} let in after lowering 100 to 30 with 20 used",
        after.len()
    );
}

const BIG_KEY: &str = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
    rate_limits = [ { name = \"burst\", requests = 6000, per = \"60s\" } ]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_replicas_spend_their_last_share_and_refuse() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let replicas = fleet(&redis, "down", BIG_KEY, 2).await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    // Running: shares are renewed (a share is at most 2% of 6,000: 120).
    let (admitted, _) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(1)).await;
    assert!(
        admitted.len() > 50,
        "{} admitted with Redis up",
        admitted.len()
    );
    redis.stop();
    // Down: each replica spends what it holds and refuses the rest, though its own
    // limit (6,000 at once) would let thousands in.
    let (admitted, refused) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(2)).await;
    assert!(
        admitted.len() <= 2 * 120,
        "{} admitted with Redis down: more than the shares held",
        admitted.len()
    );
    assert!(refused > 100, "{refused} refused with Redis down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_limit_takes_effect_at_once_across_the_fleet() {
    let Some(redis) = Redis::start() else { return };
    let tight = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
        rate_limits = [ { name = \"burst\", requests = 5, per = \"60s\" } ]\n";
    let replicas = fleet(&redis, "change", tight, 2).await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let (admitted, _) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(1)).await;
    assert_eq!(admitted.len(), 5, "a burst of 5 over the fleet");
    import(&redis, "change", &RATE_KEY.replace("120", "1000")).await;
    for addr in &addrs {
        until(*addr, "fleet-secret", 200, Duration::from_secs(10)).await;
    }
    let (admitted, _) = saturate_for(&addrs, "fleet-secret", Duration::from_secs(1)).await;
    assert!(
        admitted.len() > 100,
        "{} admitted under the new limit",
        admitted.len()
    );
}

/// The quota's invariant, under a seeded schedule of Redis restarts while three
/// replicas saturate it: the fleet never admits more than the quota (a token is
/// counted in Redis, which persists every write, before a replica may spend it).
/// Replay a failing run with `LEASE_SEED=<seed> cargo test --features redis --test
/// limits_fleet restarts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_through_redis_restarts() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let seed: u64 = std::env::var("LEASE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let file = QUOTA_KEY.replace("400", "300");
    let replicas = fleet(&redis, "restarts", &file, 3).await;
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let work = tokio::spawn(saturate(addrs.clone(), "fleet-secret", stop.clone()));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100 + next() % 400)).await;
        redis.stop();
        tokio::time::sleep(Duration::from_millis(50 + next() % 400)).await;
        redis.run();
    }
    // Back for good: what is left of the quota is leased and spent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (admitted, _) = work.await.unwrap();
    println!("seed {seed}: {} admitted of a quota of 300", admitted.len());
    assert!(
        admitted.len() <= 300,
        "{} admitted of a quota of 300: replay with LEASE_SEED={seed} cargo test --features redis --test limits_fleet restarts",
        admitted.len()
    );
    assert!(
        !admitted.is_empty(),
        "nothing admitted: replay with LEASE_SEED={seed} cargo test --features redis --test limits_fleet restarts"
    );
}

/// Sends `key` to `addr` until a refusal says the quota is used up (a `Retry-After`
/// other than the moment a spent share waits for the next): how many got in.
async fn spend_quota(addr: SocketAddr, key: &str) -> u64 {
    let (client, start, mut admitted) = (common::client(), Instant::now(), 0);
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{addr}: `{key}` never used up ({admitted} let in)"
        );
        let res = client
            .get(format!("http://{addr}/"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        match res.status().as_u16() {
            200 => admitted += 1,
            429 if res.headers()["retry-after"] == "1" => {
                // The replica's share is on its way (or the quota is starved, and
                // idle replicas' tokens may come back).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            429 => return admitted,
            other => panic!("unexpected {other}"),
        }
    }
}

/// The tokens of `id`'s daily quota the fleet has leased this period, as Redis
/// counts them.
fn leased(redis: &Redis, ns: &str, id: &str) -> u64 {
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let count = redis.cli(&["GET", &format!("tak:{{{ns}}}:lease:{id}:quota:day:{day}")]);
    count.trim().parse().unwrap_or(0)
}

/// A replica with no demand for a key gives its share of the quota back when
/// another replica starves for it: a client of one replica spends a small quota
/// whole, a second or two late. (Each replica used to keep a token or two of every
/// key for good: of a quota of 3, a client of one of two replicas got 2, and was
/// told to come back tomorrow.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_one_replica_spends_a_small_quota_whole() {
    let Some(redis) = Redis::start() else { return };
    let file = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
        quota = { requests = 3, per = \"day\" }\n";
    let replicas = fleet(&redis, "idle", file, 2).await;
    eventually(
        "both replicas leased their first share",
        Duration::from_secs(15),
        || leased(&redis, "idle", "fleet") == 2,
    )
    .await;
    let start = Instant::now();
    assert_eq!(spend_quota(replicas[0].addr, "fleet-secret").await, 3);
    println!(
        "a quota of 3 spent through one replica in {:?}",
        start.elapsed()
    );
    assert_eq!(leased(&redis, "idle", "fleet"), 3);
    assert_eq!(spend_quota(replicas[1].addr, "fleet-secret").await, 0);
}

/// A replica idle for more than a second still holds a token of a quota the fleet
/// has plenty left of: its next request goes in at once. (An idle replica used to
/// give its whole share of a quota under 200 back after a second, and refused its
/// next request with `429`, `Retry-After: 1`: a job using a key once an hour was
/// refused every time first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_answers_its_next_request_at_once() {
    let Some(redis) = Redis::start() else { return };
    let file = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
        quota = { requests = 100, per = \"day\" }\n";
    let replicas = fleet(&redis, "hourly", file, 2).await;
    for r in &replicas {
        until(r.addr, "fleet-secret", 200, Duration::from_secs(15)).await;
    }
    // What is under test is the replicas' idleness itself: longer than the second
    // after which an idle share used to go back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for r in &replicas {
        assert_eq!(status(r.addr, "fleet-secret").await, 200, "{}", r.addr);
    }
}

/// A key file of `n` keys `k0`… (secrets `k0-secret`…), each with a daily quota of
/// `requests`.
fn quota_keys(n: usize, requests: u64) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[keys]]\nid = \"k{i}\"\nsecret = \"k{i}-secret\"\n\
                 quota = {{ requests = {requests}, per = \"day\" }}\n"
            )
        })
        .collect()
}

/// A key whose quota is used up costs Redis nothing while nobody asks for it (every
/// replica used to ask again on each 20 ms tick until the period ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_up_quotas_cost_redis_nothing_while_idle() {
    let Some(redis) = Redis::start() else { return };
    const KEYS: usize = 20;
    let file = quota_keys(KEYS, 1);
    let replicas = fleet(&redis, "usedup", &file, 2).await;
    eventually("the replicas loaded", Duration::from_secs(15), || {
        replicas
            .iter()
            .all(|r| r.store.get(&format!("k{}", KEYS - 1)).is_some())
    })
    .await;
    // Each key used up, and each replica told so (after a second or two in which
    // the other's idle token may come back): the keys side by side.
    let addrs = [replicas[0].addr, replicas[1].addr];
    let spends = (0..KEYS).map(|i| {
        tokio::spawn(async move {
            let key = format!("k{i}-secret");
            spend_quota(addrs[0], &key).await + spend_quota(addrs[1], &key).await
        })
    });
    for (i, spend) in spends.collect::<Vec<_>>().into_iter().enumerate() {
        assert_eq!(spend.await.unwrap(), 1, "k{i}");
    }
    let (before, all, start) = (redis.calls("evalsha"), self::calls(&redis), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = redis.calls("evalsha") - before;
    let secs = start.elapsed().as_secs_f64();
    let all = (self::calls(&redis) - all) as f64 / secs;
    println!(
        "{KEYS} used-up keys on 2 idle replicas: {:.1} EVALSHA/s, {all:.1} commands/s",
        calls as f64 / secs
    );
    // The followers' own scripts aside, no key is asked for: fewer calls than keys.
    assert!(
        calls < KEYS as u64,
        "{calls} EVALSHA in {:?} with {KEYS} used-up keys and no requests",
        start.elapsed()
    );
}

/// Keys used now and then cost Redis about one call a second per replica, however
/// many: an idle replica keeps a token of each, and looks at the namespace's
/// starved quotas once a second in one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keys_cost_redis_a_call_a_second_per_replica() {
    let Some(redis) = Redis::start() else { return };
    const KEYS: usize = 20;
    let file = quota_keys(KEYS, 100);
    let replicas = fleet(&redis, "idlekeys", &file, 2).await;
    // Each key used once on each replica.
    for r in &replicas {
        for i in 0..KEYS {
            until(
                r.addr,
                &format!("k{i}-secret"),
                200,
                Duration::from_secs(15),
            )
            .await;
        }
    }
    // Idle for a second, each share is down to its token: each key's count is the
    // two spent and the two held.
    eventually(
        "the shares down to a token",
        Duration::from_secs(15),
        || (0..KEYS).all(|i| leased(&redis, "idlekeys", &format!("k{i}")) == 4),
    )
    .await;
    let (evalsha, all, start) = (redis.calls("evalsha"), calls(&redis), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let secs = start.elapsed().as_secs_f64();
    let evalsha = (redis.calls("evalsha") - evalsha) as f64 / secs;
    let all = (calls(&redis) - all) as f64 / secs;
    println!("{KEYS} idle keys on 2 replicas: {evalsha:.1} EVALSHA/s, {all:.1} commands/s");
    assert!(
        evalsha < KEYS as f64 / 2.0,
        "{evalsha:.1} EVALSHA/s with {KEYS} idle keys"
    );
    // Their next requests go in at once.
    for r in &replicas {
        for i in 0..KEYS {
            assert_eq!(status(r.addr, &format!("k{i}-secret")).await, 200);
        }
    }
}

/// Every command Redis ran so far (`INFO commandstats`, the `INFO` itself too).
fn calls(redis: &Redis) -> u64 {
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            l.split_once(":calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A tester's finding: a replica refused a request because the fleet had spent the
/// limit (its share empty), while its `RateLimit` field, which counts only what this
/// replica let in, said 6 were left. The limit that refuses says `r=0`.
#[tokio::test]
async fn a_refusal_by_the_fleet_says_nothing_is_left() {
    let Some(redis) = Redis::start() else { return };
    let file = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
                rate_limits = [ { name = \"m\", requests = 10, per = \"60s\" } ]\n";
    let replicas = fleet(&redis, "refusal", file, 2).await;
    let (a, b) = (replicas[0].addr, replicas[1].addr);
    let client = common::client();
    let get = |addr: SocketAddr| {
        client
            .get(format!("http://{addr}/"))
            .bearer_auth("fleet-secret")
            .send()
    };
    // Six let in through A (a spent share waits for the next lease).
    let (mut admitted, start) = (0, Instant::now());
    while admitted < 6 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{admitted} let in"
        );
        match get(a).await.unwrap().status().as_u16() {
            200 => admitted += 1,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // Then B until the fleet refuses it for good: whatever B counted itself, the
    // refusal's field says nothing is left of `m`.
    let start = Instant::now();
    let mut refusals = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let res = get(b).await.unwrap();
        if res.status() == 429 {
            refusals += 1;
            let state = res.headers()["ratelimit"].to_str().unwrap().to_owned();
            assert!(state.starts_with("\"m\";r=0;"), "{state}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refusals > 0, "the fleet never refused B");
}
