//! Publish-and-ack in one transaction, group-committed: the settlements
//! workers hand in while a transaction is running go together in the next
//! one. A commit (and its fsync) per message would cap a route at a few
//! hundred messages a second; each settlement stays all-or-nothing, because
//! a message's outputs are inserted only if its claim was still current.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use tokio::sync::{Notify, oneshot};

use super::{Shared, insert_messages};
use crate::message::Message;

/// One delivery to settle: its claim, and the messages to publish with it.
struct Settlement {
    seq: i64,
    attempt: i32,
    outputs: Vec<Message>,
    done: oneshot::Sender<Result<()>>,
}

pub struct Settler {
    inner: Arc<Inner>,
}

struct Inner {
    queued: Mutex<Vec<Settlement>>,
    wake: Notify,
    /// Set when the subscription drops the settler: the task ends once the
    /// queue is empty.
    closed: AtomicBool,
}

impl Settler {
    /// Starts the committing task.
    pub fn start(shared: Arc<Shared>, group_key: String) -> Self {
        let inner = Arc::new(Inner {
            queued: Mutex::new(Vec::new()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let task = inner.clone();
        tokio::spawn(async move {
            loop {
                let woken = task.wake.notified();
                let batch = std::mem::take(&mut *task.queued.lock().unwrap());
                if batch.is_empty() {
                    if task.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    woken.await;
                    continue;
                }
                commit(&shared, &group_key, batch).await;
            }
        });
        Settler { inner }
    }

    /// Publishes `outputs` and acks the claim `(seq, attempt)` atomically.
    pub async fn settle(&self, seq: i64, attempt: i32, outputs: Vec<Message>) -> Result<()> {
        let (done, result) = oneshot::channel();
        self.inner.queued.lock().unwrap().push(Settlement {
            seq,
            attempt,
            outputs,
            done,
        });
        self.inner.wake.notify_one();
        result
            .await
            .map_err(|_| anyhow!("the subscription closed before the message was settled"))?
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

/// One transaction for the batch: delete the rows whose claims are still
/// current, insert the outputs of exactly those, commit.
async fn commit(shared: &Shared, group_key: &str, mut batch: Vec<Settlement>) {
    let seqs: Vec<i64> = batch.iter().map(|s| s.seq).collect();
    let attempts: Vec<i32> = batch.iter().map(|s| s.attempt).collect();
    let attempt = async {
        let mut tx = shared.pool.begin().await?;
        // Not waiting for the WAL flush is safe here, and saves an fsync per
        // batch: a settlement lost in a server crash is lost whole — outputs
        // and ack together — so its input is simply handled again. Anything
        // downstream that saw the outputs committed after them in the WAL,
        // so it cannot have survived the crash without them.
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let held: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM sluice_deliveries d \
             USING UNNEST($2::int8[], $3::int4[]) AS c(seq, attempt) \
             WHERE d.group_key = $1 AND d.seq = c.seq AND d.attempt = c.attempt \
             RETURNING d.seq",
        )
        .bind(group_key)
        .bind(&seqs)
        .bind(&attempts)
        .fetch_all(&mut *tx)
        .await?;
        let held: HashSet<i64> = held.into_iter().collect();
        // Moved, not copied: a failed batch is not retried from here (its
        // inputs come back), so the outputs are not needed again.
        let mut outputs = Vec::new();
        for settlement in batch.iter_mut().filter(|s| held.contains(&s.seq)) {
            outputs.append(&mut settlement.outputs);
        }
        if !outputs.is_empty() {
            insert_messages(&mut *tx, &shared.channel, &outputs).await?;
        }
        tx.commit().await?;
        anyhow::Ok(held)
    };
    match attempt.await {
        Ok(held) => {
            for settlement in batch {
                let result = if held.contains(&settlement.seq) {
                    Ok(())
                } else {
                    Err(anyhow!(
                        "message {} is no longer held by this consumer (its lease ran out); \
                         its outputs were not published",
                        settlement.seq
                    ))
                };
                let _ = settlement.done.send(result);
            }
        }
        Err(e) => {
            // Nothing of the batch took effect.
            for settlement in batch {
                let _ = settlement
                    .done
                    .send(Err(anyhow!("settling in one transaction failed: {e:#}")));
            }
        }
    }
}
