//! Settling a batch of deliveries on PostgreSQL in one statement: the acks
//! (and the acks of publish-and-ack items) delete their rows, the nacks move
//! theirs, and the outputs of exactly the publish-and-ack items whose rows
//! were deleted are inserted, fanned out and notified — all in one implicit
//! transaction, so one round trip and one commit settle the whole batch.
//!
//! A row is only touched while the claim that settles it is still the
//! current one (same attempt): a delivery whose lease passed to another
//! consumer changes nothing and answers [`SettleError::LeaseLost`]. If the
//! statement is refused (e.g. an output PostgreSQL cannot store), the batch
//! is settled again one item at a time, each under a savepoint of one
//! transaction, so the item at fault fails alone.
//!
//! Rows are matched by key with `seq = ANY(…)` besides the join, so the
//! primary key finds them whatever the planner believes of the table: with
//! statistics that lag a growing backlog, the join alone was planned as a
//! scan of the group's every row.

use std::collections::HashSet;

use anyhow::anyhow;
use sqlx::{Acquire, PgConnection, Row};

use super::subscription::unpark;
use super::{OutputColumns, Shared, check_topic, fan_out, relaxed};
use crate::backend::{SettleError, Settlement};

/// One delivery to settle: its claim and what to do with it.
pub type Item = crate::backend::claims::Item<i32>;

/// Deletes the acked rows, moves the nacked ones and inserts the outputs of
/// the acked rows that carry any. On an ordered group (`$16`), an ack may
/// free a key other consumers wait for: it brings the key's next row out of
/// parking and wakes the group. Returns the `(seq, attempt)` of every row
/// it settled. It commits without waiting for the WAL flush (see
/// [`relaxed!`]).
const SETTLE: &str = concat!(
    "WITH ",
    relaxed!(),
    ", acked AS ( \
         DELETE FROM sluice_deliveries d \
         USING UNNEST($2::int8[], $3::int4[]) AS c(seq, attempt) \
         WHERE d.group_key = $1 AND d.seq = ANY($2) AND d.seq = c.seq AND d.attempt = c.attempt \
         RETURNING d.seq, d.attempt, d.msg_key \
     ), ",
    unpark!("$16"),
    ", nacked AS ( \
         UPDATE sluice_deliveries d SET visible_at = now() + c.delay_ms * interval '1 millisecond' \
         FROM UNNEST($4::int8[], $5::int4[], $6::int8[]) AS c(seq, attempt, delay_ms) \
         WHERE d.group_key = $1 AND d.seq = ANY($4) AND d.seq = c.seq AND d.attempt = c.attempt \
         RETURNING d.seq, d.attempt \
     ), new AS ( \
         INSERT INTO sluice_messages (id, topic, msg_key, headers, payload, timestamp_ms) \
         SELECT o.id, o.topic, o.msg_key, o.headers::jsonb, o.payload, o.timestamp_ms \
         FROM UNNEST($7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[], $12::int8[], \
                     $13::int8[], $14::int4[]) \
              WITH ORDINALITY AS o(id, topic, msg_key, headers, payload, timestamp_ms, \
                                   owner_seq, owner_attempt, ord) \
         WHERE (o.owner_seq, o.owner_attempt) IN (SELECT seq, attempt FROM acked) \
         ORDER BY o.ord \
         RETURNING seq, topic, msg_key \
     ), ",
    fan_out!("$15"),
    ", freed AS ( \
         SELECT pg_notify($15, $1) WHERE $16 AND EXISTS (SELECT 1 FROM acked) \
     ) \
     SELECT seq, attempt FROM acked \
     UNION ALL SELECT seq, attempt FROM nacked \
     UNION ALL SELECT NULL, NULL FROM woken \
     UNION ALL SELECT NULL, NULL FROM freed \
     UNION ALL SELECT NULL, NULL FROM relaxed"
);

/// Settles `items` of `group_key` (an `ordered` subscription's, or not),
/// answering for each in order.
pub async fn settle(
    shared: &Shared,
    group_key: &str,
    ordered: bool,
    items: &[Item],
) -> Vec<Result<(), SettleError>> {
    // An output that can never be published fails its own item only.
    let mut results: Vec<Option<Result<(), SettleError>>> = items
        .iter()
        .map(|item| match &item.settlement {
            Settlement::PublishAndAck(messages) => messages
                .iter()
                .try_for_each(check_topic)
                .err()
                .map(|e| Err(SettleError::Unavailable(e))),
            _ => None,
        })
        .collect();
    let valid: Vec<&Item> = items
        .iter()
        .zip(&results)
        .filter(|(_, result)| result.is_none())
        .map(|(item, _)| item)
        .collect();
    let mut answered = settle_valid(shared, group_key, ordered, &valid)
        .await
        .into_iter();
    for result in results.iter_mut().filter(|r| r.is_none()) {
        *result = answered.next();
    }
    results
        .into_iter()
        .map(|r| r.expect("every item answered"))
        .collect()
}

