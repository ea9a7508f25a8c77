//! A consumer of one group on the PostgreSQL backend: claims with
//! `FOR UPDATE SKIP LOCKED`, acks in batches, and publishes-and-acks in one
//! transaction for routes whose output is this same database (see
//! `settle.rs`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use sqlx::Row;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Shared;
use super::settle::Settler;
use crate::backend::ack_batch::AckBatcher;
use crate::backend::{Delivery, Receipt, SubscribeOptions, Subscription};
use crate::message::Message;

pub struct PostgresSubscription {
    shared: Arc<Shared>,
    group_key: String,
    lease: Duration,
    ephemeral: bool,
    closed: AtomicBool,
    wake: Arc<Notify>,
    /// Deliveries claimed and not settled, handed back on close.
    mine: Mutex<HashSet<i64>>,
    acks: Arc<AckBatcher>,
    settler: Settler,
}

/// Which row a delivery is, and which claim of it.
struct PostgresReceipt {
    seq: i64,
    attempt: i32,
}

/// Acks deleted with one statement per few milliseconds: a round trip per
/// ack would cap a consumer far below what the database can do.
fn postgres_acks(shared: &Arc<Shared>, group_key: String) -> Arc<AckBatcher> {
    let pool = shared.pool.clone();
    let table_group = group_key.clone();
    AckBatcher::start(
        group_key,
        Duration::from_millis(2),
        Box::new(move |seqs| {
            let pool = pool.clone();
            let group_key = table_group.clone();
            Box::pin(async move {
                sqlx::query("DELETE FROM sluice_deliveries WHERE group_key = $1 AND seq = ANY($2)")
                    .bind(&group_key)
                    .bind(&seqs)
                    .execute(&pool)
                    .await?;
                Ok(())
            })
        }),
    )
}

impl PostgresSubscription {
    pub fn new(shared: Arc<Shared>, group_key: String, options: &SubscribeOptions) -> Self {
        PostgresSubscription {
            wake: shared.waker(&group_key),
            acks: postgres_acks(&shared, group_key.clone()),
            settler: Settler::start(shared.clone(), group_key.clone()),
            shared,
            group_key,
            lease: options.lease,
            ephemeral: options.ephemeral,
            closed: AtomicBool::new(false),
            mine: Mutex::new(HashSet::new()),
        }
    }

    /// Claims up to `max` visible deliveries: rows other consumers are
    /// claiming at this moment are skipped, not waited for.
    async fn claim(&self, max: usize) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(
            "WITH claimable AS ( \
                 SELECT seq FROM sluice_deliveries \
                 WHERE group_key = $1 AND visible_at <= now() \
                 ORDER BY seq LIMIT $2 \
                 FOR UPDATE SKIP LOCKED \
             ), claimed AS ( \
                 UPDATE sluice_deliveries d \
                 SET attempt = d.attempt + 1, visible_at = now() + $3 * interval '1 millisecond' \
                 FROM claimable WHERE d.group_key = $1 AND d.seq = claimable.seq \
                 RETURNING d.seq, d.attempt \
             ) \
             SELECT claimed.seq, claimed.attempt, m.id, m.topic, m.msg_key, m.headers::text AS headers, \
                    m.payload, m.timestamp_ms \
             FROM claimed JOIN sluice_messages m ON m.seq = claimed.seq \
             ORDER BY claimed.seq",
        )
        .bind(&self.group_key)
        .bind(max as i64)
        .bind(self.lease.as_millis() as i64)
        .fetch_all(&self.shared.pool)
        .await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut mine = self.mine.lock().unwrap();
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            let attempt: i32 = row.try_get("attempt")?;
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
                receipt: Receipt::new(PostgresReceipt { seq, attempt }),
            });
        }
        Ok(deliveries)
    }

    /// How long until the group's next delivery becomes visible (a nack's
    /// delay or a lease running out), if it has any.
    async fn next_due(&self) -> Result<Option<Duration>> {
        let millis: Option<f64> = sqlx::query_scalar(
            "SELECT (EXTRACT(EPOCH FROM MIN(visible_at) - now()) * 1000)::float8 \
             FROM sluice_deliveries WHERE group_key = $1",
        )
        .bind(&self.group_key)
        .fetch_one(&self.shared.pool)
        .await?;
        Ok(millis.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
    }
}

#[async_trait]
impl Subscription for PostgresSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(crate::backend::closed_error(&self.group_key));
            }
            // Registered before the claim, so a notification that arrives
            // between an empty claim and the wait is not missed.
            let woken = self.wake.notified();
            let deliveries = self.claim(max.max(1)).await?;
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            let mut until = (now + self.shared.settings.poll).min(give_up);
            if let Some(due) = self.next_due().await? {
                until = until.min(now + due);
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let receipt = delivery.receipt.get::<PostgresReceipt>()?;
        self.mine.lock().unwrap().remove(&receipt.seq);
        self.acks.push(receipt.seq);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let receipt = delivery.receipt.get::<PostgresReceipt>()?;
        // Only the current claim may move the row: if the lease ran out and
        // another consumer holds it, this nack is stale.
        sqlx::query(
            "UPDATE sluice_deliveries SET visible_at = now() + $1 * interval '1 millisecond' \
             WHERE group_key = $2 AND seq = $3 AND attempt = $4",
        )
        .bind(delay.as_millis() as i64)
        .bind(&self.group_key)
        .bind(receipt.seq)
        .bind(receipt.attempt)
        .execute(&self.shared.pool)
        .await?;
        self.mine.lock().unwrap().remove(&receipt.seq);
        Ok(())
    }

    fn transactional(&self) -> bool {
        true
    }

    async fn publish_and_ack(&self, delivery: &Delivery, messages: Vec<Message>) -> Result<()> {
        let receipt = delivery.receipt.get::<PostgresReceipt>()?;
        self.settler
            .settle(receipt.seq, receipt.attempt, messages)
            .await?;
        self.mine.lock().unwrap().remove(&receipt.seq);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.acks.stop().await?;
        if self.ephemeral {
            let mut tx = self.shared.pool.begin().await?;
            sqlx::query("DELETE FROM sluice_groups WHERE group_key = $1")
                .bind(&self.group_key)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM sluice_deliveries WHERE group_key = $1")
                .bind(&self.group_key)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(());
        }
        let mine: Vec<i64> = self.mine.lock().unwrap().drain().collect();
        if !mine.is_empty() {
            sqlx::query(
                "UPDATE sluice_deliveries SET visible_at = now() \
                 WHERE group_key = $1 AND seq = ANY($2)",
            )
            .bind(&self.group_key)
            .bind(&mine)
            .execute(&self.shared.pool)
            .await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&self.shared.channel)
                .bind(&self.group_key)
                .execute(&self.shared.pool)
                .await?;
        }
        Ok(())
    }
}

impl Drop for PostgresSubscription {
    /// Dropped without `close`: still write what was acknowledged.
    fn drop(&mut self) {
        self.acks.stop_soon();
    }
}
