//! Reading a namespace: where it is (its row), whole (every record, in one
//! snapshot with its row), or from a version on (the change table).

use std::{sync::mpsc, thread};

use tokio_postgres::{Client, IsolationLevel, Row};

use super::{PgError, model};
use crate::{
    ApiKey, Error, KeySet,
    key::record,
    source::replica::{self, Clashed},
};

/// Where a replica is: the namespace's epoch and the last version it applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) epoch: String,
    pub(crate) version: i64,
}

/// The namespace's row.
pub(crate) struct Head {
    pub(crate) epoch: String,
    pub(crate) version: i64,
    pub(crate) keys: i64,
}

/// What a whole read found.
pub(crate) enum Whole {
    /// The readable keys, where they leave the follower, and the ids left out for a
    /// digest two of them claim.
    Read(KeySet, Cursor, Clashed),
    /// No row for the namespace, or no tables: wiped, or never created.
    Missing(&'static str),
    /// The records do not match the row: the keys table emptied or cut by hand.
    Damaged(String),
}

/// One change of a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Put { id: String, record: String },
    Del(String),
}

/// What reading the change table found.
pub(crate) enum Since {
    /// Nothing new.
    Nothing,
    /// Every version after the cursor's, whole, up to the row's.
    Changes(Vec<Change>, Cursor),
    /// The change table cannot explain where the namespace is: read it whole.
    Resync(&'static str),
    Missing(&'static str),
}

const NO_ROW: &str = "the namespace has no row in `tak_namespaces` (wiped, or never created)";
const NO_TABLES: &str = "the fleet's tables are missing (dropped, or never migrated)";

/// The namespace's row, if any.
pub(crate) async fn head(
    client: &impl tokio_postgres::GenericClient,
    namespace: &str,
) -> Result<Option<Head>, PgError> {
    let row = client.query_opt(model::HEAD, &[&namespace]).await?;
    Ok(match row {
        Some(row) => Some(Head {
            epoch: row.try_get(0)?,
            version: row.try_get(1)?,
            keys: row.try_get(2)?,
        }),
        None => None,
    })
}

/// The whole namespace, read in one snapshot with its row. A record that cannot be
/// read is left out (its key refused), logged at `error` with its id.
pub(crate) async fn whole(
    client: &mut Client,
    namespace: &str,
    source: &str,
) -> Result<Whole, PgError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let head = match head(&tx, namespace).await {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(Whole::Missing(NO_ROW)),
        Err(e) if super::no_tables(&e) => return Ok(Whole::Missing(NO_TABLES)),
        Err(e) => return Err(e),
    };
    let rows = match tx.query_raw(model::ALL, [namespace]).await {
        Ok(rows) => rows,
        Err(e) if super::undefined_table(&e) => return Ok(Whole::Missing(NO_TABLES)),
        Err(e) => return Err(e.into()),
    };
    // Rows are decoded by worker threads while they arrive, and put in the set by
    // another: the initial load is what a replica waits for before it serves.
    let mut pipeline = Pipeline::start(source);
    let mut rows = std::pin::pin!(rows);
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut read = 0usize;
    while let Some(row) = futures_util::StreamExt::next(&mut rows).await {
        chunk.push(row?);
        read += 1;
        if chunk.len() == CHUNK {
            pipeline.send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)));
        }
    }
    pipeline.send(chunk);
    tx.commit().await?;
    let (set, clashed) = pipeline.finish();
    if read as i64 != head.keys {
        return Ok(Whole::Damaged(format!(
            "the keys table holds {read} records of the namespace where its row counts {} \
             (emptied or changed by hand?); keeping the last good keys until it is restored",
            head.keys
        )));
    }
    Ok(Whole::Read(
        set,
        Cursor {
            epoch: head.epoch,
            version: head.version,
        },
        clashed,
    ))
}

