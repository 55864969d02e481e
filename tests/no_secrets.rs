//! No secret ever reaches a log line, a `Debug` or `Display` of a public type, or an
//! error: every `tracing` event (at every level) is captured while keys are loaded,
//! reloaded, refused and presented, and every public value is printed. (Its own test
//! binary: it sets the global `tracing` subscriber.)
#![allow(clippy::unwrap_used)]

mod common;

use std::{fs, time::Duration};

use common::{app, get_with, reload_where, serve};
use tower_api_key::{
    ApiKey, ApiKeyLayer, ChannelSource, EnvSource, FileSource, KeyChange, KeySet, KeyStore,
};

const SECRETS: [&str; 10] = [
    "s3cr3t-file-key-0001",
    "s3cr3t-channel-0002",
    "98765432101234",
    "s3cr3t-typed-as-bool",
    "s3cr3t-presented-by-a-client",
    "s3cr3t-duplicate-0003",
    "s3cr3t-in-scopes-0004",
    "s3cr3t-generated-unused",
    "s3cr3t-pasted-as-an-address",
    "s3cr3t-named-as-a-limit",
];

#[tokio::test]
async fn no_secret_reaches_a_log_a_debug_or_an_error() {
    let captured = common::Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let mut printed = Vec::<String>::new();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let good = format!("[[keys]]\nid = \"file\"\nsecret = \"{}\"\n", SECRETS[0]);
    fs::write(&path, &good).unwrap();
    let (channel, publisher) =
        ChannelSource::new(KeySet::from_keys([ApiKey::new("channel", SECRETS[1])]).unwrap());
    let store = KeyStore::new();
    store.add_source(channel).unwrap();
    store
        .add_source(FileSource::new(&path).with_poll_interval(Duration::from_secs(60)))
        .unwrap();
    let mut reloads = store.subscribe();
    let layer = ApiKeyLayer::from_store(store.clone()).hide_credentials(true);
    let addr = serve(app(layer.clone())).await;

    // Refused reloads: a secret in wrongly typed fields, a duplicate, a conflict.
    for bad in [
        format!("[[keys]]\nid = \"a\"\nsecret = {}\n", SECRETS[2]),
        format!("{good}disabled = \"{}\"\n", SECRETS[3]),
        format!("{good}scopes = \"{}\"\n", SECRETS[6]),
        format!(
            "{good}allowed_ips = [\"127.0.0.0/8\", \"{}\"]\n",
            SECRETS[8]
        ),
        format!(
            "{good}rate_limits = [{{ name = \"{}\", requests = 0, per = \"1s\" }}]\n",
            SECRETS[9]
        ),
        format!(
            "{good}rate_limits = [{{ name = \"{0}\", requests = 1, per = \"1s\" }}, \
             {{ name = \"{0}\", requests = 2, per = \"1s\" }}]\n",
            SECRETS[9]
        ),
        format!(
            "{good}[[keys]]\nid = \"b\"\nsecret = \"{}\"\n[[keys]]\nid = \"c\"\nsecret = \"{}\"\n",
            SECRETS[5], SECRETS[5]
        ),
        format!("[[keys]]\nid = \"x\"\nsecret = \"{}\"\n", SECRETS[1]),
    ] {
        let tmp = dir.path().join("incoming");
        fs::write(&tmp, bad).unwrap();
        fs::rename(&tmp, &path).unwrap();
        let report = reload_where(&mut reloads, "a refusal", |r| !r.is_applied()).await;
        printed.push(format!("{report:?} {}", report.error().unwrap()));
        printed.push(format!("{:?}", report.error().unwrap()));
    }
    // Refused changes by id.
    let err = publisher
        .apply([KeyChange::Upsert(ApiKey::new("dup", SECRETS[0]))])
        .unwrap_err();
    printed.push(format!("{err} {err:?}"));
    let err = KeySet::from_keys([ApiKey::new("a", SECRETS[5]), ApiKey::new("b", SECRETS[5])])
        .unwrap_err();
    printed.push(format!("{err} {err:?}"));

    // Requests: a wrong key, a right one, each in both locations.
    assert_eq!(get_with(addr, "/", Some(SECRETS[4])).await.0, 401);
    assert_eq!(get_with(addr, "/", Some(SECRETS[0])).await.0, 200);
    let res = common::client()
        .get(format!("http://{addr}/"))
        .header("authorization", format!("Bearer {}", SECRETS[4]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let verified = store.verify(SECRETS[1]).unwrap();
    let refused = store.verify(SECRETS[4]).unwrap_err();

    // Every public value, printed.
    let generated = tower_api_key::generate("tak").unwrap();
    printed.extend([
        format!("{store:?}"),
        format!("{layer:?}"),
        format!("{verified:?}"),
        format!("{refused:?} {refused}"),
        format!("{:?}", store.keys()),
        format!("{:?}", store.usage()),
        format!("{:?}", store.last_reload()),
        format!("{publisher:?}"),
        format!("{:?}", FileSource::new(&path)),
        format!("{:?}", EnvSource::new("SOME_VAR")),
        format!("{:?}", ApiKey::new("k", SECRETS[7])),
        format!(
            "{:?}",
            KeySet::from_keys([ApiKey::new("k", SECRETS[7])]).unwrap()
        ),
        format!("{:?}", KeyChange::Upsert(ApiKey::new("k", SECRETS[7]))),
        format!("{generated:?}"),
    ]);
    drop((store, layer));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let logs = captured.text();
    assert!(
        logs.contains("api key reload refused"),
        "the refusals were logged"
    );
    assert!(
        logs.contains("request refused"),
        "the refused requests were logged"
    );
    let everything = printed.join("\n") + &logs;
    for secret in SECRETS {
        assert!(
            !everything.contains(secret),
            "`{secret}` leaked:\n{everything}"
        );
    }
    assert!(
        !everything.contains(generated.secret()),
        "a generated secret leaked"
    );
}
