//! The backend's connection to Redis: made on demand and again after a failure,
//! probed before a write when it has been idle, and how a write whose answer was
//! lost is settled, so that a caller learns what happened.

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;
use tokio::sync::Mutex;

use super::model::{self, FENCE_TTL, Keys};
use crate::{Error, admin::BackendError};

/// How long a connection may sit idle before a write checks it is still open: a
/// write sent on a connection that is already closed would be a write whose fate is
/// unknown, where a probe makes it one that certainly was not sent.
const PROBE_AFTER: Duration = Duration::from_millis(100);

/// How a write sent to Redis ended.
pub(super) enum Sent<T> {
    /// Redis answered it.
    Answered(T),
    /// Its answer was lost, and its marker says it happened.
    Happened,
}

pub(super) struct Link {
    client: redis::Client,
    /// The source name errors carry (`redis:<namespace>`).
    name: String,
    timeout: Duration,
    con: Mutex<Slot>,
    check: redis::Script,
    /// When the link was made, and when Redis last answered (ms after that).
    born: Instant,
    answered: AtomicU64,
}

/// The shared connection, and which one it is (so that a failure drops only the
/// connection that failed, not one another call made since).
#[derive(Default)]
struct Slot {
    con: Option<MultiplexedConnection>,
    generation: u64,
}

impl Link {
    pub(super) fn new(client: redis::Client, name: String) -> Self {
        Self {
            client,
            name,
            timeout: Duration::from_secs(2),
            con: Mutex::new(Slot::default()),
            check: redis::Script::new(model::CHECK_WRITE),
            born: Instant::now(),
            answered: AtomicU64::new(0),
        }
    }

    pub(super) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long a `done` marker is kept: longer than a write can take to be settled.
    pub(super) fn marker_ttl(&self) -> u64 {
        (self.timeout * 10).max(Duration::from_secs(60)).as_millis() as u64
    }

    /// Runs a command that changes nothing (or that can be repeated as it is). A
    /// connection found broken is made again and the command tried once more; a
    /// Redis that does not answer in time is not asked twice.
    pub(super) async fn read<T, F>(
        &self,
        f: impl Fn(MultiplexedConnection) -> F,
    ) -> Result<T, BackendError>
    where
        F: Future<Output = Result<T, redis::RedisError>>,
    {
        let mut attempt = 0;
        loop {
            let (con, generation) = self.connection().await.map_err(|e| self.unavailable(&e))?;
            match f(con).await {
                Ok(out) => {
                    self.touch();
                    return Ok(out);
                }
                Err(e) if answered(&e) => return Err(self.unavailable(&e)),
                Err(e) => {
                    self.drop_connection(generation).await;
                    attempt += 1;
                    if e.is_timeout() || attempt > 1 {
                        return Err(self.unavailable(&e));
                    }
                }
            }
        }
    }

    /// Sends a write, marked with a fresh marker of `keys` that the write's script
    /// sets to `done` as it writes. A lost answer is settled on a fresh connection:
    /// the write happened, or it is fenced (it never will) and sent once more.
    ///
    /// [`BackendError::Unavailable`] only when nothing was written,
    /// [`BackendError::OutcomeUnknown`] when Redis cannot be asked.
    pub(super) async fn write<T, F>(
        &self,
        keys: &Keys,
        send: impl Fn(MultiplexedConnection, String) -> F,
    ) -> Result<Sent<T>, BackendError>
    where
        F: Future<Output = Result<T, redis::RedisError>>,
    {
        for _ in 0..2 {
            let (con, generation) = self
                .live_connection()
                .await
                .map_err(|e| self.unavailable(&e))?;
            let marker = keys.marker(&model::random_id());
            match send(con, marker.clone()).await {
                Ok(reply) => {
                    self.touch();
                    return Ok(Sent::Answered(reply));
                }
                // Redis answered with an error: the script wrote nothing (it checks
                // everything before its first write).
                Err(e) if answered(&e) => return Err(self.unavailable(&e)),
                Err(e) => {
                    self.drop_connection(generation).await;
                    match self.settle(&marker).await {
                        Ok(true) => return Ok(Sent::Happened),
                        Ok(false) => self.log(&e, "it never will: trying once more"),
                        Err(_) => return Err(self.outcome_unknown(&e)),
                    }
                }
            }
        }
        Err(BackendError::Unavailable(Box::new(Error::custom(
            self.name.clone(),
            "Redis did not answer the write twice; nothing was written",
        ))))
    }