/// The changes after `cursor`, read in one snapshot with the namespace's row,
/// checked to be every version up to the row's, whole, of its epoch.
pub(crate) async fn since(
    client: &mut Client,
    namespace: &str,
    cursor: &Cursor,
) -> Result<Since, PgError> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let head = match head(&tx, namespace).await {
        Ok(Some(head)) => head,
        Ok(None) => return Ok(Since::Missing(NO_ROW)),
        Err(e) if super::no_tables(&e) => return Ok(Since::Missing(NO_TABLES)),
        Err(e) => return Err(e),
    };
    if head.epoch != cursor.epoch {
        return Ok(Since::Resync(
            "the namespace was created again (a new epoch)",
        ));
    }
    if head.version < cursor.version {
        return Ok(Since::Resync("the namespace's version went back"));
    }
    if head.version == cursor.version {
        tx.commit().await?;
        return Ok(Since::Nothing);
    }
    if head.version - cursor.version > model::KEEP_VERSIONS {
        return Ok(Since::Resync(
            "the replica is further behind than the changes kept",
        ));
    }
    let rows = match tx
        .query(model::CHANGES, &[&namespace, &cursor.version])
        .await
    {
        Ok(rows) => rows,
        Err(e) if super::undefined_table(&e) => {
            return Ok(Since::Resync("the change table is missing"));
        }
        Err(e) => return Err(e.into()),
    };
    tx.commit().await?;
    Ok(match changes(&rows, cursor, &head) {
        Ok(changes) => Since::Changes(
            changes,
            Cursor {
                epoch: head.epoch,
                version: head.version,
            },
        ),
        Err(why) => Since::Resync(why),
    })
}

/// The changes of `rows`, if they are every version after `cursor` up to `head`'s,
/// each whole (`n` rows numbered 0 to n - 1), of its epoch, of known operations.
fn changes(rows: &[Row], cursor: &Cursor, head: &Head) -> Result<Vec<Change>, &'static str> {
    const GAP: &str = "the change table misses changes (pruned, truncated or edited)";
    let mut out = Vec::with_capacity(rows.len());
    let mut expect = (cursor.version + 1, 0i32);
    let mut size = 0i32;
    for row in rows {
        let read = || -> Result<_, tokio_postgres::Error> {
            Ok((
                row.try_get::<_, i64>(0)?,
                row.try_get::<_, i32>(1)?,
                row.try_get::<_, i32>(2)?,
                row.try_get::<_, &str>(3)?,
                row.try_get::<_, &str>(4)?,
                row.try_get::<_, Option<&str>>(5)?,
                row.try_get::<_, Option<&str>>(6)?,
            ))
        };
        let (version, seq, n, epoch, op, id, record) =
            read().map_err(|_| "the change table has columns of the wrong type")?;
        if expect.1 == 0 && version == expect.0 {
            size = n;
        }
        if version != expect.0 || seq != expect.1 || n != size || n < 1 {
            return Err(GAP);
        }
        if epoch != head.epoch {
            return Err("a change of another epoch");
        }
        out.push(match (op, id, record) {
            ("put", Some(id), Some(record)) => Change::Put {
                id: id.to_owned(),
                record: record.to_owned(),
            },
            ("del", Some(id), _) => Change::Del(id.to_owned()),
            ("reset", ..) => return Err("the namespace was created again"),
            _ => return Err("a change of an unknown kind"),
        });
        expect = if seq + 1 == n {
            (version + 1, 0)
        } else {
            (version, seq + 1)
        };
    }
    if expect != (head.version + 1, 0) {
        return Err(GAP);
    }
    Ok(out)
}

/// Rows per chunk handed to a decoding worker.
const CHUNK: usize = 16_384;

/// Chunks of rows, decoded by worker threads and put, in order, in a [`KeySet`] by
/// another. A record that cannot be read, or that shares its digest with another
/// (one secret under two ids: which is meant?), is left out, so that its key is
/// refused; each is logged at `error` with its id.
struct Pipeline {
    chunks: Option<mpsc::SyncSender<(usize, Vec<Row>)>>,
    sent: usize,
    set: Option<thread::JoinHandle<(KeySet, Vec<String>)>>,
    /// What the work would be done with if no thread could start.
    source: String,
    fallback: Vec<Vec<Row>>,
}

