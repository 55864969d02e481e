//! How `PostgresBackend` writes: one transaction per call (the namespace's row
//! locked, the records, the version, the change rows, the wake-up), and how a write
//! whose answer was lost is settled, so that a caller learns what happened.

use std::collections::HashMap;

use tokio_postgres::{Client, Transaction};

use super::{
    PgError, PostgresBackend, model,
    plan::{Op, Plan},
    read,
};
use crate::{Error, admin::BackendError};

/// How a transaction ended, when PostgreSQL answered.
pub(super) enum Step {
    Done,
    Missing,
    Refused(BackendError),
}

impl PostgresBackend {
    /// Runs a write in one transaction; a lost answer is settled (see the type's
    /// docs).
    pub(super) async fn transact(&self, plan: &Plan<'_>) -> Result<(), BackendError> {
        for _ in 0..2 {
            let mut writer = self.writer.lock().await;
            let client = match self.connected(&mut writer).await {
                Ok(client) => client,
                Err(e) => return Err(self.unavailable(&e)),
            };
            let nonce = model::random_id();
            let ran = super::within(self.timeout, self.body(client, plan, &nonce)).await;
            match ran {
                Ok(Step::Done) => return Ok(()),
                Ok(Step::Missing) => return Err(self.missing()),
                Ok(Step::Refused(e)) => return Err(e),
                // PostgreSQL answered with an error: the transaction rolled back.
                // (The dropped transaction sent its ROLLBACK.)
                Err(e) if super::answered(&e) => return Err(self.unavailable(&e)),
                Err(e) => {
                    *writer = None;
                    drop(writer);
                    match self.settle(&nonce).await {
                        Ok(true) => return Ok(()),
                        Ok(false) => self.log(&e, "it never will: trying once more"),
                        Err(_) => {
                            self.log(&e, "the write may or may not have happened");
                            return Err(BackendError::OutcomeUnknown(Box::new(Error::custom(
                                self.name(),
                                super::describe(&e),
                            ))));
                        }
                    }
                }
            }
        }
        Err(BackendError::Unavailable(Box::new(self.error(
            "PostgreSQL did not answer the write twice; nothing was written",
        ))))
    }

    /// Whether the write with this nonce happened; if it did not, it never will.
    async fn settle(&self, nonce: &str) -> Result<bool, PgError> {
        let (client, connection) = self.target.connect(self.timeout, super::Role::Api).await?;
        tokio::spawn(connection);
        let wait = self.timeout * 2;
        super::within(wait, async {
            let client = &client;
            client
                .batch_execute(&format!("SET statement_timeout = {}", wait.as_millis()))
                .await?;
            if client.query_opt(model::FENCE, &[&nonce]).await?.is_some() {
                return Ok(false);
            }
            let state: Option<String> = client
                .query_opt(model::MARKED, &[&nonce])
                .await?
                .map(|row| row.try_get(0))
                .transpose()?;
            Ok::<_, PgError>(state.as_deref() == Some("done"))
        })
        .await
    }

