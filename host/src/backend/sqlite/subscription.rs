//! A consumer of one group on the SQLite backend. Claims and settlements go
//! through the backend's writer; a batch settles in one transaction, with
//! its outputs on a route whose output is this same file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use tokio::time::Instant;

use super::Shared;
use super::store::SqliteReceipt;
use crate::backend::claims::{forget_claim, settle_claims};
use crate::backend::{Delivery, SettleError, Settlement, SubscribeOptions, Subscription};
use crate::message::Message;

pub struct SqliteSubscription {
    shared: Arc<Shared>,
    /// The group's key (name and topics), as stored in the tables.
    group: String,
    closed: AtomicBool,
    lease: Duration,
    ephemeral: bool,
    /// Claims keep per-key order across consumers.
    ordered: bool,
    /// Claimed and unsettled (row and attempt), handed back on close.
    mine: Mutex<HashMap<i64, i64>>,
}

impl SqliteSubscription {
    pub fn new(shared: Arc<Shared>, group: String, options: &SubscribeOptions) -> Self {
        SqliteSubscription {
            shared,
            group,
            closed: AtomicBool::new(false),
            lease: options.lease,
            ephemeral: options.ephemeral,
            ordered: options.ordered,
            mine: Mutex::new(HashMap::new()),
        }
    }

    /// Settles one delivery; the error keeps its kind (see [`SettleError`]).
    async fn settle_one(&self, delivery: &Delivery, settlement: Settlement) -> Result<()> {
        let result = self.settle(vec![(delivery, settlement)]).await.pop();
        result.expect("one answer").map_err(anyhow::Error::new)
    }
}

#[async_trait]
impl Subscription for SqliteSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(crate::backend::closed_error(&self.group));
            }
            let changed = self.shared.changed.notified();
            let deliveries = self
                .shared
                .writer
                .claim(&self.group, self.lease, max.max(1), self.ordered)
                .await?;
            if !deliveries.is_empty() {
                let mut mine = self.mine.lock().unwrap();
                for delivery in &deliveries {
                    let receipt = delivery.receipt.get::<SqliteReceipt>()?;
                    mine.insert(receipt.seq, receipt.attempt);
                }
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            // Another process's publishes and due nacks are only seen by polling.
            let until = (now + self.shared.poll).min(give_up);
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Queued, and written with the writer's next transaction: a crash
    /// before then only brings the message back after its lease.
    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let receipt = delivery.receipt.get::<SqliteReceipt>()?;
        forget_claim(&mut self.mine.lock().unwrap(), receipt.seq, receipt.attempt);
        self.shared
            .writer
            .ack(&self.group, self.ordered, (receipt.seq, receipt.attempt))
            .await;
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
        let claim = |r: &SqliteReceipt| (r.seq, r.attempt);
        settle_claims(batch, claim, &self.mine, async |items| {
            self.shared
                .writer
                .settle(&self.group, self.ordered, items)
                .await
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Requests are written in the order they were queued, so the acks
        // queued before this are written by the time it returns.
        if self.ephemeral {
            return self.shared.writer.drop_group(&self.group).await;
        }
        let mine: Vec<(i64, i64)> = self.mine.lock().unwrap().drain().collect();
        self.shared.writer.release(&self.group, mine).await
    }
}
