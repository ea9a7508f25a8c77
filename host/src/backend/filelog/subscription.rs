//! A member of a consumer group on the file log: fetch waits on the store's
//! change signal or the group's next lease or delay; close hands back what
//! it still holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow};
use async_trait::async_trait;
use tokio::time::Instant;

use super::delivery::FileReceipt;
use super::store::Store;
use crate::backend::{Delivery, SettleError, Settlement, Subscription, closed_error};

pub struct FileSubscription {
    pub(super) store: Arc<Store>,
    /// The group key (name and topics).
    pub(super) key: String,
    pub(super) id: u64,
    pub(super) lease: Duration,
    pub(super) closed: AtomicBool,
    /// Held and unsettled: (topic, offset) → claim.
    pub(super) mine: Mutex<HashMap<(Arc<str>, u64), u64>>,
}

impl FileSubscription {
    fn forget(&self, receipt: &FileReceipt) {
        self.mine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(receipt.topic.clone(), receipt.offset));
    }
}

#[async_trait]
impl Subscription for FileSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(closed_error(&self.key));
            }
            // Registered before looking, so a publish in between is not missed.
            let changed = self.store.changed.notified();
            let (claimed, due) = super::blocking(&self.store, || {
                self.store.claim(&self.key, self.id, self.lease, max.max(1))
            })?;
            if !claimed.is_empty() {
                {
                    let mut mine = self.mine.lock().unwrap_or_else(|e| e.into_inner());
                    for item in &claimed {
                        mine.insert((item.topic.clone(), item.offset), item.claim);
                    }
                }
                let deliveries = self.store.read(&self.key, claimed);
                if !deliveries.is_empty() {
                    return Ok(deliveries);
                }
                continue;
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            let until = due.map_or(give_up, |due| due.min(give_up));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let receipt = delivery.receipt.get::<FileReceipt>()?;
        super::blocking(&self.store, || self.store.ack(&self.key, receipt))?;
        self.forget(receipt);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let receipt = delivery.receipt.get::<FileReceipt>()?;
        super::blocking(&self.store, || self.store.nack(&self.key, receipt, delay))?;
        self.forget(receipt);
        Ok(())
    }

    async fn settle(&self, batch: Vec<(&Delivery, Settlement)>) -> Vec<Result<(), SettleError>> {
        let mut receipts = Vec::with_capacity(batch.len());
        for (delivery, settlement) in &batch {
            let delay = match settlement {
                Settlement::Ack => None,
                Settlement::Nack(delay) => Some(*delay),
                // Not transactional: the router never asks for this.
                Settlement::PublishAndAck(_) => {
                    return batch
                        .iter()
                        .map(|_| {
                            Err(SettleError::Fatal(anyhow!(
                                "the file log cannot publish and acknowledge in one transaction"
                            )))
                        })
                        .collect();
                }
            };
            match delivery.receipt.get::<FileReceipt>() {
                Ok(receipt) => receipts.push((receipt, delay)),
                Err(e) => {
                    return batch
                        .iter()
                        .map(|_| Err(SettleError::Fatal(anyhow!("{e:#}"))))
                        .collect();
                }
            }
        }
        let settled = super::blocking(&self.store, || self.store.settle(&self.key, &receipts));
        match settled {
            Ok(()) => {
                receipts
                    .iter()
                    .for_each(|(receipt, _)| self.forget(receipt));
                batch.iter().map(|_| Ok(())).collect()
            }
            Err(e) => batch
                .iter()
                .map(|_| Err(SettleError::Unavailable(anyhow!("{e:#}"))))
                .collect(),
        }
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let held: Vec<(Arc<str>, u64, u64)> = self
            .mine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|((topic, offset), claim)| (topic, offset, claim))
            .collect();
        self.store.leave(&self.key, held);
        Ok(())
    }
}

impl Drop for FileSubscription {
    fn drop(&mut self) {
        // Dropped without close (a consumer that went away): it stops
        // counting as a member, but what it held comes back only when the
        // lease runs out, as it would for a crashed process.
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.store.leave(&self.key, Vec::new());
        }
    }
}
