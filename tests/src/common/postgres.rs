//! A schema of a test's own on the shared PostgreSQL server
//! (127.0.0.1:5432, database `test`), dropped when the test ends.

use crate::common::unique;

/// The shared server's database.
pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct PostgresSchema(String);

impl PostgresSchema {
    pub fn new() -> Self {
        PostgresSchema(unique("sluicetest_").to_lowercase())
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// A backend URL in the schema, with `params` (`poll_ms=20&…`).
    pub fn url(&self, params: &str) -> String {
        match params {
            "" => format!("{SERVER}?schema={}", self.0),
            params => format!("{SERVER}?schema={}&{params}", self.0),
        }
    }

    /// A pool whose queries find the schema's tables by name.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&format!("{SERVER}?options=-csearch_path%3D{}", self.0))
            .await
            .unwrap()
    }
}

impl Default for PostgresSchema {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PostgresSchema {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Dropped inside the test's runtime: drop the schema from a thread
        // with a runtime of its own.
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let pool = sqlx::PgPool::connect(SERVER).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .execute(&pool)
                .await
                .unwrap();
            })
        })
        .join()
        .unwrap();
    }
}
