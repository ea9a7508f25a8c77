//! The SQLite backend: the embedded, durable default. One database file holds
//! every topic; several processes may share it (WAL mode, atomic claims), so a
//! consumer group can be spread over processes on one machine.
//!
//! Layout: `sluice_messages` is an append-only log of every topic. Each group
//! has a cursor per subscribed pattern in `sluice_groups`; on fetch, new
//! matching messages become rows of `sluice_deliveries` for that group, which
//! are claimed with one `UPDATE … RETURNING` that bumps their attempt and
//! pushes their visibility past the lease. Ack deletes the row and nack moves
//! its visibility, both only while the claim is still the current one (same
//! attempt); a consumer that dies simply lets its lease run out.
//!
//! Every write of a process goes through one writer (`writer.rs`), which
//! commits whatever publishes, claims and settlements queued up meanwhile in
//! one transaction. A route whose input and output are this same backend
//! publishes its outputs and acks its input in one transaction
//! ([`Subscription::publish_and_ack`]), so processing within the file is
//! exactly once.
//!
//! URL: `sqlite://PATH[?synchronous=normal|full&poll_ms=N]`. `synchronous=full`
//! (the default) fsyncs every commit; `normal` may lose the last commits on a
//! power failure (not on a process crash). `poll_ms` (default 100) bounds how
//! late a consumer notices messages published by another process.

mod store;
mod subscription;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, SqlitePool};
use tokio::sync::Notify;

use super::url::BackendUrl;
use super::{Backend, Capabilities, SubscribeOptions, Subscription, pattern};
use crate::message::Message;
use subscription::SqliteSubscription;
use writer::Writer;

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
    msg_key    TEXT,
    PRIMARY KEY (group_name, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sluice_deliveries_visible ON sluice_deliveries (group_name, visible_at);
"#;

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: true,
    history: true,
    consumer_groups: true,
    ordered_per_key: true,
    native_delay: true,
    lease: true,
    wildcards: true,
    at_least_once: true,
    lease_checked: true,
    backlog: true,
    key_affinity: true,
};

pub struct SqliteBackend {
    shared: Arc<Shared>,
}

struct Shared {
    /// For reads; every write goes through the writer.
    pool: SqlitePool,
    writer: Writer,
    poll: Duration,
    /// Wakes this process's fetchers when a commit made messages visible.
    changed: Arc<Notify>,
}

impl SqliteBackend {
    pub async fn connect(url: &str) -> Result<Self> {
        let (path, synchronous, poll) = parse_url(url)?;
        let path = path.as_str();
        let options = SqliteConnectOptions::new()
            .filename(PathBuf::from(path))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(30));
        let pool = open(options.clone(), path).await?;
        let conn = options
            .connect()
            .await
            .with_context(|| format!("cannot open SQLite database `{path}`"))?;
        let changed = Arc::new(Notify::new());
        Ok(SqliteBackend {
            shared: Arc::new(Shared {
                pool,
                writer: Writer::start(conn, changed.clone()),
                poll,
                changed,
            }),
        })
    }
}

/// Opens the database file read-only, if it exists, and counts Sluice's
/// messages; a file not there yet needs a directory to be made in.
pub async fn probe(url: &str) -> Result<String> {
    let (path, _, _) = parse_url(url)?;
    let file = std::path::Path::new(&path);
    if !file.exists() {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => std::path::Path::new("."),
        };
        anyhow::ensure!(
            dir.is_dir(),
            "`{path}` does not exist, nor its directory `{}`",
            dir.display()
        );
        return Ok(format!(
            "`{path}` does not exist yet; the first run makes it in `{}`",
            dir.display()
        ));
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(file)
        .read_only(true)
        .connect()
        .await
        .with_context(|| format!("cannot open SQLite database `{path}`"))?;
    let ours: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sluice_messages')",
    )
    .fetch_one(&mut conn)
    .await
    .with_context(|| format!("`{path}` is not an SQLite database"))?;
    if !ours {
        return Ok(format!(
            "`{path}` opens; Sluice's tables are made on the first run"
        ));
    }
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM sluice_messages")
        .fetch_one(&mut conn)
        .await?;
    Ok(format!("`{path}` opens: {messages} message(s) kept"))
}

/// Splits a `sqlite://` URL into the database file, how commits are
/// synced, and how often consumers look for other processes' messages.
pub(crate) fn parse_url(url: &str) -> Result<(String, SqliteSynchronous, Duration)> {
    let mut url = BackendUrl::split(url, "sqlite")?;
    url.require_address("file (expected sqlite://PATH)")?;
    let synchronous = url
        .take_choice(
            "synchronous",
            &[
                ("full", SqliteSynchronous::Full),
                ("normal", SqliteSynchronous::Normal),
                ("extra", SqliteSynchronous::Extra),
                ("off", SqliteSynchronous::Off),
            ],
        )?
        .unwrap_or(SqliteSynchronous::Full);
    let poll = url
        .take_ms("poll_ms")?
        .unwrap_or(Duration::from_millis(100));
    url.finish(&["synchronous", "poll_ms"])?;
    Ok((url.address, synchronous, poll))
}

