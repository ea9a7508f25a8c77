//! The SQLite backend: the embedded, durable default. One database file holds
//! every topic; several processes may share it (WAL mode, atomic claims), so a
//! consumer group can be spread over processes on one machine.
//!
//! Layout: `sluice_messages` is an append-only log of every topic. Each group
//! has a cursor per subscribed pattern in `sluice_groups`; on fetch, new
//! matching messages become rows of `sluice_deliveries` for that group, which
//! are claimed with one `UPDATE … RETURNING` that pushes their visibility
//! past the lease. Ack deletes the row; nack moves its visibility; a consumer
//! that dies simply lets its lease run out.
//!
//! URL: `sqlite://PATH[?synchronous=normal|full&poll_ms=N]`. `synchronous=full`
//! (the default) fsyncs every commit; `normal` may lose the last commits on a
//! power failure (not on a process crash). `poll_ms` (default 100) bounds how
//! late a consumer notices messages published by another process.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ack_batch::AckBatcher;
use super::{
    Backend, Capabilities, Delivery, Receipt, StartFrom, SubscribeOptions, Subscription, pattern,
};
use crate::message::{Message, now_ms};

/// How many log rows one fetch turns into deliveries at most.
const MATERIALIZE_BATCH: i64 = 2_000;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sluice_messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    msg_key      TEXT,
    headers      TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    timestamp_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sluice_messages_topic ON sluice_messages (topic, seq);
CREATE TABLE IF NOT EXISTS sluice_groups (
    group_name TEXT    NOT NULL,
    pattern    TEXT    NOT NULL,
    cursor     INTEGER NOT NULL,
    PRIMARY KEY (group_name, pattern)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sluice_deliveries (
    group_name TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    attempt    INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    PRIMARY KEY (group_name, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sluice_deliveries_visible ON sluice_deliveries (group_name, visible_at);
"#;

pub struct SqliteBackend {
    shared: Arc<Shared>,
}

/// Messages waiting for the next group commit, with whom to tell.
type PublishQueue = Vec<(Vec<Message>, tokio::sync::oneshot::Sender<Result<()>>)>;

struct Shared {
    pool: SqlitePool,
    queued: Mutex<PublishQueue>,
    /// Held by the publisher committing a batch.
    writer: tokio::sync::Mutex<()>,
    poll: Duration,
    /// Wakes this process's fetchers when it publishes or nacks.
    changed: Notify,
}

/// Where a delivery lives, and which claim of it this is.
struct SqliteReceipt {
    seq: i64,
    attempt: i64,
}

impl SqliteBackend {
    pub async fn connect(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("sqlite://")
            .context("a SQLite URL starts with sqlite://")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path.is_empty() {
            bail!("SQLite URL `{url}` names no file (expected sqlite://PATH)");
        }
        let mut synchronous = SqliteSynchronous::Full;
        let mut poll = Duration::from_millis(100);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("synchronous", value)) => {
                    synchronous = SqliteSynchronous::from_str(value).map_err(|_| {
                        anyhow::anyhow!(
                            "SQLite URL: synchronous must be full or normal, not `{value}`"
                        )
                    })?
                }
                Some(("poll_ms", value)) => {
                    poll = Duration::from_millis(value.parse().with_context(|| {
                        format!("SQLite URL: poll_ms `{value}` is not a number")
                    })?)
                }
                _ => bail!("SQLite URL: unknown parameter `{pair}` (known: synchronous, poll_ms)"),
            }
        }
        let options = SqliteConnectOptions::new()
            .filename(PathBuf::from(path))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(30));
        let pool = open(options, path).await?;
        Ok(SqliteBackend {
            shared: Arc::new(Shared {
                pool,
                queued: Mutex::new(Vec::new()),
                writer: tokio::sync::Mutex::new(()),
                poll,
                changed: Notify::new(),
            }),
        })
    }
}

