//! Settling deliveries in batches: deletes (acks) wait a few milliseconds
//! (`ack_batch_ms`) to go out ten at a time in DeleteMessageBatch, and
//! visibility changes (keeping held deliveries, handing them back on close)
//! go out in ChangeMessageVisibilityBatch.
//!
//! An ack returns once its delete is queued, as the SQLite backend's does:
//! a delete that fails, or is lost with the process, only means the message
//! comes back after its visibility timeout, which at-least-once allows.
//! Close waits for every queued delete.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use tokio::sync::Notify;

use super::names::queue_name_of;
use super::send::MAX_BATCH;

/// Queued deletes of one subscription, by queue.
pub struct AckBatcher {
    sqs: Client,
    urls: Vec<String>,
    linger: Duration,
    pending: Mutex<Pending>,
    in_flight: AtomicUsize,
    idle: Notify,
}

struct Pending {
    /// Receipt handles to delete, per queue index.
    by_queue: Vec<Vec<String>>,
    /// A flush is scheduled.
    timer: bool,
}

impl AckBatcher {
    pub fn new(sqs: Client, urls: Vec<String>, linger: Duration) -> Arc<Self> {
        let queues = urls.len();
        Arc::new(AckBatcher {
            sqs,
            urls,
            linger,
            pending: Mutex::new(Pending {
                by_queue: vec![Vec::new(); queues],
                timer: false,
            }),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Queues the delete of one received message.
    pub fn delete(self: &Arc<Self>, queue: usize, receipt: String) {
        let (full, arm) = {
            let mut pending = self.pending.lock().unwrap();
            let list = &mut pending.by_queue[queue];
            list.push(receipt);
            if list.len() >= MAX_BATCH {
                (Some(std::mem::take(list)), false)
            } else if pending.timer {
                (None, false)
            } else {
                pending.timer = true;
                (None, true)
            }
        };
        if let Some(batch) = full {
            self.send(queue, batch);
        }
        if arm {
            let batcher = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(batcher.linger).await;
                batcher.flush();
            });
        }
    }

    /// Sends every queued delete now.
    pub fn flush(self: &Arc<Self>) {
        let batches: Vec<(usize, Vec<String>)> = {
            let mut pending = self.pending.lock().unwrap();
            pending.timer = false;
            pending
                .by_queue
                .iter_mut()
                .enumerate()
                .filter(|(_, list)| !list.is_empty())
                .map(|(queue, list)| (queue, std::mem::take(list)))
                .collect()
        };
        for (queue, receipts) in batches {
            for chunk in receipts.chunks(MAX_BATCH) {
                self.send(queue, chunk.to_vec());
            }
        }
    }

    /// Sends what is queued and waits until every delete is done.
    pub async fn drain(self: &Arc<Self>) {
        self.flush();
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn send(self: &Arc<Self>, queue: usize, receipts: Vec<String>) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let batcher = self.clone();
        tokio::spawn(async move {
            let url = &batcher.urls[queue];
            if let Err(e) = delete_batch(&batcher.sqs, url, &receipts).await {
                tracing::warn!(
                    queue = queue_name_of(url),
                    "acknowledged messages will come back after their lease: {e:#}"
                );
            }
            batcher.in_flight.fetch_sub(1, Ordering::SeqCst);
            batcher.idle.notify_waiters();
        });
    }
}

async fn delete_batch(sqs: &Client, url: &str, receipts: &[String]) -> Result<()> {
    let entries = receipts
        .iter()
        .enumerate()
        .map(|(i, receipt)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .build()
                .expect("id and receipt handle are set")
        })
        .collect();
    let out = sqs
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .context("SQS DeleteMessageBatch")?;
    if let Some(failed) = out.failed().first() {
        anyhow::bail!(
            "{} of {} deletes failed, e.g. {} {}",
            out.failed().len(),
            receipts.len(),
            failed.code(),
            failed.message().unwrap_or("")
        );
    }
    Ok(())
}

/// Sets the visibility timeout of received messages of the queue at
/// `url`: `(receipt handle, seconds)` pairs. Returns the positions in
/// `entries` of those SQS refused (their receipt is stale: the message was
/// deleted, or its visibility had already run out and it went to another
/// consumer).
pub async fn change_visibility(
    sqs: &Client,
    url: &str,
    entries: &[(String, i32)],
) -> Result<Vec<usize>> {
    let mut refused = Vec::new();
    for (n, chunk) in entries.chunks(MAX_BATCH).enumerate() {
        let request = chunk
            .iter()
            .enumerate()
            .map(|(i, (receipt, seconds))| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(*seconds)
                    .build()
                    .expect("id and receipt handle are set")
            })
            .collect();
        let out = sqs
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(request))
            .send()
            .await
            .with_context(|| {
                format!(
                    "SQS ChangeMessageVisibilityBatch on `{}`",
                    queue_name_of(url)
                )
            })?;
        for failed in out.failed() {
            tracing::debug!(
                queue = queue_name_of(url),
                "visibility change refused: {} {}",
                failed.code(),
                failed.message().unwrap_or("")
            );
        }
        refused.extend(
            out.failed()
                .iter()
                .filter_map(|failed| failed.id().parse::<usize>().ok())
                .map(|i| n * MAX_BATCH + i),
        );
    }
    Ok(refused)
}