    /// Whether the write with this marker happened; if it did not, it never will.
    async fn settle(&self, marker: &str) -> Result<bool, redis::RedisError> {
        let (mut con, generation) = self.connection().await?;
        let reply = self
            .check
            .key(marker)
            .arg(FENCE_TTL.as_millis() as u64)
            .invoke_async::<i64>(&mut con)
            .await;
        if reply.as_ref().is_err_and(|e| !answered(e)) {
            self.drop_connection(generation).await;
        }
        let ran = reply? == 1;
        self.touch();
        Ok(ran)
    }

    /// The shared connection, made (or made again after a failure) on demand.
    async fn connection(&self) -> Result<(MultiplexedConnection, u64), redis::RedisError> {
        let mut slot = self.con.lock().await;
        if let Some(con) = &slot.con {
            return Ok((con.clone(), slot.generation));
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let con = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        slot.con = Some(con.clone());
        Ok((con, slot.generation))
    }

    /// The shared connection, checked with a `PING` if it has been idle: a
    /// connection Redis closed is found closed before a write is sent on it, and
    /// made again.
    async fn live_connection(&self) -> Result<(MultiplexedConnection, u64), redis::RedisError> {
        let (mut con, generation) = self.connection().await?;
        let idle = self
            .born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.answered.load(Ordering::Relaxed)));
        if idle < PROBE_AFTER {
            return Ok((con, generation));
        }
        match redis::cmd("PING").query_async::<()>(&mut con).await {
            Ok(()) => {
                self.touch();
                Ok((con, generation))
            }
            Err(e) if answered(&e) => Err(e),
            Err(_) => {
                self.drop_connection(generation).await;
                let fresh = self.connection().await?;
                self.touch();
                Ok(fresh)
            }
        }
    }

    /// Notes that Redis answered.
    fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.answered.fetch_max(ms, Ordering::Relaxed);
    }

    /// Forgets connection `generation`: the next call makes a new one.
    async fn drop_connection(&self, generation: u64) {
        let mut slot = self.con.lock().await;
        if slot.generation == generation {
            slot.con = None;
            slot.generation += 1;
        }
    }

    /// A failure that changed nothing. Redis's own text is logged, not passed on.
    pub(super) fn unavailable(&self, e: &redis::RedisError) -> BackendError {
        self.log(e, "nothing was written");
        BackendError::Unavailable(Box::new(Error::custom(
            self.name.clone(),
            super::describe(e),
        )))
    }

    /// A write whose answer was lost, and that could not be settled.
    fn outcome_unknown(&self, e: &redis::RedisError) -> BackendError {
        self.log(e, "the write may or may not have happened");
        BackendError::OutcomeUnknown(Box::new(Error::custom(
            self.name.clone(),
            super::describe(e),
        )))
    }

    fn log(&self, e: &redis::RedisError, what: &str) {
        #[cfg(feature = "tracing")]
        tracing::warn!(target: "tower_api_key::redis", source = %self.name, error = %e, "a Redis command failed; {what}");
        #[cfg(not(feature = "tracing"))]
        let _ = (e, what);
    }
}

/// Whether Redis answered (with an error), as opposed to not at all.
fn answered(e: &redis::RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Server(_))
        || e.kind() == redis::ErrorKind::AuthenticationFailed
}