/// How a stored row becomes a message, shared with PostgreSQL; the fuzz
/// targets read arbitrary rows through it.
#[cfg(test)]
pub(crate) use super::claims::stored_message;

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
                .max_connections(2)
                .connect_with(options.clone())
                .await
                .with_context(|| format!("cannot open SQLite database `{path}`"))?;
            sqlx::raw_sql(SCHEMA)
                .execute(&pool)
                .await
                .with_context(|| format!("cannot create Sluice tables in `{path}`"))?;
            add_delivery_keys(&pool)
                .await
                .with_context(|| format!("cannot upgrade the Sluice tables in `{path}`"))?;
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

/// Gives every delivery its message's key, for claims that keep per-key
/// order across consumers (`store::claim`). Databases made before keys were
/// kept with deliveries gain the column, filled from the log, once.
async fn add_delivery_keys(pool: &SqlitePool) -> Result<()> {
    let mut tx = pool.begin().await?;
    let has_keys: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pragma_table_info('sluice_deliveries') WHERE name = 'msg_key'",
    )
    .fetch_one(&mut *tx)
    .await?;
    if has_keys == 0 {
        sqlx::raw_sql(
            "ALTER TABLE sluice_deliveries ADD COLUMN msg_key TEXT; \
             UPDATE sluice_deliveries SET msg_key = \
                 (SELECT m.msg_key FROM sluice_messages m WHERE m.seq = sluice_deliveries.seq);",
        )
        .execute(&mut *tx)
        .await?;
        tracing::info!("SQLite: deliveries now carry their message's key");
    }
    sqlx::raw_sql(
        "CREATE INDEX IF NOT EXISTS sluice_deliveries_key \
         ON sluice_deliveries (group_name, msg_key, seq) WHERE msg_key IS NOT NULL",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn pending(&self, group_key: &str) -> Result<Option<u64>> {
        // Claimed at least once and not acknowledged; rows a fetch made
        // and never claimed are the backlog's.
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sluice_deliveries WHERE group_name = ?1 AND attempt > 0",
        )
        .bind(group_key)
        .fetch_one(&self.shared.pool)
        .await?;
        Ok(Some(count as u64))
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        backlog(&self.shared.pool, group_key).await
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        self.shared.writer.publish(messages).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        let group = options.group_key();
        self.shared
            .writer
            .subscribe(&group, &options.topics, options.start)
            .await?;
        Ok(Box::new(SqliteSubscription::new(
            self.shared.clone(),
            group,
            &options,
        )))
    }
}

/// Messages waiting for a group: delivery rows never claimed, plus the log
/// rows past its cursors that a fetch has yet to turn into deliveries. A
/// topic matched by several of the group's patterns counts from the
/// furthest of their cursors, since the pattern that passed a row made it
/// a delivery. Read in one transaction, so a concurrent fetch moving rows
/// from the log to the deliveries is seen before or after, not halfway.
async fn backlog(pool: &SqlitePool, group: &str) -> Result<Option<u64>> {
    let mut tx = pool.begin().await?;
    let cursors: Vec<(String, i64)> =
        sqlx::query_as("SELECT pattern, cursor FROM sluice_groups WHERE group_name = ?1")
            .bind(group)
            .fetch_all(&mut *tx)
            .await?;
    let Some(lowest) = cursors.iter().map(|(_, cursor)| *cursor).min() else {
        return Ok(None);
    };
    let topics: Vec<String> = if cursors.iter().any(|(p, _)| pattern::is_pattern(p)) {
        sqlx::query_scalar("SELECT DISTINCT topic FROM sluice_messages WHERE seq > ?1")
            .bind(lowest)
            .fetch_all(&mut *tx)
            .await?
    } else {
        cursors.iter().map(|(topic, _)| topic.clone()).collect()
    };
    let mut total: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sluice_deliveries WHERE group_name = ?1 AND attempt = 0",
    )
    .bind(group)
    .fetch_one(&mut *tx)
    .await?;
    for topic in topics {
        let furthest = cursors
            .iter()
            .filter(|(p, _)| pattern::matches(p, &topic))
            .map(|(_, cursor)| *cursor)
            .max();
        let Some(furthest) = furthest else {
            continue;
        };
        let unread: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sluice_messages WHERE topic = ?1 AND seq > ?2",
        )
        .bind(&topic)
        .bind(furthest)
        .fetch_one(&mut *tx)
        .await?;
        total += unread;
    }
    Ok(Some(total as u64))
}
