//! Acks gathered for a few milliseconds and written with one statement, for
//! the PostgreSQL backend's single `ack`s (a batch settled with `settle` is
//! written at once).
//!
//! An ack returns once queued. Losing queued acks in a crash only makes
//! those messages come back after their lease — a duplicate, never a loss —
//! so a round trip (and an fsync) per ack is not worth its cost. The queue
//! is bounded: a full one is written at once rather than after the linger,
//! and an ack waits while [`QUEUED_MAX`] are queued (a failing database
//! holds acks back rather than piling them up), so a crash redelivers at
//! most that many acked messages. A failed write is retried; stopping
//! writes what is queued one last time.

// Only the PostgreSQL backend acks this way now.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use futures::future::BoxFuture;
use tokio::sync::Notify;

/// Acks queued and not yet written, at most.
pub const QUEUED_MAX: usize = 1024;

/// A claim of a row: its id and which attempt claimed it. An ack only
/// removes the row while that claim is still the current one.
pub type Claim = (i64, i32);

/// Writes a batch of acknowledged claims.
pub type WriteAcks = Box<dyn Fn(Vec<Claim>) -> BoxFuture<'static, Result<()>> + Send + Sync>;

pub struct AckBatcher {
    /// The group, for log lines.
    group: String,
    queued: Mutex<Vec<Claim>>,
    wake: Notify,
    /// Rung when the queue is full, to write it before the linger is over.
    full: Notify,
    /// Rung when queued acks were written, for acks waiting for room.
    written: Notify,
    stopping: AtomicBool,
    write: WriteAcks,
}

impl AckBatcher {
    /// Starts the writer task; acks wait `linger` for company.
    pub fn start(group: String, linger: Duration, write: WriteAcks) -> Arc<Self> {
        let batcher = Arc::new(AckBatcher {
            group,
            queued: Mutex::new(Vec::new()),
            wake: Notify::new(),
            full: Notify::new(),
            written: Notify::new(),
            stopping: AtomicBool::new(false),
            write,
        });
        let worker = batcher.clone();
        tokio::spawn(async move {
            loop {
                worker.wake.notified().await;
                let stopping = worker.stopping.load(Ordering::SeqCst);
                if !stopping {
                    tokio::select! {
                        _ = tokio::time::sleep(linger) => {}
                        _ = worker.full.notified() => {}
                    }
                }
                let result = worker.flush().await;
                if stopping {
                    if let Err(e) = result {
                        tracing::warn!(group = %worker.group, "acks not written; they will be redelivered: {e:#}");
                    }
                    return;
                }
                if let Err(e) = result {
                    tracing::warn!(group = %worker.group, "writing acks failed, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    worker.wake.notify_one();
                }
            }
        });
        batcher
    }

    /// Queues an ack; waits while the queue is full.
    pub async fn push(&self, claim: Claim) {
        loop {
            let written = self.written.notified();
            {
                let mut queued = self.queued.lock().unwrap();
                if queued.len() < QUEUED_MAX || self.stopping.load(Ordering::SeqCst) {
                    queued.push(claim);
                    if queued.len() >= QUEUED_MAX {
                        self.full.notify_one();
                    }
                    break;
                }
            }
            written.await;
        }
        self.wake.notify_one();
    }

    async fn flush(&self) -> Result<()> {
        let claims = std::mem::take(&mut *self.queued.lock().unwrap());
        if claims.is_empty() {
            return Ok(());
        }
        if let Err(e) = (self.write)(claims.clone()).await {
            self.queued.lock().unwrap().extend(claims);
            return Err(e);
        }
        self.written.notify_waiters();
        Ok(())
    }

    /// Writes what is queued and stops the writer.
    pub async fn stop(&self) -> Result<()> {
        self.stop_soon();
        self.flush().await
    }

    /// Lets the writer write what is queued and stop, without waiting (for
    /// a subscription dropped without `close`).
    pub fn stop_soon(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}
