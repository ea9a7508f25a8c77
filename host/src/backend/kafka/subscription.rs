//! A subscription's async side: fetch hands out what the group member's
//! thread filed, ack and nack update the ledgers (the thread commits), and
//! the last subscription of a member to close makes it leave its group.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use tokio::time::Instant;

use super::admin::Admin;
use super::members::{Member, Slot};
use super::notes;
use super::state::{KafkaReceipt, Shared};
use crate::backend::{Delivery, Subscription, closed_error};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh subscription id.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub struct KafkaSubscription {
    id: u64,
    /// The Sluice group, for messages.
    group: String,
    /// The Kafka group id.
    group_id: String,
    ephemeral: bool,
    member: Arc<Member>,
    slot: Slot,
    admin: Arc<Admin>,
    /// How long `close` waits for the member to leave its group.
    close_wait: Duration,
    closed: AtomicBool,
}

/// What a subscription's group is called: by the application and by Kafka.
pub struct GroupNames {
    pub group: String,
    pub group_id: String,
}

impl KafkaSubscription {
    /// A subscription already attached to `member` as `id`.
    pub fn new(
        id: u64,
        names: GroupNames,
        ephemeral: bool,
        member: Arc<Member>,
        slot: Slot,
        admin: Arc<Admin>,
        close_wait: Duration,
    ) -> Self {
        KafkaSubscription {
            id,
            group: names.group,
            group_id: names.group_id,
            ephemeral,
            member,
            slot,
            admin,
            close_wait,
            closed: AtomicBool::new(false),
        }
    }

    fn shared(&self) -> &Shared {
        &self.member.shared
    }

    fn receipt<'a>(&self, delivery: &'a Delivery) -> Result<&'a KafkaReceipt> {
        let receipt = delivery.receipt.get::<KafkaReceipt>()?;
        if receipt.subscription != self.id {
            bail!(
                "the delivery belongs to another subscription of group `{}`",
                self.group
            );
        }
        Ok(receipt)
    }
}

/// Waits until the group has handed the member its partitions (maybe none)
/// and each knows where it starts, at most `limit`; false if not by then.
pub async fn joined(shared: &Shared, limit: Duration) -> bool {
    let give_up = Instant::now() + limit;
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let state = shared.lock();
            if state.assignments > 0 && state.resolving.is_empty() {
                return true;
            }
        }
        if tokio::time::timeout_at(give_up, notified).await.is_err() {
            return false;
        }
    }
}

/// Counts a fetch as in progress until it returns or is dropped.
struct Fetching<'a>(&'a Shared, u64);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        if let Some(subscriber) = self.0.lock().subscribers.get_mut(&self.1) {
            subscriber.fetching -= 1;
            subscriber.last_fetch = std::time::Instant::now();
        }
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        {
            let mut state = self.shared().lock();
            let Some(subscriber) = state.subscribers.get_mut(&self.id) else {
                return Err(closed_error(&self.group));
            };
            subscriber.fetching += 1;
            subscriber.last_fetch = std::time::Instant::now();
        }
        let _fetching = Fetching(self.shared(), self.id);
        loop {
            let notified = self.shared().changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_due = {
                let mut state = self.shared().lock();
                if !state.subscribers.contains_key(&self.id) {
                    return Err(closed_error(&self.group));
                }
                let next_due = state.release_due(std::time::Instant::now());
                let deliveries = state.hand_out(max, self.id);
                if !deliveries.is_empty() {
                    return Ok(deliveries);
                }
                next_due
            };
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            let wake = next_due.map_or(give_up, |due| Instant::from_std(due).min(give_up));
            let _ = tokio::time::timeout_at(wake, notified).await;
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let receipt = self.receipt(delivery)?;
        let ticket = &receipt.ticket;
        // A partition given up since is settled by its next owner.
        if let Some(ledger) = self.shared().lock().ledger(ticket) {
            ledger.ack(ticket.offset);
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let receipt = self.receipt(delivery)?;
        let ticket = receipt.ticket.clone();
        let mut state = self.shared().lock();
        let waiting = state
            .ledger(&ticket)
            .is_some_and(|ledger| ledger.nack(ticket.offset, receipt.attempt));
        if !waiting {
            return Ok(());
        }
        if delay.is_zero() {
            state.ready.push_front(ticket);
        } else {
            let due = std::time::Instant::now() + delay;
            state.delayed.push(Reverse((due, ticket)));
        }
        drop(state);
        self.shared().changed.notify_waiters();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut slot = self.slot.lock().await;
        if !self.member.detach(self.id) {
            return Ok(());
        }
        // The last one: the member leaves, before another may join.
        let (done, left) = tokio::sync::oneshot::channel();
        self.member.stop(Some(done));
        if tokio::time::timeout(self.close_wait, left).await.is_err() {
            tracing::warn!(
                group = %self.group_id,
                "Kafka: the member did not leave its group within {:?}; its partitions move after the session timeout",
                self.close_wait
            );
        }
        *slot = Weak::new();
        drop(slot);
        if self.ephemeral {
            notes::forget(&self.group_id);
            self.admin.delete_group(&self.group_id).await;
        }
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::SeqCst) && self.member.detach(self.id) {
            self.member.stop(None);
        }
    }
}
