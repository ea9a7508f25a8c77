//! The PostgreSQL backend: messages in tables, claimed by competing consumers
//! with `SELECT … FOR UPDATE SKIP LOCKED`, woken by LISTEN/NOTIFY.
//!
//! Layout (in the URL's `schema`, `sluice` by default): `sluice_messages`
//! holds every topic's messages; `sluice_groups` the patterns each consumer
//! group subscribes to (with the POSIX regular expression they compile to);
//! `sluice_deliveries` one row per message per group that has yet to settle
//! it. Publishing inserts the messages and, in the same statement, a
//! delivery row for every group whose pattern matches, then notifies those
//! groups — so groups fan out and a group's members share its rows. A claim
//! bumps the row's attempt and pushes `visible_at` past the lease; ack deletes
//! the row, nack moves `visible_at`, and a consumer that dies lets its lease
//! run out. A group created with `earliest` is given rows for the messages
//! still kept; its creation locks out publishers for that moment, so no
//! message is published between "the group exists" and "the group has rows".
//!
//! Settled messages are deleted once they are older than `retention_ms`.
//! Because a route whose input and output are this same backend can publish
//! its outputs and settle its input in one transaction
//! ([`Subscription::publish_and_ack`]), processing within the database is
//! exactly once.

mod listener;
mod schema;
pub(crate) mod settings;
mod settle;
mod subscription;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Backend, Capabilities, StartFrom, SubscribeOptions, Subscription, pattern};
use crate::message::Message;
pub use settings::PostgresSettings;
use subscription::PostgresSubscription;

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

pub struct PostgresBackend {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    settings: PostgresSettings,
    /// The NOTIFY channel of this schema.
    channel: String,
    /// A wake-up per group key, rung by the listener.
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    /// Stops the listener and the cleaner when the backend goes.
    stop: CancellationToken,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Shared {
    fn waker(&self, group_key: &str) -> Arc<Notify> {
        self.wakers
            .lock()
            .unwrap()
            .entry(group_key.to_string())
            .or_default()
            .clone()
    }

    /// Makes the schema and its tables again after they were dropped under
    /// the running backend (a database restored empty, or an operator's
    /// `DROP SCHEMA`); warns once and counts it.
    async fn restore_schema(&self) -> Result<()> {
        if !schema::migrate(&self.pool, &self.settings.schema).await? {
            // Another subscription or publisher made them again first.
            return Ok(());
        }
        crate::backend::record_restored("postgres");
        tracing::warn!(
            schema = %self.settings.schema,
            "Sluice's tables were gone from the database and were made again; the messages and deliveries they held are lost with them"
        );
        Ok(())
    }

    fn wake_all(&self) {
        for waker in self.wakers.lock().unwrap().values() {
            waker.notify_waiters();
        }
    }
}

impl PostgresBackend {
    /// Connects to `postgres://…`, creates or upgrades the tables, and starts
    /// listening for notifications.
    pub async fn connect(url: &str) -> Result<Self> {
        let settings = PostgresSettings::parse(url)?;
        settings.check_files()?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(settings.connect.clone())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to PostgreSQL at `{}`: {}",
                    settings.redacted,
                    crate::backend::cause_line(&e)
                )
            })?;
        schema::migrate(&pool, &settings.schema).await?;
        let shared = Arc::new(Shared {
            pool,
            channel: format!("sluice_{}", settings.schema),
            settings,
            wakers: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        listener::start(&shared).await?;
        listener::start_cleaner(&shared);
        Ok(PostgresBackend { shared })
    }
}

/// Connects once, reads the server's version and where the schema stands,
/// and changes nothing.
pub async fn probe(url: &str) -> Result<String> {
    use sqlx::ConnectOptions;
    let settings = PostgresSettings::parse(url)?;
    settings.check_files()?;
    let mut conn = settings.connect.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at `{}`: {}",
            settings.redacted,
            crate::backend::cause_line(&e)
        )
    })?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    let schema = schema::describe(&mut conn, &settings.schema).await?;
    Ok(format!("PostgreSQL {version}, {schema}"))
}

