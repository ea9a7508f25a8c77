//! The plain SQLite loop of the broker benchmark: a job table per topic in
//! a database file, worked the way a hand-written embedded queue is. The
//! worker takes a batch (`DELETE … RETURNING` inside `BEGIN IMMEDIATE`),
//! writes each payload to the output table and commits, so inputs are
//! consumed and outputs published in one transaction — the guarantee Sluice
//! gives a route within one SQLite file. A second loop takes and counts the
//! outputs. Both sides use WAL with `synchronous=FULL`: an fsync per commit.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Result;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Rows a plain loop takes at once.
const BATCH: i64 = 100;

/// The database file of a run, in the system's temporary directory.
fn path(namespace: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{namespace}.db"))
}

/// Sluice's URL for a run: the same durability as the plain loop's.
pub fn sluice_url(namespace: &str) -> String {
    format!("sqlite://{}?synchronous=full", path(namespace).display())
}

pub struct PlainSqlite {
    pool: SqlitePool,
}

impl PlainSqlite {
    pub async fn connect(namespace: &str) -> Result<Self> {
        let options =
            SqliteConnectOptions::from_str(&format!("sqlite://{}", path(namespace).display()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(3)
            .connect_with(options)
            .await?;
        sqlx::raw_sql(
            "CREATE TABLE plain_in (seq INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL); \
             CREATE TABLE plain_out (seq INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL);",
        )
        .execute(&pool)
        .await?;
        Ok(PlainSqlite { pool })
    }

    pub async fn publish(&mut self, count: usize, payload: &[u8]) -> Result<()> {
        let mut left = count;
        while left > 0 {
            let batch = left.min(super::PUBLISH_BATCH);
            let mut tx = self.pool.begin().await?;
            for _ in 0..batch {
                sqlx::query("INSERT INTO plain_in (payload) VALUES (?)")
                    .bind(payload)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            left -= batch;
        }
        Ok(())
    }

    pub async fn process(&mut self, count: usize) -> Result<()> {
        let work = async {
            let mut done = 0;
            while done < count {
                let mut tx = self.pool.begin().await?;
                let taken: Vec<(Vec<u8>,)> = sqlx::query_as(
                    "DELETE FROM plain_in WHERE seq IN ( \
                         SELECT seq FROM plain_in ORDER BY seq LIMIT ?) \
                     RETURNING payload",
                )
                .bind(BATCH)
                .fetch_all(&mut *tx)
                .await?;
                for (payload,) in &taken {
                    sqlx::query("INSERT INTO plain_out (payload) VALUES (?)")
                        .bind(payload)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                done += taken.len();
                super::idle_if_empty(taken.len()).await;
            }
            anyhow::Ok(())
        };
        let counting = async {
            let mut counted = 0;
            let mut last_output = std::time::Instant::now();
            while counted < count {
                let taken = sqlx::query(
                    "DELETE FROM plain_out WHERE seq IN ( \
                         SELECT seq FROM plain_out ORDER BY seq LIMIT ?)",
                )
                .bind(BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected() as usize;
                counted += taken;
                super::counted(taken, &mut last_output).await?;
            }
            anyhow::Ok(())
        };
        tokio::try_join!(work, counting)?;
        Ok(())
    }
}

/// Removes the run's database file and its WAL.
pub async fn clean(namespace: &str) -> Result<()> {
    let path = path(namespace);
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        if file.exists() {
            std::fs::remove_file(file)?;
        }
    }
    Ok(())
}
