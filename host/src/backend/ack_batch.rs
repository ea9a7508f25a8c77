//! Acks gathered for a few milliseconds and written with one statement, for
//! the PostgreSQL backend's single `ack`s (a batch settled with `settle` is
//! written at once).
//!
//! An ack returns once queued. Losing queued acks in a crash only makes
//! those messages come back after their lease — a duplicate, never a loss —
//! so a round trip (and an fsync) per ack is not worth its cost. A failed
//! write is retried; stopping writes what is queued one last time.

// Only the PostgreSQL backend acks this way now.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use futures::future::BoxFuture;
use tokio::sync::Notify;

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
            stopping: AtomicBool::new(false),
            write,
        });
        let worker = batcher.clone();
        tokio::spawn(async move {
            loop {
                worker.wake.notified().await;
                let stopping = worker.stopping.load(Ordering::SeqCst);
                if !stopping {
                    tokio::time::sleep(linger).await;
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

    pub fn push(&self, claim: Claim) {
        self.queued.lock().unwrap().push(claim);
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
