//! A consumer of one group on the PostgreSQL backend: claims many rows per
//! statement with `FOR UPDATE SKIP LOCKED`, settles a batch in one
//! statement (see `settle.rs`) — publishing and acking in one transaction
//! for routes whose output is this same database — and gathers single acks
//! into one statement every few milliseconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use sqlx::Row;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::settle;
use super::{Shared, create_group, relaxed, tables_missing};
use crate::backend::ack_batch::AckBatcher;
use crate::backend::claims::{forget_claim, settle_claims, stored_message};
use crate::backend::{Delivery, Receipt, SettleError, Settlement, SubscribeOptions, Subscription};
use crate::message::Message;

/// The end of a claim statement whose CTE `claimable` holds the `ctid`s of
/// the rows to claim: it claims them (a new attempt, invisible for the
/// lease, `$3` ms) and answers them with their messages, oldest first.
macro_rules! claim_rows {
    () => {
        "claimed AS ( \
             UPDATE sluice_deliveries d \
             SET attempt = d.attempt + 1, visible_at = now() + $3 * interval '1 millisecond' \
             WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM claimable)) \
             RETURNING d.seq, d.attempt \
         ) \
         SELECT claimed.seq, claimed.attempt, m.id, m.topic, m.msg_key, m.headers::text AS headers, \
                m.payload, m.timestamp_ms \
         FROM claimed JOIN sluice_messages m ON m.seq = claimed.seq CROSS JOIN relaxed \
         ORDER BY claimed.seq"
    };
}

/// Claims up to `$2` of a group's visible rows, oldest first.
const CLAIM: &str = concat!(
    "WITH ",
    relaxed!(),
    ", claimable AS ( \
         SELECT ctid FROM sluice_deliveries d \
         WHERE group_key = $1 AND visible_at <= now() \
         ORDER BY seq LIMIT $2 \
         FOR UPDATE SKIP LOCKED \
     ), ",
    claim_rows!()
);

/// An ordered claim: of the oldest `$4` visible rows, claims up to `$2`
/// that no earlier row of their key holds back, and parks the others (out
/// of sight for `$5` ms) so that claims to come do not look them over
/// again: with most keys held, the rows of held keys are most of what a
/// claim would read, one index probe each.
const ORDERED_CLAIM: &str = concat!(
    "WITH ",
    relaxed!(),
    ", scanned AS ( \
         SELECT ctid, seq, d.msg_key IS NOT NULL AND EXISTS ( \
             SELECT 1 FROM sluice_deliveries e \
             WHERE e.group_key = $1 AND e.msg_key = d.msg_key AND e.seq < d.seq) AS held \
         FROM sluice_deliveries d \
         WHERE group_key = $1 AND visible_at <= now() \
         ORDER BY seq LIMIT $4 \
         FOR UPDATE SKIP LOCKED \
     ), claimable AS ( \
         SELECT ctid FROM scanned WHERE NOT held ORDER BY seq LIMIT $2 \
     ), parked AS ( \
         UPDATE sluice_deliveries d SET visible_at = now() + $5 * interval '1 millisecond' \
         WHERE d.ctid = ANY(ARRAY(SELECT ctid FROM scanned WHERE held)) \
         RETURNING 1 \
     ), ",
    claim_rows!()
);

/// How long a row held back by its key stays parked. Settling the row
/// that holds it back brings it back at once (see [`unpark!`]); this only
/// bounds the wait of one whose holder went in a way that does not (a
/// settlement that raced the parking).
const PARK: Duration = Duration::from_secs(2);

/// A CTE `unparked` for a statement whose CTE `acked` deleted rows
/// (`seq`, `msg_key`) of group `$1`: on an ordered group (`$ordered`),
/// the next row of each of their keys comes out of parking (see
/// [`ORDERED_CLAIM`]). Only a row never claimed can be parked.
macro_rules! unpark {
    ($ordered:literal) => {
        concat!(
            "unparked AS ( \
                 UPDATE sluice_deliveries d SET visible_at = now() \
                 FROM acked a \
                 WHERE ",
            $ordered,
            " AND a.msg_key IS NOT NULL \
                   AND d.group_key = $1 AND d.msg_key = a.msg_key \
                   AND d.seq = (SELECT MIN(e.seq) FROM sluice_deliveries e \
                                WHERE e.group_key = $1 AND e.msg_key = a.msg_key AND e.seq > a.seq) \
                   AND d.attempt = 0 AND d.visible_at > now() \
                 RETURNING 1 \
             )"
        )
    };
}
pub(super) use unpark;

