//! The PostgreSQL backend's background work: one LISTEN connection per
//! backend that wakes the consumers of the groups a publish notified, and a
//! cleaner that deletes settled messages past their retention.

use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::PgListener;

use super::Shared;

/// Listens on the schema's channel; each notification names a group key.
pub async fn start(shared: &Arc<Shared>) -> Result<()> {
    let mut listener = PgListener::connect_with(&shared.pool)
        .await
        .context("cannot open the PostgreSQL notification connection")?;
    listener.listen(&shared.channel).await?;
    let stop = shared.stop.clone();
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            let received = tokio::select! {
                received = listener.try_recv() => received,
                _ = stop.cancelled() => return,
            };
            let Some(shared) = weak.upgrade() else { return };
            match received {
                Ok(Some(notification)) => {
                    if let Some(waker) = shared.wakers.lock().unwrap().get(notification.payload()) {
                        waker.notify_waiters();
                    }
                }
                // The connection was lost and is being re-established:
                // notifications may have been missed meanwhile.
                Ok(None) => shared.wake_all(),
                Err(e) => {
                    tracing::warn!("PostgreSQL notifications failed, retrying: {e:#}");
                    drop(shared);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Some(shared) = weak.upgrade() {
                        shared.wake_all();
                    }
                }
            }
        }
    });
    Ok(())
}

/// Deletes, every `cleanup_ms`, messages no group still has to settle and
/// that are older than `retention_ms`.
pub fn start_cleaner(shared: &Arc<Shared>) {
    let stop = shared.stop.clone();
    let interval = shared.settings.cleanup;
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = clean(&weak).await {
                tracing::warn!("deleting settled PostgreSQL messages failed: {e:#}");
            }
        }
    });
}

/// Rows deleted per statement, so one cleanup never holds long locks.
const CLEANUP_BATCH: i64 = 5_000;

async fn clean(weak: &Weak<Shared>) -> Result<()> {
    loop {
        let Some(shared) = weak.upgrade() else {
            return Ok(());
        };
        let mut tx = shared.pool.begin().await?;
        // A group being created (which holds the groups table exclusively)
        // may be giving itself rows for these messages.
        sqlx::query("LOCK TABLE sluice_groups IN ACCESS SHARE MODE")
            .execute(&mut *tx)
            .await?;
        // Every delivery row belongs to a recorded group, so a message is
        // settled when no group's primary key holds it.
        let deleted = sqlx::query(
            "DELETE FROM sluice_messages WHERE seq IN ( \
                 SELECT m.seq FROM sluice_messages m \
                 WHERE m.published_at < now() - $1 * interval '1 millisecond' \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM sluice_deliveries d \
                       WHERE d.group_key = ANY(ARRAY(SELECT DISTINCT group_key FROM sluice_groups)) \
                         AND d.seq = m.seq) \
                 ORDER BY m.seq LIMIT $2)",
        )
        .bind(shared.settings.retention.as_millis() as i64)
        .bind(CLEANUP_BATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        if deleted > 0 {
            tracing::debug!(deleted, "deleted settled messages past their retention");
        }
        if (deleted as i64) < CLEANUP_BATCH {
            return Ok(());
        }
    }
}
