//! A subscription of one consumer group: it receives from the group's
//! queue of each topic, and settles with deletes and visibility changes.
//!
//! Receives run as tasks of their own (see [`super::receive`]), at most one
//! per queue (a few when the queue is busy and the fetch wants more than
//! ten). A fetch starts them, waits for what they bring until its wait is
//! over, and returns; a receive still under way then delivers into the
//! subscription for the next fetch. So a fetch honours its wait to the
//! millisecond although SQS long polls in whole seconds, one topic's empty
//! queue never holds up another's messages, and a dropped fetch loses
//! nothing. What a receive brings is held (its visibility kept up by the
//! heartbeat while the consumer is alive) until a fetch hands it out; one
//! whose lease ran out meanwhile is dropped, as SQS has made it visible
//! again.
//!
//! A queue deleted under the subscription (by an operator, or with an
//! emulator that restarted empty) fails its receives as missing; the next
//! fetch makes it again with the backend's [`Restore`] (same name, so the
//! same URL), warns once and counts it (see
//! [`crate::backend::record_restored`]). Messages it held are gone with it.
//!
//! An ordered group reads a FIFO queue, where SQS keeps a key (its message
//! group) from every other member while one of its messages is in flight
//! here. A receive may still bring several messages of one key; the
//! subscription hands out only the oldest and holds the rest (kept alive
//! as any received message) until that one is settled. A nack makes the
//! held ones visible again with it, since SQS would not hand the nacked
//! message to anyone while later ones of its key are in flight; each of
//! them then counts one receive more.
//!
//! Close waits for the receives under way (each ends within its long poll,
//! at most 20 s), sends the queued deletes, hands every delivery not
//! settled back with visibility 0, and for an ephemeral group removes its
//! queues.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::codec::Received;
use super::lease::{self, LeaseSeconds};
use super::names::queue_name_of;
use super::settle::{AckBatcher, change_visibility};
use crate::backend::{Delivery, Receipt, Subscription, closed_error};

/// The least a fetch waits, so even one that may not wait asks SQS once.
const MIN_WAIT: Duration = Duration::from_millis(20);
/// A received delivery this close to the end of its lease is not handed
/// out any more.
const STALE_MARGIN: Duration = Duration::from_millis(200);
/// The longest close waits for receives under way.
const CLOSE_WAIT: Duration = Duration::from_secs(25);

/// A queue the subscription reads, and the topic its messages belong to.
#[derive(Debug, Clone)]
pub struct QueueSource {
    pub url: String,
    pub topic: String,
}

/// Removes an ephemeral group's queues (and subscriptions) on close.
pub type Teardown = Box<dyn FnOnce() -> BoxFuture<'static, Result<()>> + Send>;

/// Makes the queue of one of the subscription's sources again (by its
/// index), as subscribing made it; answers its URL.
pub type Restore = Box<dyn Fn(usize) -> BoxFuture<'static, Result<String>> + Send + Sync>;

/// What a subscription is made of.
pub struct SubscriptionSpec {
    pub group: String,
    pub queues: Vec<QueueSource>,
    pub lease: Duration,
    pub ack_batch: Duration,
    pub heartbeat: bool,
    /// The longest a receive long-polls, in seconds.
    pub wait_s: u8,
    /// Hands out one message of a key at a time (on a FIFO queue).
    pub ordered: bool,
    pub teardown: Option<Teardown>,
    pub restore: Restore,
}

/// The receipt of an SQS delivery: a token for the subscription's held map.
struct SqsReceipt(u64);