/// The columns of messages to insert, as arrays to bind to one statement.
#[derive(Default)]
struct OutputColumns<'a> {
    ids: Vec<&'a str>,
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
    headers: Vec<String>,
    payloads: Vec<&'a [u8]>,
    timestamps: Vec<i64>,
}

impl<'a> OutputColumns<'a> {
    fn push(&mut self, message: &'a Message) {
        self.ids.push(message.id.as_str());
        self.topics.push(message.topic.as_str());
        self.keys.push(message.key.as_deref());
        // A map of strings always serializes.
        self.headers
            .push(serde_json::to_string(&message.headers).unwrap_or_default());
        self.payloads.push(message.payload.as_slice());
        self.timestamps.push(message.timestamp_ms as i64);
    }
}

/// Refuses a message whose topic is malformed or a pattern.
fn check_topic(message: &Message) -> Result<()> {
    pattern::validate(&message.topic).map_err(anyhow::Error::msg)?;
    if pattern::is_pattern(&message.topic) {
        anyhow::bail!("cannot publish to pattern `{}`", message.topic);
    }
    Ok(())
}

/// A CTE that lets the statement's transaction commit without waiting for
/// its WAL flush; the statement must select from `relaxed` for it to run.
///
/// Only for transactions that move deliveries (claims, acks, settlements),
/// never for publishes, which wait for their flush. Such a transaction lost
/// in a server crash is lost whole — a settlement's outputs with its ack —
/// and only makes a message be handled again: a lost claim leaves the row
/// visible, a lost ack or nack leaves it claimed until its lease runs out.
/// Anything that saw its effects committed after it in the WAL, so it
/// cannot have survived the crash without them. This saves an fsync per
/// claim and per settled batch.
macro_rules! relaxed {
    () => {
        "relaxed AS (SELECT set_config('synchronous_commit', 'off', true))"
    };
}
use relaxed;

/// The end of a statement whose CTE `new` inserted messages (`seq`,
/// `topic`, `msg_key`): a delivery row for every group whose pattern matches, and a
/// notification per group woken, on the channel bound as `$channel`.
/// PostgreSQL delivers one notification per channel and payload per
/// transaction however often it is sent, so each group is woken once.
macro_rules! fan_out {
    ($channel:literal) => {
        concat!(
            "fanned AS ( \
                 INSERT INTO sluice_deliveries (group_key, seq, msg_key) \
                 SELECT DISTINCT g.group_key, new.seq, new.msg_key FROM new JOIN sluice_groups g ON new.topic ~ g.matcher \
                 ON CONFLICT DO NOTHING \
                 RETURNING group_key \
             ), woken AS ( \
                 SELECT pg_notify(",
            $channel,
            ", group_key) FROM (SELECT DISTINCT group_key FROM fanned) woken_groups \
             )"
        )
    };
}
use fan_out;

/// Inserts `messages` with a delivery row for every group they match, and
/// notifies those groups when the transaction commits; one statement.
async fn insert_messages<'e>(
    executor: impl sqlx::Executor<'e, Database = Postgres>,
    channel: &str,
    messages: &[Message],
) -> Result<()> {
    let mut columns = OutputColumns::default();
    for message in messages {
        check_topic(message)?;
        columns.push(message);
    }
    sqlx::query(concat!(
        "WITH new AS ( \
             INSERT INTO sluice_messages (id, topic, msg_key, headers, payload, timestamp_ms) \
             SELECT id, topic, msg_key, headers::jsonb, payload, timestamp_ms \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::int8[]) \
                  WITH ORDINALITY AS t(id, topic, msg_key, headers, payload, timestamp_ms, ord) \
             ORDER BY ord \
             RETURNING seq, topic, msg_key \
         ), ",
        fan_out!("$7"),
        " SELECT 1 FROM woken"
    ))
    .bind(&columns.ids)
    .bind(&columns.topics)
    .bind(&columns.keys)
    .bind(&columns.headers)
    .bind(&columns.payloads)
    .bind(&columns.timestamps)
    .bind(channel)
    .execute(executor)
    .await?;
    Ok(())
}

