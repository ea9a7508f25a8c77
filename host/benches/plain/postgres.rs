//! The plain PostgreSQL loop of the broker benchmark: a job table per
//! topic, worked the way a hand-written SKIP LOCKED queue is. The worker
//! takes a batch (`DELETE … WHERE seq IN (SELECT … FOR UPDATE SKIP LOCKED)
//! RETURNING payload`) into the client, where its handler would run, writes
//! each payload back to the output table in one statement and commits, so
//! inputs are consumed and outputs published in one transaction — the same
//! exactly-once guarantee Sluice gives a route within one database, and the
//! same round trip of every payload to the client and back as the plain
//! SQLite loop. A second loop takes and counts the outputs. Both sides
//! commit with `synchronous_commit = off`, as Sluice's settlements do, and
//! connect over plain TCP: the server offers TLS, which sqlx would take,
//! and over TLS sqlx sends a large statement slowly (a settlement of a few
//! hundred 1 KiB outputs took about 40 ms to send), a cost of the driver
//! rather than of either loop.

use anyhow::Result;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

/// The shared server; every run gets a schema of its own.
pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const ADDRESS: &str = "127.0.0.1:5432";

/// Rows a plain loop takes at once.
const BATCH: i64 = 100;

pub fn sluice_url(namespace: &str) -> String {
    format!("{SERVER}?schema={namespace}&sslmode=disable")
}

pub struct PlainPostgres {
    pool: PgPool,
}

impl PlainPostgres {
    pub async fn connect(namespace: &str) -> Result<Self> {
        create_schema(namespace).await?;
        let options: PgConnectOptions = SERVER
            .parse::<PgConnectOptions>()?
            .ssl_mode(PgSslMode::Disable);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(
                options.options([("search_path", namespace), ("synchronous_commit", "off")]),
            )
            .await?;
        sqlx::raw_sql(
            "CREATE TABLE plain_in (seq BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL); \
             CREATE TABLE plain_out (seq BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL);",
        )
        .execute(&pool)
        .await?;
        Ok(PlainPostgres { pool })
    }

    pub async fn publish(&mut self, count: usize, payload: &[u8]) -> Result<()> {
        let mut left = count;
        while left > 0 {
            let batch = left.min(super::PUBLISH_BATCH);
            let payloads = vec![payload; batch];
            sqlx::query("INSERT INTO plain_in (payload) SELECT * FROM UNNEST($1::bytea[])")
                .bind(&payloads)
                .execute(&self.pool)
                .await?;
            left -= batch;
        }
        Ok(())
    }

    pub async fn process(&mut self, count: usize) -> Result<()> {
        let work = async {
            let mut done = 0;
            while done < count {
                let mut tx = self.pool.begin().await?;
                let taken: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                    "DELETE FROM plain_in WHERE seq IN ( \
                         SELECT seq FROM plain_in ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
                     RETURNING seq, payload",
                )
                .bind(BATCH)
                .fetch_all(&mut *tx)
                .await?;
                let mut taken = taken;
                taken.sort_unstable_by_key(|(seq, _)| *seq);
                let outputs: Vec<Vec<u8>> = taken.into_iter().map(|(_, payload)| payload).collect();
                if !outputs.is_empty() {
                    sqlx::query(
                        "INSERT INTO plain_out (payload) SELECT * FROM UNNEST($1::bytea[])",
                    )
                    .bind(&outputs)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                done += outputs.len();
                super::idle_if_empty(outputs.len()).await;
            }
            anyhow::Ok(())
        };
        let counting = async {
            let mut counted = 0;
            let mut last_output = std::time::Instant::now();
            while counted < count {
                let taken = sqlx::query(
                    "DELETE FROM plain_out WHERE seq IN ( \
                         SELECT seq FROM plain_out ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)",
                )
                .bind(BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected();
                counted += taken as usize;
                super::counted(taken as usize, &mut last_output).await?;
            }
            anyhow::Ok(())
        };
        tokio::try_join!(work, counting)?;
        Ok(())
    }
}

async fn create_schema(namespace: &str) -> Result<()> {
    let pool = PgPool::connect(SERVER).await?;
    // The namespace is made of lowercase letters and digits only.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {namespace}")))
        .execute(&pool)
        .await?;
    Ok(())
}

/// Drops the run's schema with everything in it.
pub async fn clean(namespace: &str) -> Result<()> {
    let pool = PgPool::connect(SERVER).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {namespace} CASCADE"
    )))
    .execute(&pool)
    .await?;
    Ok(())
}
