//! One key changed in a large set: how long `KeyUpdater::apply` (through a
//! `ChannelSource`) takes to make a one-key change live, at 10,000 and 1,000,000 keys,
//! and how long a whole-set publish that changes one key takes at 1,000,000.
//!
//! Run: `cargo bench --bench change` (about half a minute; ~1 GiB for the 1M set).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tower_api_key::{ApiKey, ChannelSource, KeyChange, KeySet, KeyStore};

const CHANGES: usize = 200;

fn key(i: usize) -> ApiKey {
    ApiKey::new(format!("key-{i:07}"), format!("tak_{i:0>36}")).with_scopes(["read"])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what}: p50 {:?}, p99 {:?}, max {:?} ({} changes)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1],
        times.len()
    );
}

fn main() {
    for n in [10_000, 1_000_000] {
        let start = Instant::now();
        let set = KeySet::from_keys((0..n).map(key)).unwrap();
        let built = start.elapsed();
        let (source, publisher) = ChannelSource::new(set);
        let store = KeyStore::new();
        let start = Instant::now();
        store.add_source(source).unwrap();
        println!(
            "{n} keys: set built in {built:?}, loaded into an empty store in {:?}",
            start.elapsed()
        );
        let mut times = Vec::with_capacity(CHANGES);
        for c in 0..CHANGES {
            let i = (c * 7_919) % n;
            let rotated = ApiKey::new(format!("key-{i:07}"), format!("rotated-{c}-{i}"));
            let start = Instant::now();
            publisher.apply([KeyChange::Upsert(rotated)]).unwrap();
            times.push(start.elapsed());
            assert!(store.verify(format!("rotated-{c}-{i}")).is_ok());
        }
        report(&format!("{n} keys, one key rotated with apply"), times);
        let mut times = Vec::with_capacity(CHANGES);
        for c in 0..CHANGES {
            let id = format!("added-{c}");
            let start = Instant::now();
            publisher
                .apply([KeyChange::Upsert(ApiKey::new(&*id, format!("s-{id}")))])
                .unwrap();
            times.push(start.elapsed());
        }
        report(&format!("{n} keys, one key added with apply"), times);
        if n == 1_000_000 {
            // A whole set that differs by one key: the diff finds it.
            let mut keys: Vec<ApiKey> = (0..n).map(key).collect();
            keys.push(ApiKey::new("one-more", "s-one-more"));
            let set = KeySet::from_keys(keys).unwrap();
            let start = Instant::now();
            let report = publisher.publish(set).unwrap();
            println!(
                "{n} keys, whole-set publish of the set plus one key: {:?} ({} added, {} changed, {} removed)",
                start.elapsed(),
                report.added().len(),
                report.changed().len(),
                report.removed().len()
            );
        }
    }
}