/// The POSIX regular expression matching the topics `topic_pattern` matches.
fn matcher(topic_pattern: &str) -> String {
    let tokens: Vec<String> = topic_pattern
        .split('.')
        .map(|token| match token {
            "*" => "[^.]+".to_string(),
            ">" => ".+".to_string(),
            literal => literal
                .chars()
                .map(|c| {
                    if c.is_ascii_punctuation() {
                        format!("\\{c}")
                    } else {
                        c.to_string()
                    }
                })
                .collect(),
        })
        .collect();
    format!("^{}$", tokens.join("\\."))
}

#[async_trait]
impl Backend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        match insert_messages(&self.shared.pool, &self.shared.channel, &messages).await {
            Err(e) if tables_missing(&e) => {
                self.shared.restore_schema().await?;
                insert_messages(&self.shared.pool, &self.shared.channel, &messages).await
            }
            result => result,
        }
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        let group_key = options.group_key();
        let known: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sluice_groups WHERE group_key = $1 AND pattern = ANY($2)",
        )
        .bind(&group_key)
        .bind(&options.topics)
        .fetch_one(&self.shared.pool)
        .await?;
        if (known as usize) < options.topics.len() {
            create_group(&self.shared.pool, &group_key, &options).await?;
        }
        Ok(Box::new(PostgresSubscription::new(
            self.shared.clone(),
            group_key,
            &options,
        )))
    }

    async fn pending(&self, group_key: &str) -> Result<Option<u64>> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sluice_deliveries WHERE group_key = $1 AND attempt > 0",
        )
        .bind(group_key)
        .fetch_one(&self.shared.pool)
        .await?;
        Ok(Some(count as u64))
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        // Publishing gives every matching group its row at once, so rows
        // never claimed are exactly what waits; a group with no patterns
        // recorded is unknown here.
        let (known, count): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM sluice_groups WHERE group_key = $1), \
                    (SELECT COUNT(*) FROM sluice_deliveries WHERE group_key = $1 AND attempt = 0)",
        )
        .bind(group_key)
        .fetch_one(&self.shared.pool)
        .await?;
        Ok(known.then_some(count as u64))
    }
}

/// Whether `error` says Sluice's schema or tables do not exist.
fn tables_missing(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db))
                // undefined_table, invalid_schema_name
                if matches!(db.code().as_deref(), Some("42P01" | "3F000"))
        )
    })
}

/// Records the group's patterns and, from `earliest`, gives it the messages
/// still kept. Publishers are locked out meanwhile: a publish running
/// concurrently would otherwise see neither the new group (to fan out to
/// it) nor be seen by the backfill.
async fn create_group(pool: &PgPool, group_key: &str, options: &SubscribeOptions) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE sluice_groups IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    for topic in &options.topics {
        let matcher = matcher(topic);
        let created = sqlx::query(
            "INSERT INTO sluice_groups (group_key, pattern, matcher, ephemeral) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(group_key)
        .bind(topic)
        .bind(&matcher)
        .bind(options.ephemeral)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if created && options.start == StartFrom::Earliest {
            sqlx::query(
                "INSERT INTO sluice_deliveries (group_key, seq, msg_key) \
                 SELECT $1, seq, msg_key FROM sluice_messages WHERE topic ~ $2 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(group_key)
            .bind(&matcher)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns_become_anchored_regular_expressions() {
        assert_eq!(super::matcher("orders.*"), "^orders\\.[^.]+$");
        assert_eq!(super::matcher("orders.>"), "^orders\\..+$");
        assert_eq!(super::matcher("a+b.c_d"), "^a\\+b\\.c\\_d$");
    }
}