pub struct SqsSubscription {
    inner: Arc<Inner>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

pub(super) struct Inner {
    pub sqs: Client,
    pub group: String,
    pub queues: Vec<QueueSource>,
    pub lease: LeaseSeconds,
    pub state: Mutex<State>,
    /// Woken when a receive ends, and on close.
    pub arrived: Notify,
    pub closed: AtomicBool,
    pub ordered: bool,
    /// The longest a receive long-polls, in seconds.
    pub wait_s: u8,
    pub last_call: Mutex<Instant>,
    acks: Arc<AckBatcher>,
    teardown: Mutex<Option<Teardown>>,
    restore: Restore,
}

pub(super) struct State {
    /// Received, not yet handed out by a fetch.
    pub ready: VecDeque<(u64, Received)>,
    /// Every received delivery not settled yet (handed out or ready).
    pub held: HashMap<u64, Held>,
    /// Receives under way, per queue.
    pub receiving: Vec<usize>,
    /// Whether the queue's last receive came back full.
    pub busy: Vec<bool>,
    /// After a failed receive, the queue rests until then.
    pub rest_until: Vec<Option<Instant>>,
    /// Per queue: why its last receive failed, until one succeeds. Every
    /// fetch that finds nothing ready reports it, so a route sees its
    /// backend down rather than fetches that merely time out.
    pub errors: Vec<Option<String>>,
    /// Per queue: its receive found it missing.
    pub missing: Vec<bool>,
    pub next_token: u64,
    /// On an ordered subscription: the keys with a delivery handed out and
    /// not settled.
    pub keys_out: HashSet<String>,
}

pub(super) struct Held {
    pub queue: usize,
    pub receipt: String,
    pub received: Instant,
    /// Received or last kept alive.
    pub extended: Instant,
    /// On an ordered subscription, the message's key.
    pub key: Option<String>,
}

impl SqsSubscription {
    pub fn start(sqs: Client, spec: SubscriptionSpec) -> Self {
        let count = spec.queues.len();
        let acks = AckBatcher::new(
            sqs.clone(),
            spec.queues.iter().map(|q| q.url.clone()).collect(),
            spec.ack_batch,
        );
        let inner = Arc::new(Inner {
            sqs,
            group: spec.group,
            queues: spec.queues,
            lease: LeaseSeconds::of(spec.lease),
            state: Mutex::new(State {
                ready: VecDeque::new(),
                held: HashMap::new(),
                receiving: vec![0; count],
                busy: vec![false; count],
                rest_until: vec![None; count],
                errors: vec![None; count],
                missing: vec![false; count],
                next_token: 0,
                keys_out: HashSet::new(),
            }),
            arrived: Notify::new(),
            closed: AtomicBool::new(false),
            ordered: spec.ordered,
            wait_s: spec.wait_s,
            last_call: Mutex::new(Instant::now()),
            acks,
            teardown: Mutex::new(spec.teardown),
            restore: spec.restore,
        });
        let heartbeat = spec
            .heartbeat
            .then(|| tokio::spawn(lease::keep_alive(Arc::downgrade(&inner))));
        SqsSubscription { inner, heartbeat }
    }
}

impl Drop for SqsSubscription {
    fn drop(&mut self) {
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.abort();
        }
    }
}

impl Inner {
    fn touch(&self) {
        *self.last_call.lock().unwrap() = Instant::now();
    }

    /// Takes a delivery being settled out of the held map, and frees its
    /// key for the next message of it.
    fn take_held(&self, delivery: &Delivery) -> Result<Held> {
        let SqsReceipt(token) = delivery.receipt.get::<SqsReceipt>()?;
        let mut state = self.state.lock().unwrap();
        match state.held.remove(token) {
            Some(held) => {
                if let Some(key) = &held.key {
                    state.keys_out.remove(key);
                }
                Ok(held)
            }
            None => bail!(
                "delivery of message {} was already settled (or its subscription closed)",
                delivery.message.id
            ),
        }
    }

    /// Up to `max` received deliveries, leaving out any whose lease ran out
    /// while it waited (it is visible again, maybe already delivered to
    /// another member: handing it out would only make a duplicate), and
    /// holding back, in order, any whose key has a delivery out. A key
    /// whose oldest waiting message is left out loses its later ones here
    /// too: SQS hands that message out again only once they are no longer
    /// in flight, and handing them out first would reorder the key.
    fn take_ready(&self, state: &mut State, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut held_back = Vec::new();
        let mut left_out: HashSet<String> = HashSet::new();
        while out.len() < max {
            let Some((token, received)) = state.ready.pop_front() else {
                break;
            };
            let fresh = state.held.get(&token).filter(|held| {
                now + STALE_MARGIN < held.extended + self.lease.duration
                    && !held.key.as_ref().is_some_and(|key| left_out.contains(key))
            });
            let Some(held) = fresh else {
                if let Some(key) = state.held.remove(&token).and_then(|held| held.key) {
                    left_out.insert(key);
                }
                continue;
            };
            if let Some(key) = &held.key
                && !state.keys_out.insert(key.clone())
            {
                held_back.push((token, received));
                continue;
            }
            out.push(Delivery {
                message: received.message,
                attempt: received.attempt,
                receipt: Receipt::new(SqsReceipt(token)),
            });
        }
        for waiting in held_back.into_iter().rev() {
            state.ready.push_front(waiting);
        }
        out
    }

    /// Takes the received messages of `key` not handed out yet, to make
    /// them visible again with a nacked one of their key.
    fn take_held_back(&self, key: &str) -> Vec<Held> {
        let mut state = self.state.lock().unwrap();
        let State { ready, held, .. } = &mut *state;
        let mut taken = Vec::new();
        ready.retain(|(token, _)| {
            if held.get(token).and_then(|h| h.key.as_deref()) != Some(key) {
                return true;
            }
            taken.extend(held.remove(token));
            false
        });
        taken
    }

