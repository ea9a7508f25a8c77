//! A subscription's async side: fetch hands out what the group member's
//! thread filed, settling updates the ledgers (a whole batch under one
//! lock; the thread commits the settled offsets every `commit_ms`), and
//! the last subscription of a member to close makes it leave its group.
//!
//! A batch settle answers [`SettleError::LeaseLost`] for a delivery whose
//! partition the member gave up since, or that was handed out again since
//! (its subscription was taken for dead), and leaves the books alone; the
//! single `ack` and `nack` treat that as done, as its new holder settles it.

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
use super::state::{KafkaReceipt, Shared, State, Ticket};
use crate::backend::{Delivery, SettleError, Settlement, Subscription, closed_error};

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

    /// Settles one delivery in the member's books; the thread commits.
    fn settle_one(
        &self,
        state: &mut State,
        delivery: &Delivery,
        settlement: &Settlement,
        now: std::time::Instant,
        again: &mut Again,
    ) -> Result<(), SettleError> {
        if let Settlement::PublishAndAck(_) = settlement {
            return Err(SettleError::Fatal(anyhow::anyhow!(
                "Kafka cannot publish and acknowledge in one transaction"
            )));
        }
        let receipt = self.receipt(delivery).map_err(SettleError::Fatal)?;
        let ticket = &receipt.ticket;
        // A partition given up since is settled by its next owner, and a
        // delivery handed out again since belongs to its new holder.
        let ledger = state.ledger(ticket).ok_or(SettleError::LeaseLost)?;
        if ledger.superseded(ticket.offset, receipt.attempt) {
            return Err(SettleError::LeaseLost);
        }
        match settlement {
            Settlement::Nack(delay) => {
                if !ledger.nack(ticket.offset, receipt.attempt) {
                    return Ok(());
                }
                if delay.is_zero() {
                    again.now.push(ticket.clone());
                } else {
                    state.delayed.push(Reverse((now + *delay, ticket.clone())));
                    again.later = true;
                }
            }
            _ => again.now.extend(state.settled(ticket)),
        }
        Ok(())
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

/// Nacked deliveries of a settled batch, to queue once the batch is done.
#[derive(Default)]
struct Again {
    /// Nacked with no delay, or unshelved by an ack: first in line again.
    now: Vec<Ticket>,
    /// Some wait out a delay.
    later: bool,
}

/// The answer of a batch of one, as the single-delivery calls give it: a
/// delivery whose partition or lease passed on is settled by its new
/// holder, so settling it here is a no-op rather than an error.
fn passed_on_is_done(mut results: Vec<Result<(), SettleError>>) -> Result<()> {
    match results.pop() {
        Some(Err(SettleError::LeaseLost)) | Some(Ok(())) | None => Ok(()),
        Some(Err(e)) => Err(e.into()),
    }
}

/// Counts a fetch as in progress until it returns or is dropped.
struct Fetching<'a>(&'a Shared, u64);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        if let Some(subscriber) = self.0.lock().subscribers.get_mut(&self.1) {
            subscriber.fetching -= 1;
            subscriber.last_active = std::time::Instant::now();
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
            subscriber.last_active = std::time::Instant::now();
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
        passed_on_is_done(self.settle(vec![(delivery, Settlement::Ack)]).await)
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        passed_on_is_done(self.settle(vec![(delivery, Settlement::Nack(delay))]).await)
    }

    async fn settle(&self, batch: Vec<(&Delivery, Settlement)>) -> Vec<Result<(), SettleError>> {
        let mut again = Again::default();
        let (results, wake): (Vec<Result<(), SettleError>>, bool) = {
            let mut state = self.shared().lock();
            let now = std::time::Instant::now();
            if let Some(subscriber) = state.subscribers.get_mut(&self.id) {
                subscriber.last_active = now;
            }
            let results = batch
                .iter()
                .map(|(delivery, settlement)| {
                    self.settle_one(&mut state, delivery, settlement, now, &mut again)
                })
                .collect();
            let wake = !again.now.is_empty() || again.later;
            // Lowest offsets first, as they were handed out.
            state.put_first(again.now);
            (results, wake)
        };
        if wake {
            self.shared().changed.notify_waiters();
        }
        results
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