/// Opens the pool and creates the tables. Switching a file to WAL and
/// creating tables take locks that SQLite's busy timeout does not always
/// wait for when other processes (or pools) open the same file at the same
/// moment, so "database is locked" at open is retried for a while.
async fn open(options: SqliteConnectOptions, path: &str) -> Result<SqlitePool> {
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let result = async {
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options.clone())
                .await
                .with_context(|| format!("cannot open SQLite database `{path}`"))?;
            sqlx::raw_sql(SCHEMA)
                .execute(&pool)
                .await
                .with_context(|| format!("cannot create Sluice tables in `{path}`"))?;
            anyhow::Ok(pool)
        }
        .await;
        match result {
            Err(e) if attempt < 50 && format!("{e:#}").contains("database is locked") => {
                tokio::time::sleep(Duration::from_millis(20 * attempt.min(10))).await;
            }
            other => return other,
        }
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn pending(&self, group_key: &str) -> Result<Option<u64>> {
        // Deliveries the group has taken on and not acknowledged; messages
        // past its cursors are not counted until a fetch reaches them.
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sluice_deliveries WHERE group_name = ?1")
                .bind(group_key)
                .fetch_one(&self.shared.pool)
                .await?;
        Ok(Some(count as u64))
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            persistent: true,
            history: true,
            consumer_groups: true,
            ordered_per_key: true,
            native_delay: true,
            lease: true,
            wildcards: true,
            at_least_once: true,
            lease_checked: false,
        }
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        // Group commit: concurrent publishers queue their messages, and
        // whoever holds the writer lock commits everything queued in one
        // transaction, so N workers share one fsync instead of paying N.
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.shared.queued.lock().unwrap().push((messages, done));
        {
            let _writer = self.shared.writer.lock().await;
            let batch = std::mem::take(&mut *self.shared.queued.lock().unwrap());
            if !batch.is_empty() {
                let result =
                    write_messages(&self.shared.pool, batch.iter().flat_map(|(m, _)| m)).await;
                for (_, done) in batch {
                    let _ = done.send(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| anyhow::anyhow!("{e:#}")),
                    );
                }
                self.shared.changed.notify_waiters();
            }
        }
        outcome.await.context("publish abandoned")?
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        let mut tx = self.shared.pool.begin_with("BEGIN IMMEDIATE").await?;
        for topic in &options.topics {
            let start = match options.start {
                StartFrom::Earliest => "SELECT 0",
                StartFrom::Latest => "SELECT IFNULL(MAX(seq), 0) FROM sluice_messages",
            };
            let cursor: i64 = sqlx::query_scalar(start).fetch_one(&mut *tx).await?;
            sqlx::query(
                "INSERT OR IGNORE INTO sluice_groups (group_name, pattern, cursor) VALUES (?1, ?2, ?3)",
            )
            .bind(options.group_key())
            .bind(topic)
            .bind(cursor)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Box::new(SqliteSubscription {
            shared: self.shared.clone(),
            group: options.group_key(),
            closed: AtomicBool::new(false),
            lease: options.lease,
            ephemeral: options.ephemeral,
            mine: Mutex::new(HashSet::new()),
            acks: sqlite_acks(self.shared.pool.clone(), options.group_key()),
        }))
    }
}