pub struct PostgresSubscription {
    shared: Arc<Shared>,
    group_key: String,
    /// What the group was made with, to make it again.
    options: SubscribeOptions,
    lease: Duration,
    ephemeral: bool,
    closed: AtomicBool,
    wake: Arc<Notify>,
    /// Deliveries claimed and not settled (row and attempt), handed back
    /// on close.
    mine: Mutex<HashMap<i64, i32>>,
    acks: Arc<AckBatcher>,
}

/// Which row a delivery is, and which claim of it.
struct PostgresReceipt {
    seq: i64,
    attempt: i32,
}

/// Acks deleted with one statement per few milliseconds: a round trip per
/// ack would cap a consumer far below what the database can do. Only the
/// current claims are deleted; the commit does not wait for its WAL flush
/// (see [`relaxed!`]). On an ordered subscription an ack may free a key
/// another consumer waits for, so the statement also wakes the group.
fn postgres_acks(shared: &Arc<Shared>, group_key: String, ordered: bool) -> Arc<AckBatcher> {
    let pool = shared.pool.clone();
    let channel = shared.channel.clone();
    let table_group = group_key.clone();
    AckBatcher::start(
        group_key,
        Duration::from_millis(2),
        Box::new(move |claims| {
            let pool = pool.clone();
            let channel = channel.clone();
            let group_key = table_group.clone();
            let (seqs, attempts): (Vec<i64>, Vec<i32>) = claims.into_iter().unzip();
            Box::pin(async move {
                sqlx::query(concat!(
                    "WITH ",
                    relaxed!(),
                    ", acked AS ( \
                         DELETE FROM sluice_deliveries d \
                         USING UNNEST($2::int8[], $3::int4[]) AS c(seq, attempt) \
                         WHERE d.group_key = $1 AND d.seq = ANY($2) \
                           AND d.seq = c.seq AND d.attempt = c.attempt \
                         RETURNING d.seq, d.msg_key \
                     ), ",
                    unpark!("$5"),
                    ", woken AS ( \
                         SELECT pg_notify($4, $1) WHERE $5 AND EXISTS (SELECT 1 FROM acked) \
                     ) SELECT 1 FROM relaxed UNION ALL SELECT 1 FROM woken"
                ))
                .bind(&group_key)
                .bind(&seqs)
                .bind(&attempts)
                .bind(&channel)
                .bind(ordered)
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
            acks: postgres_acks(&shared, group_key.clone(), options.ordered),
            shared,
            group_key,
            options: options.clone(),
            lease: options.lease,
            ephemeral: options.ephemeral,
            closed: AtomicBool::new(false),
            mine: Mutex::new(HashMap::new()),
        }
    }

    /// Claims up to `max` visible deliveries: rows other consumers are
    /// claiming at this moment are skipped, not waited for. The commit does
    /// not wait for its WAL flush (see [`relaxed!`]).
    ///
    /// The claimed rows are updated by their `ctid`s, which stay theirs
    /// while the claim holds their locks: matched by key instead, the
    /// planner may scan the group's every row (it did, on a table whose
    /// statistics lagged its backlog), so each claim grew as slow as the
    /// backlog was long.
    ///
    /// On an ordered subscription, only the oldest unsettled delivery of
    /// each key is claimable: an earlier one of its key, claimed by anyone,
    /// nacked or not yet due, holds it back (see [`ORDERED_CLAIM`]).
    async fn claim(&self, max: usize) -> Result<Vec<Delivery>> {
        let claim = |query| {
            sqlx::query(query)
                .bind(&self.group_key)
                .bind(max as i64)
                .bind(self.lease.as_millis() as i64)
        };
        let query = if self.options.ordered {
            // Twice what is asked: rows held back by their keys are parked
            // as the scan passes them, so a claim reads at most this many.
            let scan = (max * 2).max(64);
            claim(ORDERED_CLAIM)
                .bind(scan as i64)
                .bind(PARK.as_millis() as i64)
        } else {
            claim(CLAIM)
        };
        let rows = query.fetch_all(&self.shared.pool).await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut mine = self.mine.lock().unwrap();
        for row in rows {
            let seq: i64 = row.try_get("seq")?;
            let attempt: i32 = row.try_get("attempt")?;
            let message = stored_message(
                seq,
                row.try_get("id")?,
                row.try_get("topic")?,
                row.try_get("msg_key")?,
                &row.try_get::<String, _>("headers")?,
                row.try_get("payload")?,
                row.try_get("timestamp_ms")?,
            );
            mine.insert(seq, attempt);
            deliveries.push(Delivery {
                message,
                attempt: attempt as u32,
                receipt: Receipt::new(PostgresReceipt { seq, attempt }),
            });
        }
        Ok(deliveries)
    }

    /// Settles one delivery; the error keeps its kind (see
    /// [`SettleError`]).
    async fn settle_one(&self, delivery: &Delivery, settlement: Settlement) -> Result<()> {
        let result = self.settle(vec![(delivery, settlement)]).await.pop();
        result.expect("one answer").map_err(anyhow::Error::new)
    }

    fn forget(&self, receipt: &PostgresReceipt) {
        forget_claim(&mut self.mine.lock().unwrap(), receipt.seq, receipt.attempt);
    }

    /// How long until the group's next delivery becomes visible (a nack's
    /// delay or a lease running out), if it has any. On an ordered
    /// subscription only claimed or delayed deliveries count: one that is
    /// visible but held back by its key waits for a settlement, which wakes
    /// the group. Makes the group again
    /// if its patterns are gone (the tables were made again since it
    /// subscribed): publishes would no longer reach it.
    async fn next_due(&self) -> Result<Option<Duration>> {
        let (millis, patterns): (Option<f64>, i64) = sqlx::query_as(
            "SELECT (SELECT (EXTRACT(EPOCH FROM MIN(visible_at) - now()) * 1000)::float8 \
                     FROM sluice_deliveries WHERE group_key = $1 AND (NOT $2 OR visible_at > now())), \
                    (SELECT COUNT(*) FROM sluice_groups WHERE group_key = $1)",
        )
        .bind(&self.group_key)
        .bind(self.options.ordered)
        .fetch_one(&self.shared.pool)
        .await?;
        let wanted: std::collections::HashSet<&String> = self.options.topics.iter().collect();
        if (patterns as usize) < wanted.len() {
            create_group(&self.shared.pool, &self.group_key, &self.options).await?;
            crate::backend::record_restored("postgres");
            tracing::warn!(
                group = %self.group_key,
                "the group was gone from the database and was made again from its start position"
            );
            return Ok(Some(Duration::ZERO));
        }
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
            let deliveries = match self.claim(max.max(1)).await {
                Err(e) if tables_missing(&e) => {
                    self.shared.restore_schema().await?;
                    create_group(&self.shared.pool, &self.group_key, &self.options).await?;
                    continue;
                }
                result => result?,
            };
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
        self.forget(receipt);
        self.acks.push((receipt.seq, receipt.attempt)).await;
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        self.settle_one(delivery, Settlement::Nack(delay)).await
    }

    fn transactional(&self) -> bool {
        true
    }

    async fn publish_and_ack(&self, delivery: &Delivery, messages: Vec<Message>) -> Result<()> {
        self.settle_one(delivery, Settlement::PublishAndAck(messages))
            .await
    }

    async fn settle(&self, batch: Vec<(&Delivery, Settlement)>) -> Vec<Result<(), SettleError>> {
        let claim = |r: &PostgresReceipt| (r.seq, r.attempt);
        settle_claims(batch, claim, &self.mine, async |items| {
            settle::settle(&self.shared, &self.group_key, self.options.ordered, &items).await
        })
        .await
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
        let (seqs, attempts): (Vec<i64>, Vec<i32>) = self.mine.lock().unwrap().drain().unzip();
        if !seqs.is_empty() {
            // Only the claims still current: a row whose lease ran out may
            // be another consumer's now.
            sqlx::query(
                "UPDATE sluice_deliveries d SET visible_at = now() \
                 FROM UNNEST($2::int8[], $3::int4[]) AS c(seq, attempt) \
                 WHERE d.group_key = $1 AND d.seq = ANY($2) \
                   AND d.seq = c.seq AND d.attempt = c.attempt",
            )
            .bind(&self.group_key)
            .bind(&seqs)
            .bind(&attempts)
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