    /// The transaction of a write.
    async fn body(
        &self,
        client: &mut Client,
        plan: &Plan<'_>,
        nonce: &str,
    ) -> Result<Step, PgError> {
        let tx = client.transaction().await?;
        // The server gives up on a lock before the caller does: a write held up by
        // another transaction is then answered as not written.
        let limit = (self.timeout * 3 / 4).as_millis().max(1);
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {limit}; SET LOCAL statement_timeout = {limit}"
        ))
        .await?;
        tx.execute(model::MARK, &[&nonce]).await?;
        let head = tx.query_opt(model::LOCK_HEAD, &[&self.namespace]).await?;
        let head = match head {
            Some(row) => Some(read::Head {
                epoch: row.try_get(0)?,
                version: row.try_get(1)?,
                keys: row.try_get(2)?,
            }),
            None => None,
        };
        let ns = &self.namespace;
        match (plan, head) {
            (Plan::Change { .. }, None) => return Ok(Step::Missing),
            (Plan::Change { ids, decide }, Some(head)) => {
                if emptied(&tx, ns, &head).await? {
                    return Ok(Step::Missing);
                }
                let rows = tx.query(model::SOME_LOCKED, &[ns, ids]).await?;
                let mut current = HashMap::new();
                for row in rows {
                    current.insert(row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?);
                }
                let ops = match decide(&current) {
                    Ok(ops) => ops,
                    Err(e) => return Ok(Step::Refused(e)),
                };
                write_ops(&tx, ns, &head, &ops).await?;
            }
            (Plan::Import(records), Some(head)) => {
                if emptied(&tx, ns, &head).await? {
                    return Ok(Step::Missing);
                }
                let ops: Vec<Op> = records
                    .iter()
                    .map(|(id, r)| Op {
                        id: id.clone(),
                        record: Some(r.clone()),
                    })
                    .collect();
                write_ops(&tx, ns, &head, &ops).await?;
            }
            (Plan::Import(records) | Plan::Restore(records), head) => {
                tx.execute("DELETE FROM tak_keys WHERE namespace = $1", &[ns])
                    .await?;
                let ids: Vec<&str> = records.iter().map(|(i, _)| i.as_str()).collect();
                tx.execute(
                    "DELETE FROM tak_usage WHERE namespace = $1 AND NOT id = ANY($2::text[])",
                    &[ns, &ids],
                )
                .await?;
                for chunk in records.chunks(model::CHUNK) {
                    let ids: Vec<&str> = chunk.iter().map(|(i, _)| i.as_str()).collect();
                    let rs: Vec<&str> = chunk.iter().map(|(_, r)| r.as_str()).collect();
                    tx.execute(model::PUT, &[ns, &ids, &rs]).await?;
                }
                let version = head.map_or(0, |h| h.version) + 1;
                let epoch = model::random_id();
                tx.execute(
                    "INSERT INTO tak_namespaces (namespace, epoch, version, keys) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (namespace) DO UPDATE SET \
                     epoch = EXCLUDED.epoch, version = EXCLUDED.version, keys = EXCLUDED.keys",
                    &[ns, &epoch, &version, &(records.len() as i64)],
                )
                .await?;
                tx.execute("DELETE FROM tak_changes WHERE namespace = $1", &[ns])
                    .await?;
                let (ops, ids, rs): (Vec<&str>, Vec<Option<&str>>, Vec<Option<&str>>) =
                    (vec!["reset"], vec![None], vec![None]);
                tx.execute(
                    model::LOG,
                    &[ns, &version, &1i32, &epoch, &ops, &ids, &rs, &0i32],
                )
                .await?;
                tx.execute(model::NOTIFY, &[ns]).await?;
            }
        }
        if nonce.ends_with('0') {
            // One write in sixteen forgets the markers older than an hour.
            tx.execute(model::FORGET_MARKS, &[]).await?;
        }
        tx.commit().await?;
        Ok(Step::Done)
    }
}

/// Whether the namespace's keys table was emptied under its row (`TRUNCATE`): the
/// row counts keys, the table holds none. Wiped, as the replicas read it (they keep
/// their keys and follow no further): a change or an import written on top would be
/// answered and never enforced, and the keys they still let in could not be
/// revoked (not found). Only `restore` writes over it.
async fn emptied(tx: &Transaction<'_>, ns: &String, head: &read::Head) -> Result<bool, PgError> {
    if head.keys <= 0 {
        return Ok(false);
    }
    let any: bool = tx.query_one(model::ANY_KEY, &[ns]).await?.try_get(0)?;
    Ok(!any)
}

/// Writes `ops` as the namespace's next version: records, count, change rows,
/// pruning, and the wake-up.
async fn write_ops(
    tx: &Transaction<'_>,
    ns: &String,
    head: &read::Head,
    ops: &[Op],
) -> Result<(), PgError> {
    let mut delta = 0i64;
    let puts: Vec<&Op> = ops.iter().filter(|o| o.record.is_some()).collect();
    for chunk in puts.chunks(model::CHUNK) {
        let ids: Vec<&str> = chunk.iter().map(|o| o.id.as_str()).collect();
        let rs: Vec<&str> = chunk.iter().filter_map(|o| o.record.as_deref()).collect();
        for row in tx.query(model::PUT, &[ns, &ids, &rs]).await? {
            if row.try_get::<_, bool>(0)? {
                delta += 1;
            }
        }
    }
    let dels: Vec<&str> = ops
        .iter()
        .filter(|o| o.record.is_none())
        .map(|o| o.id.as_str())
        .collect();
    if !dels.is_empty() {
        delta -= tx.query(model::DEL, &[ns, &dels]).await?.len() as i64;
        // The fleet's counts of a key removed go with it: the table stays bounded.
        tx.execute(model::FORGET_USAGE, &[ns, &dels]).await?;
    }
    let version = head.version + 1;
    tx.execute(model::BUMP, &[ns, &version, &delta]).await?;
    for (at, chunk) in ops.chunks(model::CHUNK).enumerate() {
        let kinds: Vec<&str> = chunk
            .iter()
            .map(|o| if o.record.is_some() { "put" } else { "del" })
            .collect();
        let ids: Vec<Option<&str>> = chunk.iter().map(|o| Some(o.id.as_str())).collect();
        let rs: Vec<Option<&str>> = chunk.iter().map(|o| o.record.as_deref()).collect();
        let n = ops.len() as i32;
        let first = (at * model::CHUNK) as i32;
        tx.execute(
            model::LOG,
            &[ns, &version, &n, &head.epoch, &kinds, &ids, &rs, &first],
        )
        .await?;
    }
    tx.execute(model::PRUNE, &[ns, &(version - model::KEEP_VERSIONS)])
        .await?;
    tx.execute(model::NOTIFY, &[ns]).await?;
    Ok(())
}
