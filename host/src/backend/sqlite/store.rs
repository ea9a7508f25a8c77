//! The statements the SQLite writer runs inside its transactions: appending
//! messages, creating a group, claiming deliveries, settling them and
//! handing them back. Each takes the writer's connection; none commits.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Result;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use crate::backend::claims::stored_message;
use crate::backend::{Delivery, Receipt, Settlement, StartFrom, pattern};
use crate::message::{Message, now_ms};

/// How many log rows one claim turns into deliveries at most.
const MATERIALIZE_BATCH: i64 = 2_000;

/// Messages per `INSERT` (6 parameters each, far below SQLite's limit).
const INSERT_ROWS: usize = 64;

/// How long a delivery held back by its key stays parked (see [`claim`]).
/// Settling the delivery that holds it back brings it back at once; this
/// bounds the wait where that does not happen (its holder settled by a
/// build of Sluice that does not park).
const PARK: Duration = Duration::from_secs(2);

/// Where a delivery lives, and which claim of it this is.
pub struct SqliteReceipt {
    pub seq: i64,
    pub attempt: i64,
}

/// One delivery to settle: its claim and what to do with it.
pub type Item = crate::backend::claims::Item<i64>;

/// Appends messages to the log, in order.
pub async fn insert_messages(conn: &mut SqliteConnection, messages: &[&Message]) -> Result<()> {
    for chunk in messages.chunks(INSERT_ROWS) {
        let mut headers = Vec::with_capacity(chunk.len());
        for message in chunk {
            headers.push(serde_json::to_string(&message.headers)?);
        }
        // One statement text per chunk size, so prepared statements are
        // reused from the connection's cache.
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO sluice_messages (id, topic, msg_key, headers, payload, timestamp_ms) ",
        );
        insert.push_values(chunk.iter().zip(headers), |mut row, (message, headers)| {
            row.push_bind(message.id.as_str())
                .push_bind(message.topic.as_str())
                .push_bind(message.key.as_deref())
                .push_bind(headers)
                .push_bind(message.payload.as_slice())
                .push_bind(message.timestamp_ms as i64);
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Records a group's cursor for each of its patterns, unless it has one.
pub async fn create_group(
    conn: &mut SqliteConnection,
    group: &str,
    topics: &[String],
    start: StartFrom,
) -> Result<()> {
    for topic in topics {
        let start = match start {
            StartFrom::Earliest => "SELECT 0",
            StartFrom::Latest => "SELECT IFNULL(MAX(seq), 0) FROM sluice_messages",
        };
        let cursor: i64 = sqlx::query_scalar(start).fetch_one(&mut *conn).await?;
        sqlx::query(
            "INSERT OR IGNORE INTO sluice_groups (group_name, pattern, cursor) VALUES (?1, ?2, ?3)",
        )
        .bind(group)
        .bind(topic)
        .bind(cursor)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The claim statement, with `$filter` (text starting `AND`, about the
/// candidate row `d`) narrowing what may be claimed.
macro_rules! claim_sql {
    ($filter:literal) => {
        concat!(
            "UPDATE sluice_deliveries SET attempt = attempt + 1, visible_at = ?1 \
             WHERE group_name = ?2 AND seq IN ( \
                 SELECT d.seq FROM sluice_deliveries d \
                 WHERE d.group_name = ?2 AND d.visible_at <= ?3 ",
            $filter,
            "ORDER BY d.seq LIMIT ?4) \
             RETURNING seq, attempt"
        )
    };
}

/// Claims up to `max` visible deliveries of `group` for `lease`, after
/// turning the log rows past its cursors into deliveries. `ordered` claims
/// only the oldest unsettled delivery of each key, so a key's next message
/// waits until its previous one is settled, whichever consumer holds it.
///
/// An ordered claim then parks the deliveries it passed because their keys
/// were held (out of sight for [`PARK`]), and settling a key's holder
/// brings the key's next one back ([`delete_claimed`]). Without that, a
/// claim read every held delivery before it found a free one: with more in
/// flight than there are keys, the group's whole backlog, one index probe
/// per row, on every claim, while the writer could do nothing else (with
/// 100 keys and 20,000 messages, 6.4 ms a claim, against 1.6 ms parked).
pub async fn claim(
    conn: &mut SqliteConnection,
    group: &str,
    lease: Duration,
    max: usize,
    ordered: bool,
) -> Result<Vec<Delivery>> {
    materialize(conn, group).await?;
    let now = now_ms() as i64;
    let claim = if ordered {
        claim_sql!(
            "AND (d.msg_key IS NULL OR NOT EXISTS ( \
                 SELECT 1 FROM sluice_deliveries e \
                 WHERE e.group_name = ?2 AND e.msg_key = d.msg_key AND e.seq < d.seq)) "
        )
    } else {
        claim_sql!("")
    };
    let claimed: Vec<(i64, i64)> = sqlx::query_as(claim)
        .bind(now + lease.as_millis() as i64)
        .bind(group)
        .bind(now)
        .bind(max as i64)
        .fetch_all(&mut *conn)
        .await?;
    if ordered {
        // Past the last row claimed nothing was looked at, unless the claim
        // came up short and looked at everything.
        let passed = match claimed.iter().map(|(seq, _)| *seq).max() {
            Some(last) if claimed.len() == max => last,
            _ => i64::MAX,
        };
        park_held(conn, group, now, passed).await?;
    }
    if claimed.is_empty() {
        return Ok(Vec::new());
    }
    let seqs = serde_json::to_string(&claimed.iter().map(|(s, _)| *s).collect::<Vec<_>>())?;
    let rows = sqlx::query(
        "SELECT seq, id, topic, msg_key, headers, payload, timestamp_ms FROM sluice_messages \
         WHERE seq IN (SELECT value FROM json_each(?1)) ORDER BY seq",
    )
    .bind(seqs)
    .fetch_all(&mut *conn)
    .await?;
    let attempts: HashMap<i64, i64> = claimed.into_iter().collect();
    let mut deliveries = Vec::with_capacity(rows.len());
    for row in rows {
        let seq: i64 = row.try_get("seq")?;
        let attempt = attempts.get(&seq).copied().unwrap_or(1);
        let message = stored_message(
            seq,
            row.try_get("id")?,
            row.try_get("topic")?,
            row.try_get("msg_key")?,
            &row.try_get::<String, _>("headers")?,
            row.try_get("payload")?,
            row.try_get("timestamp_ms")?,
        );
        deliveries.push(Delivery {
            message,
            attempt: attempt as u32,
            receipt: Receipt::new(SqliteReceipt { seq, attempt }),
        });
    }
    Ok(deliveries)
}

/// Parks the visible deliveries of `group` before `passed` that an earlier
/// delivery of their key holds back. Only a delivery never claimed can be
/// held back (a key's oldest is claimed first), so `attempt = 0` with
/// `visible_at` ahead marks a parked one.
async fn park_held(conn: &mut SqliteConnection, group: &str, now: i64, passed: i64) -> Result<()> {
    sqlx::query(
        "UPDATE sluice_deliveries AS d SET visible_at = ?1 \
         WHERE d.group_name = ?2 AND d.visible_at <= ?3 AND d.seq < ?4 \
           AND d.msg_key IS NOT NULL AND EXISTS ( \
               SELECT 1 FROM sluice_deliveries e \
               WHERE e.group_name = ?2 AND e.msg_key = d.msg_key AND e.seq < d.seq)",
    )
    .bind(now + PARK.as_millis() as i64)
    .bind(group)
    .bind(now)
    .bind(passed)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Brings back the parked delivery that comes next after each of
/// `settled` (seq and key), if it is parked: its key is free.
async fn unpark_next(
    conn: &mut SqliteConnection,
    group: &str,
    settled: &[(i64, &str)],
) -> Result<()> {
    if settled.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE sluice_deliveries AS d SET visible_at = 0 \
         WHERE d.group_name = ?1 AND d.attempt = 0 AND d.visible_at > ?3 \
           AND (d.msg_key, d.seq) IN ( \
               SELECT value ->> 1, ( \
                   SELECT MIN(e.seq) FROM sluice_deliveries e \
                   WHERE e.group_name = ?1 AND e.msg_key = value ->> 1 AND e.seq > value ->> 0) \
               FROM json_each(?2))",
    )
    .bind(group)
    .bind(serde_json::to_string(settled)?)
    .bind(now_ms() as i64)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Turns log rows past the group's cursors into deliveries of the group.
async fn materialize(conn: &mut SqliteConnection, group: &str) -> Result<()> {
    let cursors: Vec<(String, i64)> =
        sqlx::query_as("SELECT pattern, cursor FROM sluice_groups WHERE group_name = ?1")
            .bind(group)
            .fetch_all(&mut *conn)
            .await?;
    for (topic_pattern, cursor) in cursors {
        let last = if pattern::is_pattern(&topic_pattern) {
            materialize_pattern(conn, group, &topic_pattern, cursor).await?
        } else {
            materialize_topic(conn, group, &topic_pattern, cursor).await?
        };
        let Some(last) = last else {
            continue;
        };
        sqlx::query("UPDATE sluice_groups SET cursor = ?1 WHERE group_name = ?2 AND pattern = ?3")
            .bind(last)
            .bind(group)
            .bind(&topic_pattern)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Turns up to [`MATERIALIZE_BATCH`] rows of `topic` past `cursor` into
/// deliveries, inside the database: the topic index says where the batch
/// ends, and one statement copies it. Returns the batch's last row.
async fn materialize_topic(
    conn: &mut SqliteConnection,
    group: &str,
    topic: &str,
    cursor: i64,
) -> Result<Option<i64>> {
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(seq) FROM (SELECT seq FROM sluice_messages \
         WHERE topic = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3)",
    )
    .bind(topic)
    .bind(cursor)
    .bind(MATERIALIZE_BATCH)
    .fetch_one(&mut *conn)
    .await?;
    if let Some(last) = last {
        sqlx::query(
            "INSERT OR IGNORE INTO sluice_deliveries (group_name, seq, attempt, visible_at, msg_key) \
             SELECT ?1, seq, 0, 0, msg_key FROM sluice_messages \
             WHERE topic = ?2 AND seq > ?3 AND seq <= ?4",
        )
        .bind(group)
        .bind(topic)
        .bind(cursor)
        .bind(last)
        .execute(&mut *conn)
        .await?;
    }
    Ok(last)
}

/// Turns the rows matching `topic_pattern` among up to
/// [`MATERIALIZE_BATCH`] rows of the log past `cursor` into deliveries
/// (the match is Sluice's, so the rows come to the client). Returns the
/// last row looked at.
async fn materialize_pattern(
    conn: &mut SqliteConnection,
    group: &str,
    topic_pattern: &str,
    cursor: i64,
) -> Result<Option<i64>> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT seq, topic FROM sluice_messages WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )
    .bind(cursor)
    .bind(MATERIALIZE_BATCH)
    .fetch_all(&mut *conn)
    .await?;
    let Some(&(last, _)) = rows.last() else {
        return Ok(None);
    };
    let matching: Vec<i64> = rows
        .iter()
        .filter(|(_, topic)| pattern::matches(topic_pattern, topic))
        .map(|(seq, _)| *seq)
        .collect();
    sqlx::query(
        "INSERT OR IGNORE INTO sluice_deliveries (group_name, seq, attempt, visible_at, msg_key) \
         SELECT ?1, m.seq, 0, 0, m.msg_key FROM sluice_messages m \
         WHERE m.seq IN (SELECT value FROM json_each(?2))",
    )
    .bind(group)
    .bind(serde_json::to_string(&matching)?)
    .execute(&mut *conn)
    .await?;
    Ok(Some(last))
}

/// Deletes the rows of `claims` whose claim is still current; returns the
/// claims it deleted. In an `ordered` group, each deleted delivery's key
/// passes to its next delivery, which comes out of parking.
pub async fn delete_claimed(
    conn: &mut SqliteConnection,
    group: &str,
    ordered: bool,
    claims: &[(i64, i64)],
) -> Result<HashSet<(i64, i64)>> {
    if claims.is_empty() {
        return Ok(HashSet::new());
    }
    // The key only where it is handed on: no string per ack otherwise.
    let deleted: Vec<(i64, i64, Option<String>)> = sqlx::query_as(
        "DELETE FROM sluice_deliveries \
         WHERE group_name = ?1 \
           AND seq IN (SELECT value ->> 0 FROM json_each(?2)) \
           AND (seq, attempt) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2)) \
         RETURNING seq, attempt, CASE WHEN ?3 THEN msg_key END",
    )
    .bind(group)
    .bind(serde_json::to_string(claims)?)
    .bind(ordered)
    .fetch_all(&mut *conn)
    .await?;
    if ordered {
        let keyed: Vec<(i64, &str)> = deleted
            .iter()
            .filter_map(|(seq, _, key)| Some((*seq, key.as_deref()?)))
            .collect();
        unpark_next(conn, group, &keyed).await?;
    }
    Ok(deleted
        .into_iter()
        .map(|(seq, attempt, _)| (seq, attempt))
        .collect())
}

/// Settles `items` of `group`; returns the claims it settled (the others'
/// leases have passed to another consumer).
pub async fn settle(
    conn: &mut SqliteConnection,
    group: &str,
    ordered: bool,
    items: &[Item],
) -> Result<HashSet<(i64, i64)>> {
    let acks: Vec<(i64, i64)> = items
        .iter()
        .filter(|item| !matches!(item.settlement, Settlement::Nack(_)))
        .map(|item| (item.seq, item.attempt))
        .collect();
    let mut held = delete_claimed(conn, group, ordered, &acks).await?;
    let mut outputs = Vec::new();
    for item in items {
        match &item.settlement {
            Settlement::PublishAndAck(messages) if held.contains(&(item.seq, item.attempt)) => {
                outputs.extend(messages.iter());
            }
            Settlement::Nack(delay) => {
                // Nacks are rare: a statement each.
                let moved = sqlx::query(
                    "UPDATE sluice_deliveries SET visible_at = ?1 \
                     WHERE group_name = ?2 AND seq = ?3 AND attempt = ?4",
                )
                .bind(now_ms() as i64 + delay.as_millis() as i64)
                .bind(group)
                .bind(item.seq)
                .bind(item.attempt)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if moved == 1 {
                    held.insert((item.seq, item.attempt));
                }
            }
            _ => {}
        }
    }
    insert_messages(conn, &outputs).await?;
    Ok(held)
}

/// Makes the claims still current visible again at once.
pub async fn release(
    conn: &mut SqliteConnection,
    group: &str,
    claims: &[(i64, i64)],
) -> Result<()> {
    sqlx::query(
        "UPDATE sluice_deliveries SET visible_at = 0 \
         WHERE group_name = ?1 \
           AND seq IN (SELECT value ->> 0 FROM json_each(?2)) \
           AND (seq, attempt) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2))",
    )
    .bind(group)
    .bind(serde_json::to_string(claims)?)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Removes a group and everything it had yet to settle.
pub async fn drop_group(conn: &mut SqliteConnection, group: &str) -> Result<()> {
    sqlx::query("DELETE FROM sluice_deliveries WHERE group_name = ?1")
        .bind(group)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM sluice_groups WHERE group_name = ?1")
        .bind(group)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