    /// Makes the queues found missing again.
    async fn restore_missing(&self) -> Result<()> {
        let missing: Vec<usize> = {
            let state = self.state.lock().unwrap();
            (0..self.queues.len())
                .filter(|q| state.missing[*q])
                .collect()
        };
        for queue in missing {
            let source = &self.queues[queue];
            let url = (self.restore)(queue).await.with_context(|| {
                format!(
                    "queue `{}` of group `{}` is gone and cannot be made again",
                    queue_name_of(&source.url),
                    self.group
                )
            })?;
            if url != source.url {
                bail!(
                    "queue `{}` of group `{}` was made again at another URL ({url}); restart the route",
                    queue_name_of(&source.url),
                    self.group
                );
            }
            self.state.lock().unwrap().missing[queue] = false;
            crate::backend::record_restored("sqs");
            tracing::warn!(
                group = %self.group,
                queue = queue_name_of(&source.url),
                "the group's SQS queue was gone (deleted, or lost with the server) and was made again; the messages it held are lost with it"
            );
        }
        Ok(())
    }

    /// Makes `deliveries` visible again at once, queue by queue; what fails
    /// comes back after its lease.
    async fn hand_back(&self, deliveries: Vec<Held>) -> Result<()> {
        let mut first_error = None;
        for (index, queue) in self.queues.iter().enumerate() {
            let entries: Vec<(String, i32)> = deliveries
                .iter()
                .filter(|h| h.queue == index)
                .map(|h| (h.receipt.clone(), 0))
                .collect();
            if entries.is_empty() {
                continue;
            }
            if let Err(e) = change_visibility(&self.sqs, &queue.url, &entries).await {
                tracing::warn!(group = %self.group, "deliveries not handed back return after their lease: {e:#}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Waits (at most [`CLOSE_WAIT`]) until no receive is under way.
    async fn receives_ended(&self) {
        let give_up = Instant::now() + CLOSE_WAIT;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.state.lock().unwrap().receiving.iter().all(|n| *n == 0) {
                return;
            }
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep_until(give_up) => {
                    tracing::warn!(group = %self.group, "receives still under way at close; what they bring returns after its lease");
                    return;
                }
            }
        }
    }
}

#[async_trait]
impl Subscription for SqsSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let inner = &self.inner;
        inner.touch();
        let max = max.max(1);
        let deadline = Instant::now() + wait.max(MIN_WAIT);
        loop {
            if inner.closed.load(Ordering::SeqCst) {
                return Err(closed_error(&inner.group));
            }
            let arrived = inner.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut state = inner.state.lock().unwrap();
                let out = inner.take_ready(&mut state, max);
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            inner.restore_missing().await?;
            {
                let mut state = inner.state.lock().unwrap();
                let now = Instant::now();
                // Receives start (again, once a failed queue has rested)
                // before a failure is reported, so the next one can clear it.
                super::receive::start(
                    inner,
                    &mut state,
                    max,
                    deadline.saturating_duration_since(now),
                );
                if let Some(error) = state.errors.iter().flatten().next() {
                    return Err(anyhow::anyhow!("{error}"));
                }
                if now >= deadline {
                    return Ok(Vec::new());
                }
            }
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.inner.touch();
        let held = self.inner.take_held(delivery)?;
        self.inner.acks.delete(held.queue, held.receipt);
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        let inner = &self.inner;
        inner.touch();
        let held = inner.take_held(delivery)?;
        if let Some(key) = &held.key {
            inner.hand_back(inner.take_held_back(key)).await?;
        }
        let url = &inner.queues[held.queue].url;
        inner
            .sqs
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(held.receipt)
            .visibility_timeout(lease::delay_seconds(delay, held.received))
            .send()
            .await
            .with_context(|| {
                format!(
                    "SQS ChangeMessageVisibility (nack of message {}) on `{}`",
                    delivery.message.id,
                    queue_name_of(url)
                )
            })?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.abort();
        }
        inner.arrived.notify_waiters();
        inner.receives_ended().await;
        inner.acks.drain().await;
        let unsettled: Vec<Held> = {
            let mut state = inner.state.lock().unwrap();
            state.ready.clear();
            state.held.drain().map(|(_, held)| held).collect()
        };
        let handed_back = inner.hand_back(unsettled).await;
        let teardown = inner.teardown.lock().unwrap().take();
        if let Some(teardown) = teardown {
            teardown().await?;
        }
        handed_back.with_context(|| format!("closing the subscription of group `{}`", inner.group))
    }
}