async fn settle_valid(
    shared: &Shared,
    group_key: &str,
    ordered: bool,
    items: &[&Item],
) -> Vec<Result<(), SettleError>> {
    if items.is_empty() {
        return Vec::new();
    }
    let mut conn = match shared.pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return unavailable(items.len(), &e.into()),
    };
    match run(&mut conn, &shared.channel, group_key, ordered, items).await {
        Ok(held) => answers(items, &held),
        Err(e) if is_refusal(&e) && items.len() > 1 => {
            one_by_one(&mut conn, &shared.channel, group_key, ordered, items).await
        }
        Err(e) => unavailable(items.len(), &e.into()),
    }
}

/// Each item under a savepoint of its own, all in one transaction: the one
/// the database refuses fails alone.
async fn one_by_one(
    conn: &mut PgConnection,
    channel: &str,
    group_key: &str,
    ordered: bool,
    items: &[&Item],
) -> Vec<Result<(), SettleError>> {
    let attempt = async {
        let mut tx = conn.begin().await?;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let mut savepoint = tx.begin().await?;
            let one = std::slice::from_ref(item);
            match run(&mut savepoint, channel, group_key, ordered, one).await {
                Ok(held) => {
                    savepoint.commit().await?;
                    results.extend(answers(one, &held));
                }
                Err(e) if is_refusal(&e) => {
                    savepoint.rollback().await?;
                    results.push(Err(SettleError::Unavailable(anyhow!(
                        "message {} could not be settled: {e}",
                        item.seq
                    ))));
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        Ok::<_, sqlx::Error>(results)
    };
    attempt
        .await
        .unwrap_or_else(|e| unavailable(items.len(), &e.into()))
}

/// Runs [`SETTLE`] for `items`.
async fn run(
    conn: &mut PgConnection,
    channel: &str,
    group_key: &str,
    ordered: bool,
    items: &[&Item],
) -> Result<HashSet<(i64, i32)>, sqlx::Error> {
    let mut acks = (Vec::new(), Vec::new());
    let mut nacks = (Vec::new(), Vec::new(), Vec::new());
    let mut outputs = OutputColumns::default();
    let mut owners = (Vec::new(), Vec::new());
    for item in items {
        match &item.settlement {
            Settlement::Ack => {
                acks.0.push(item.seq);
                acks.1.push(item.attempt);
            }
            Settlement::Nack(delay) => {
                nacks.0.push(item.seq);
                nacks.1.push(item.attempt);
                nacks.2.push(delay.as_millis() as i64);
            }
            Settlement::PublishAndAck(messages) => {
                acks.0.push(item.seq);
                acks.1.push(item.attempt);
                for message in messages {
                    outputs.push(message);
                    owners.0.push(item.seq);
                    owners.1.push(item.attempt);
                }
            }
        }
    }
    let rows = sqlx::query(SETTLE)
        .bind(group_key)
        .bind(&acks.0)
        .bind(&acks.1)
        .bind(&nacks.0)
        .bind(&nacks.1)
        .bind(&nacks.2)
        .bind(&outputs.ids)
        .bind(&outputs.topics)
        .bind(&outputs.keys)
        .bind(&outputs.headers)
        .bind(&outputs.payloads)
        .bind(&outputs.timestamps)
        .bind(&owners.0)
        .bind(&owners.1)
        .bind(channel)
        .bind(ordered)
        .fetch_all(&mut *conn)
        .await?;
    let mut held = HashSet::with_capacity(rows.len());
    for row in rows {
        let seq: Option<i64> = row.try_get(0)?;
        let attempt: Option<i32> = row.try_get(1)?;
        if let (Some(seq), Some(attempt)) = (seq, attempt) {
            held.insert((seq, attempt));
        }
    }
    Ok(held)
}

fn answers(items: &[&Item], held: &HashSet<(i64, i32)>) -> Vec<Result<(), SettleError>> {
    items
        .iter()
        .map(|item| match held.contains(&(item.seq, item.attempt)) {
            true => Ok(()),
            false => Err(SettleError::LeaseLost),
        })
        .collect()
}

/// The database refused the statement (as opposed to the connection
/// failing): settling the items one by one finds the one at fault.
fn is_refusal(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(_))
}

fn unavailable(count: usize, error: &anyhow::Error) -> Vec<Result<(), SettleError>> {
    (0..count)
        .map(|_| Err(SettleError::Unavailable(anyhow!("{error:#}"))))
        .collect()
}