type Decoded = Vec<(String, Result<ApiKey, Error>)>;

impl Pipeline {
    fn start(source: &str) -> Self {
        let workers = thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, 4);
        let (chunks, work) = mpsc::sync_channel::<(usize, Vec<Row>)>(2 * workers);
        let work = std::sync::Arc::new(std::sync::Mutex::new(work));
        let (done, decoded) = mpsc::channel::<(usize, Decoded)>();
        let mut started = 0;
        for _ in 0..workers {
            let (work, done) = (work.clone(), done.clone());
            let spawned = thread::Builder::new()
                .name("tower-api-key-decode".into())
                .spawn(move || {
                    loop {
                        let next = match work.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((at, rows)) = next else { return };
                        if done.send((at, decode_all(&rows))).is_err() {
                            return;
                        }
                        // A million rows: freed here, off the path to serving.
                        drop(rows);
                    }
                });
            started += usize::from(spawned.is_ok());
        }
        drop(done);
        let name = source.to_owned();
        let set = (started > 0)
            .then(|| {
                thread::Builder::new()
                    .name("tower-api-key-load".into())
                    .spawn(move || insert_in_order(&decoded, &name))
                    .ok()
            })
            .flatten();
        Self {
            chunks: set.as_ref().map(|_| chunks),
            sent: 0,
            set,
            source: source.to_owned(),
            fallback: Vec::new(),
        }
    }

    fn send(&mut self, rows: Vec<Row>) {
        if rows.is_empty() {
            return;
        }
        match &self.chunks {
            Some(tx) => {
                if let Err(mpsc::SendError((_, rows))) = tx.send((self.sent, rows)) {
                    self.fallback.push(rows);
                }
                self.sent += 1;
            }
            None => self.fallback.push(rows),
        }
    }

    fn finish(mut self) -> (KeySet, Clashed) {
        drop(self.chunks.take());
        let (mut set, mut shared) = self
            .set
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        // Rows no thread took (none could start): decoded here.
        for rows in std::mem::take(&mut self.fallback) {
            insert(&mut set, decode_all(&rows), &self.source, &mut shared);
        }
        replica::without_shared(set, shared)
    }
}

/// Puts the decoded chunks in a set, in the order they were read.
/// Returns the ids of the records that share a digest, each holder (they are left
/// out once every row is in).
fn insert_in_order(
    decoded: &mpsc::Receiver<(usize, Decoded)>,
    source: &str,
) -> (KeySet, Vec<String>) {
    let mut set = KeySet::new();
    let mut shared = Vec::new();
    let mut waiting = std::collections::BTreeMap::new();
    let mut next = 0;
    for (at, keys) in decoded {
        waiting.insert(at, keys);
        while let Some(keys) = waiting.remove(&next) {
            insert(&mut set, keys, source, &mut shared);
            next += 1;
        }
    }
    for (_, keys) in waiting {
        insert(&mut set, keys, source, &mut shared);
    }
    (set, shared)
}

fn insert(set: &mut KeySet, keys: Decoded, source: &str, shared: &mut Vec<String>) {
    for (id, key) in keys {
        if let Err(error) = key.and_then(|key| set.insert(key)) {
            replica::refused(source, "PostgreSQL", &id, &error);
            if let Error::DuplicateKey { first, second } = error {
                shared.extend([first, second]);
            }
        }
    }
}

/// The keys of rows (id, record), in order, with their ids.
fn decode_all(rows: &[Row]) -> Vec<(String, Result<ApiKey, Error>)> {
    rows.iter()
        .map(
            |row| match (row.try_get::<_, &str>(0), row.try_get::<_, &str>(1)) {
                (Ok(id), Ok(json)) => (id.to_owned(), record::decode_valid(id, json.as_bytes())),
                (id, _) => {
                    let id = id.map(str::to_owned).unwrap_or_default();
                    let error =
                        Error::invalid(Some(&id), "the stored row has columns of the wrong type");
                    (id, Err(error))
                }
            },
        )
        .collect()
}
