//! Reports in order: with several sources publishing at once and a log pipeline that
//! is slow now and then, `last_reload()` ends on the live version and every
//! subscriber sees versions rise. (Its own test binary: it sets the global
//! `tracing` subscriber.)
#![allow(clippy::unwrap_used)]

use std::{thread, time::Duration};

use tower_api_key::{ApiKey, ChannelSource, KeySet, KeyStore};
use tracing_subscriber::{Layer, layer::Context, prelude::*};

/// A log pipeline that stalls on some reload events.
struct Slow;

impl<S: tracing::Subscriber> Layer<S> for Slow {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() == "tower_api_key::reload" {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            if nanos.is_multiple_of(3) {
                thread::sleep(Duration::from_millis(u64::from(nanos % 4)));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_reload_and_subscribers_follow_the_live_version() {
    tracing_subscriber::registry().with(Slow).init();
    let store = KeyStore::new();
    let mut publishers = Vec::new();
    for p in 0..4 {
        let (source, publisher) = ChannelSource::new(KeySet::new());
        store.add_source(source.with_name(format!("p{p}"))).unwrap();
        publishers.push(publisher);
    }
    let mut reloads = store.subscribe();
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(report) = reloads.next().await {
            if let Some(version) = report.version() {
                seen.push(version);
            }
            if seen.last() == Some(&404) {
                break;
            }
        }
        seen
    });
    let threads: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, publisher)| {
            thread::spawn(move || {
                for i in 0..100 {
                    let key = ApiKey::new(format!("p{p}-{i}"), format!("secret-{p}-{i}"));
                    publisher
                        .publish(KeySet::from_keys([key]).unwrap())
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.version(), 404);
    assert_eq!(store.last_reload().unwrap().version(), Some(404));
    let seen = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .unwrap()
        .unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&404));
}