/// Appends messages to the log in one transaction.
async fn write_messages<'a>(
    pool: &SqlitePool,
    messages: impl Iterator<Item = &'a Message>,
) -> Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    for message in messages {
        let headers = serde_json::to_string(&message.headers)?;
        sqlx::query(
            "INSERT INTO sluice_messages (id, topic, msg_key, headers, payload, timestamp_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&message.id)
        .bind(&message.topic)
        .bind(&message.key)
        .bind(headers)
        .bind(&message.payload)
        .bind(message.timestamp_ms as i64)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

struct SqliteSubscription {
    shared: Arc<Shared>,
    /// The group's key (name and topics), as stored in the tables.
    group: String,
    closed: AtomicBool,
    lease: Duration,
    ephemeral: bool,
    /// Claimed and unsettled, released on close.
    mine: Mutex<HashSet<i64>>,
    /// Acks not yet written; see [`AckBatcher`].
    acks: Arc<AckBatcher>,
}

/// Acks written in batches, one transaction (and one fsync) for many.
fn sqlite_acks(pool: SqlitePool, group: String) -> Arc<AckBatcher> {
    let table_group = group.clone();
    AckBatcher::start(
        group,
        Duration::from_millis(5),
        Box::new(move |seqs| {
            let pool = pool.clone();
            let group = table_group.clone();
            Box::pin(async move {
                sqlx::query(
                    "DELETE FROM sluice_deliveries \
                     WHERE group_name = ?1 AND seq IN (SELECT value FROM json_each(?2))",
                )
                .bind(&group)
                .bind(serde_json::to_string(&seqs)?)
                .execute(&pool)
                .await?;
                Ok(())
            })
        }),
    )
}

impl SqliteSubscription {
    /// Turns log rows past the group's cursors into deliveries of the group.
    async fn materialize(&self, tx: &mut sqlx::SqliteConnection) -> Result<()> {
        let cursors: Vec<(String, i64)> =
            sqlx::query_as("SELECT pattern, cursor FROM sluice_groups WHERE group_name = ?1")
                .bind(&self.group)
                .fetch_all(&mut *tx)
                .await?;
        for (topic_pattern, cursor) in cursors {
            let rows: Vec<(i64, String)> = if pattern::is_pattern(&topic_pattern) {
                sqlx::query_as(
                    "SELECT seq, topic FROM sluice_messages WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .bind(cursor)
                .bind(MATERIALIZE_BATCH)
                .fetch_all(&mut *tx)
                .await?
            } else {
                sqlx::query_as(
                    "SELECT seq, topic FROM sluice_messages WHERE topic = ?1 AND seq > ?2 \
                     ORDER BY seq LIMIT ?3",
                )
                .bind(&topic_pattern)
                .bind(cursor)
                .bind(MATERIALIZE_BATCH)
                .fetch_all(&mut *tx)
                .await?
            };
            let Some(&(last, _)) = rows.last() else {
                continue;
            };
            for (seq, topic) in &rows {
                if pattern::matches(&topic_pattern, topic) {
                    sqlx::query(
                        "INSERT OR IGNORE INTO sluice_deliveries (group_name, seq, attempt, visible_at) \
                         VALUES (?1, ?2, 0, 0)",
                    )
                    .bind(&self.group)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            sqlx::query(
                "UPDATE sluice_groups SET cursor = ?1 WHERE group_name = ?2 AND pattern = ?3",
            )
            .bind(last)
            .bind(&self.group)
            .bind(&topic_pattern)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn claim(&self, max: usize) -> Result<Vec<Delivery>> {
        let mut tx = self.shared.pool.begin_with("BEGIN IMMEDIATE").await?;
        self.materialize(&mut tx).await?;
        let now = now_ms() as i64;
        let claimed: Vec<(i64, i64)> = sqlx::query_as(
            "UPDATE sluice_deliveries SET attempt = attempt + 1, visible_at = ?1 \
             WHERE group_name = ?2 AND seq IN ( \
                 SELECT seq FROM sluice_deliveries \
                 WHERE group_name = ?2 AND visible_at <= ?3 ORDER BY seq LIMIT ?4) \
             RETURNING seq, attempt",
        )
        .bind(now + self.lease.as_millis() as i64)
        .bind(&self.group)
        .bind(now)
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await?;
        if claimed.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let seqs = serde_json::to_string(&claimed.iter().map(|(s, _)| *s).collect::<Vec<_>>())?;
        let rows = sqlx::query(
            "SELECT seq, id, topic, msg_key, headers, payload, timestamp_ms FROM sluice_messages \
             WHERE seq IN (SELECT value FROM json_each(?1)) ORDER BY seq",
        )
        .bind(seqs)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        let mut deliveries = Vec::with_capacity(rows.len());
        let attempts: std::collections::HashMap<i64, i64> = claimed.into_iter().collect();
        let mut mine = self.mine.lock().unwrap();
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            let attempt = attempts.get(&seq).copied().unwrap_or(1);
            let headers: String = row.try_get("headers")?;
            let message = Message {
                id: row.try_get("id")?,
                topic: row.try_get("topic")?,
                key: row.try_get("msg_key")?,
                headers: serde_json::from_str(&headers)
                    .with_context(|| format!("message {seq} has malformed headers"))?,
                payload: row.try_get("payload")?,
                timestamp_ms: row.try_get::<i64, _>("timestamp_ms")? as u64,
            };
            mine.insert(seq);
            deliveries.push(Delivery {
                message,
                attempt: attempt as u32,
                receipt: Receipt::new(SqliteReceipt { seq, attempt }),
            });
        }
        Ok(deliveries)
    }
}

impl Drop for SqliteSubscription {
    /// Dropped without `close`: still write what was acknowledged.
    fn drop(&mut self) {
        self.acks.stop_soon();
    }
}

#[async_trait]
impl Subscription for SqliteSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(super::closed_error(&self.group));
            }
            let changed = self.shared.changed.notified();
            let deliveries = self.claim(max.max(1)).await?;
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            // Another process's publishes and due nacks are only seen by polling.
            let until = (now + self.shared.poll).min(give_up);
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let receipt = delivery.receipt.get::<SqliteReceipt>()?;
        self.mine.lock().unwrap().remove(&receipt.seq);
        self.acks.push(receipt.seq);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let receipt = delivery.receipt.get::<SqliteReceipt>()?;
        // Only the current claim may move the visibility: if the lease ran out
        // and another consumer holds the message, this nack is stale.
        sqlx::query(
            "UPDATE sluice_deliveries SET visible_at = ?1 \
             WHERE group_name = ?2 AND seq = ?3 AND attempt = ?4",
        )
        .bind(now_ms() as i64 + delay.as_millis() as i64)
        .bind(&self.group)
        .bind(receipt.seq)
        .bind(receipt.attempt)
        .execute(&self.shared.pool)
        .await?;
        self.mine.lock().unwrap().remove(&receipt.seq);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.acks.stop().await?;
        if self.ephemeral {
            let mut tx = self.shared.pool.begin_with("BEGIN IMMEDIATE").await?;
            sqlx::query("DELETE FROM sluice_deliveries WHERE group_name = ?1")
                .bind(&self.group)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM sluice_groups WHERE group_name = ?1")
                .bind(&self.group)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(());
        }
        let mine: Vec<i64> = self.mine.lock().unwrap().drain().collect();
        if !mine.is_empty() {
            sqlx::query(
                "UPDATE sluice_deliveries SET visible_at = 0 \
                 WHERE group_name = ?1 AND seq IN (SELECT value FROM json_each(?2))",
            )
            .bind(&self.group)
            .bind(serde_json::to_string(&mine)?)
            .execute(&self.shared.pool)
            .await?;
            self.shared.changed.notify_waiters();
        }
        Ok(())
    }
}
