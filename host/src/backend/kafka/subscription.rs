//! A subscription's async side: fetch hands out what the consumer thread
//! filed, ack and nack update the ledgers (the thread commits), close
//! makes the member leave its group.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use tokio::time::Instant;

use super::admin::Admin;
use super::consumer::Command;
use super::state::{KafkaReceipt, Shared};
use super::{membership, notes};
use crate::backend::{Delivery, Subscription, closed_error};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Longest a closing member waits for the rest of its group here to be
/// assigned again: a heartbeat to notice, a join and a sync on loopback.
pub const SETTLE_WAIT: Duration = Duration::from_secs(5);

pub struct KafkaSubscription {
    id: u64,
    /// The Sluice group, for messages.
    group: String,
    /// The Kafka group id.
    group_id: String,
    /// The group among this process's members (see [`membership`]).
    member_key: String,
    ephemeral: bool,
    shared: Arc<Shared>,
    commands: Mutex<Option<Sender<Command>>>,
    admin: Arc<Admin>,
    /// How long `close` waits for the member to leave its group.
    close_wait: Duration,
}

/// What a subscription's group is called: by the application, by Kafka,
/// and among this process's members (see [`membership`]).
pub struct GroupNames {
    pub group: String,
    pub group_id: String,
    pub member_key: String,
}

impl KafkaSubscription {
    pub fn new(
        names: GroupNames,
        ephemeral: bool,
        shared: Arc<Shared>,
        commands: Sender<Command>,
        admin: Arc<Admin>,
        close_wait: Duration,
    ) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        membership::enter(&names.member_key, id, &shared);
        KafkaSubscription {
            id,
            member_key: names.member_key,
            group: names.group,
            group_id: names.group_id,
            ephemeral,
            shared,
            commands: Mutex::new(Some(commands)),
            admin,
            close_wait,
        }
    }

    /// Waits until the group has handed this member its partitions (maybe
    /// none) and each knows where it starts, at most `limit`; false if not
    /// by then.
    pub async fn joined(&self, limit: Duration) -> bool {
        let give_up = Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.shared.lock();
                if state.assignments > 0 && state.resolving.is_empty() {
                    return true;
                }
            }
            if tokio::time::timeout_at(give_up, notified).await.is_err() {
                return false;
            }
        }
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

    fn stop_thread(&self, done: Option<tokio::sync::oneshot::Sender<()>>) {
        let commands = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(commands) = commands {
            let _ = commands.send(Command::Close(done));
        }
    }
}

/// Counts a fetch as in progress until it returns or is dropped.
struct Fetching<'a>(&'a Shared);

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.fetching -= 1;
        state.last_fetch = Some(std::time::Instant::now());
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(closed_error(&self.group));
            }
            state.fetching += 1;
            state.last_fetch = Some(std::time::Instant::now());
        }
        let _fetching = Fetching(&self.shared);
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next_due = {
                let mut state = self.shared.lock();
                if state.closed {
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
        if let Some(ledger) = self.shared.lock().ledger(ticket) {
            ledger.ack(ticket.offset);
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let receipt = self.receipt(delivery)?;
        let ticket = receipt.ticket.clone();
        let mut state = self.shared.lock();
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
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        {
            let mut state = self.shared.lock();
            if state.closed {
                return Ok(());
            }
            state.closed = true;
        }
        self.shared.changed.notify_waiters();
        // One at a time, on a settled group: see `membership`.
        let turn = membership::turn(&self.member_key).await;
        let others = membership::others(&self.member_key, self.id);
        let (done, left) = tokio::sync::oneshot::channel();
        self.stop_thread(Some(done));
        let left = tokio::time::timeout(self.close_wait, left).await.is_ok();
        membership::depart(&self.member_key, self.id);
        if left {
            membership::settled(others, SETTLE_WAIT.min(self.close_wait)).await;
        } else {
            tracing::warn!(
                group = %self.group_id,
                "Kafka: the member did not leave its group within {:?}; its partitions move after the session timeout",
                self.close_wait
            );
        }
        drop(turn);
        if self.ephemeral {
            notes::forget(&self.group_id);
            self.admin.delete_group(&self.group_id).await;
        }
        Ok(())
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        membership::depart(&self.member_key, self.id);
        self.stop_thread(None);
    }
}
