//! The PostgreSQL backend's tables, created and upgraded by the host at
//! connect time.
//!
//! Migrations are numbered and applied in order, each in the transaction
//! that records it in `sluice_migrations`, under an advisory lock so that
//! processes starting together neither race nor apply one twice. A database
//! whose schema is newer than this build is refused rather than misread.
//! [`describe`] reads where a schema stands without changing it.

use anyhow::{Context, Result, bail};
use sqlx::PgPool;

/// Every migration, in order; the version of each is its position plus one.
/// Never edit one that has shipped: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the log, the groups and their deliveries.
    r#"
    CREATE TABLE sluice_messages (
        seq          BIGSERIAL   PRIMARY KEY,
        id           TEXT        NOT NULL,
        topic        TEXT        NOT NULL,
        msg_key      TEXT,
        headers      JSONB       NOT NULL,
        payload      BYTEA       NOT NULL,
        timestamp_ms BIGINT      NOT NULL,
        published_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX sluice_messages_topic ON sluice_messages (topic, seq);
    CREATE INDEX sluice_messages_published ON sluice_messages (published_at);

    CREATE TABLE sluice_groups (
        group_key  TEXT        NOT NULL,
        pattern    TEXT        NOT NULL,
        matcher    TEXT        NOT NULL,
        ephemeral  BOOLEAN     NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (group_key, pattern)
    );

    CREATE TABLE sluice_deliveries (
        group_key  TEXT        NOT NULL,
        seq        BIGINT      NOT NULL,
        attempt    INTEGER     NOT NULL DEFAULT 0,
        visible_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (group_key, seq)
    );
    CREATE INDEX sluice_deliveries_visible ON sluice_deliveries (group_key, visible_at);
    CREATE INDEX sluice_deliveries_seq ON sluice_deliveries (seq);
    "#,
    // 2: fewer index entries per message. A claim scans a group's rows in
    // `seq` order by the primary key, so with no index on `visible_at` it
    // rewrites its row in place (a HOT update, which the free space left by
    // the fill factor makes room for) instead of adding an entry to every
    // index. The topic index served no query; the retention sweep finds
    // deliveries through the primary key, and old messages through a BRIN
    // index, as `published_at` grows with `seq`.
    r#"
    DROP INDEX sluice_messages_topic;
    DROP INDEX sluice_messages_published;
    CREATE INDEX sluice_messages_published ON sluice_messages USING brin (published_at);
    DROP INDEX sluice_deliveries_visible;
    DROP INDEX sluice_deliveries_seq;
    ALTER TABLE sluice_deliveries SET (fillfactor = 50);
    "#,
    // 3: each delivery carries its message's key, so an ordered claim can
    // skip keys whose earlier message is unsettled with one index probe.
    // The index holds no column a claim changes, so claims stay HOT.
    r#"
    ALTER TABLE sluice_deliveries ADD COLUMN msg_key TEXT;
    UPDATE sluice_deliveries d SET msg_key = m.msg_key
        FROM sluice_messages m WHERE m.seq = d.seq AND m.msg_key IS NOT NULL;
    CREATE INDEX sluice_deliveries_key ON sluice_deliveries (group_key, msg_key, seq)
        WHERE msg_key IS NOT NULL;
    "#,
];

/// An arbitrary constant: the advisory lock key of Sluice's migrations.
const MIGRATION_LOCK: i64 = 0x511CE;

/// Creates the schema if missing and applies the migrations it lacks;
/// answers whether it applied any.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    // `schema` is checked to be a plain identifier when the URL is parsed.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut *tx)
    .await
    .with_context(|| format!("cannot create schema `{schema}`"))?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS sluice_migrations ( \
             version    INTEGER     PRIMARY KEY, \
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await?;
    let applied: i32 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM sluice_migrations")
            .fetch_one(&mut *tx)
            .await?;
    let known = MIGRATIONS.len() as i32;
    if applied > known {
        bail!(
            "schema `{schema}` is at version {applied}, newer than this build of Sluice \
             knows ({known}); upgrade Sluice or use another schema"
        );
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = index as i32 + 1;
        sqlx::raw_sql(*migration)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("migration {version} of schema `{schema}` failed"))?;
        sqlx::query("INSERT INTO sluice_migrations (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tracing::info!(schema, version, "applied migration");
    }
    tx.commit().await?;
    Ok(applied < known)
}

/// Where `schema` stands, read without changing anything: at which version
/// of this build's, or, if it does not exist yet, whether the user may make
/// it.
pub async fn describe(conn: &mut sqlx::PgConnection, schema: &str) -> Result<String> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.schemata WHERE schema_name = $1)",
    )
    .bind(schema)
    .fetch_one(&mut *conn)
    .await?;
    let known = MIGRATIONS.len();
    if !exists {
        let may_create: bool =
            sqlx::query_scalar("SELECT has_database_privilege(current_database(), 'CREATE')")
                .fetch_one(&mut *conn)
                .await?;
        if !may_create {
            bail!("schema `{schema}` does not exist, and this user may not create it");
        }
        return Ok(format!(
            "schema `{schema}` does not exist yet; the first run makes it"
        ));
    }
    let applied: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT MAX(version) FROM {schema}.sluice_migrations"
    )))
    .fetch_one(&mut *conn)
    .await
    .ok()
    .flatten();
    let applied = applied.unwrap_or(0) as usize;
    if applied > known {
        bail!(
            "schema `{schema}` is at version {applied}, newer than this build of Sluice \
             knows ({known})"
        );
    }
    Ok(format!(
        "schema `{schema}` at version {applied} of {known}{}",
        if applied < known {
            " (the first run upgrades it)"
        } else {
            ""
        }
    ))
}
