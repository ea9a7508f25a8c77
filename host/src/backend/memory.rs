//! The in-memory backend: consumer groups, redelivery and delays inside one
//! process, bounded so a fast publisher waits for slow consumers. Nothing
//! survives a restart; use it for tests, benchmarks and pipelines that can
//! lose messages on a crash.
//!
//! URL: `memory://` or `memory://?capacity=N` (messages per group that may be
//! waiting or in flight before `publish` waits; default 10000).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::url::BackendUrl;
use super::{
    Backend, Capabilities, Delivery, Receipt, SettleError, Settlement, SubscribeOptions,
    Subscription, pattern,
};
use crate::message::Message;

const DEFAULT_CAPACITY: usize = 10_000;

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: false,
    history: false,
    consumer_groups: true,
    ordered_per_key: true,
    native_delay: true,
    lease: false,
    wildcards: true,
    at_least_once: true,
    lease_checked: false,
    backlog: true,
    key_affinity: false,
};

pub struct MemoryBackend {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    /// Woken whenever a group frees room, so blocked publishers retry.
    room: Notify,
}

#[derive(Default)]
struct State {
    groups: HashMap<String, Group>,
    next_delivery: u64,
}

struct Group {
    patterns: Vec<String>,
    ready: VecDeque<Entry>,
    /// Nacked entries by the time they become ready again.
    delayed: BTreeMap<(Instant, u64), Entry>,
    in_flight: HashMap<u64, Entry>,
    /// Woken when `ready` gains an entry.
    arrived: Arc<Notify>,
    members: usize,
}

#[derive(Clone)]
struct Entry {
    message: Arc<Message>,
    attempts: u32,
}

impl Group {
    fn held(&self) -> usize {
        self.ready.len() + self.delayed.len() + self.in_flight.len()
    }

    /// Entries never delivered; every other entry the group holds was
    /// delivered at least once (in flight, delayed, or handed back).
    fn undelivered(&self) -> usize {
        self.ready.iter().filter(|e| e.attempts == 0).count()
    }

    fn wants(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| pattern::matches(p, topic))
    }

    /// Moves delayed entries whose time has come to the back of `ready`.
    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_back(entry.remove());
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed.keys().next().map(|(at, _)| *at)
    }
}

impl MemoryBackend {
    pub fn new(capacity: usize) -> Self {
        MemoryBackend {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                capacity: capacity.max(1),
                room: Notify::new(),
            }),
        }
    }

    pub fn from_url(url: &str) -> Result<Self> {
        let mut url = BackendUrl::split(url, "memory")?;
        if !url.address.trim_start_matches('/').is_empty() {
            return Err(url.error("takes no address (expected memory:// or memory://?capacity=N)"));
        }
        let capacity = url
            .take("capacity", "a number")?
            .unwrap_or(DEFAULT_CAPACITY);
        url.finish(&["capacity"])?;
        Ok(Self::new(capacity))
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn pending(&self, group_key: &str) -> Result<Option<u64>> {
        let state = self.shared.state.lock().unwrap();
        Ok(state
            .groups
            .get(group_key)
            .map(|g| (g.held() - g.undelivered()) as u64))
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        let state = self.shared.state.lock().unwrap();
        Ok(state.groups.get(group_key).map(|g| g.undelivered() as u64))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        let mut messages = messages.into_iter().map(Arc::new).peekable();
        while messages.peek().is_some() {
            // Register for wake-ups before checking, so a release between
            // the check and the wait is not missed.
            let room = self.shared.room.notified();
            {
                let mut state = self.shared.state.lock().unwrap();
                // Which groups want a topic, worked out once per run of
                // messages with the same topic.
                let mut wanting: Vec<String> = Vec::new();
                let mut topic: Option<String> = None;
                while let Some(message) = messages.peek() {
                    if topic.as_deref() != Some(message.topic.as_str()) {
                        wanting = state
                            .groups
                            .iter()
                            .filter(|(_, g)| g.wants(&message.topic))
                            .map(|(key, _)| key.clone())
                            .collect();
                        topic = Some(message.topic.clone());
                    }
                    let full = wanting
                        .iter()
                        .any(|key| state.groups[key].held() >= self.shared.capacity);
                    if full {
                        break;
                    }
                    let message = messages.next().expect("peeked");
                    for key in &wanting {
                        let group = state.groups.get_mut(key).expect("listed");
                        group.ready.push_back(Entry {
                            message: message.clone(),
                            attempts: 0,
                        });
                    }
                }
                for key in &wanting {
                    state.groups[key].arrived.notify_waiters();
                }
                if messages.peek().is_none() {
                    break;
                }
            }
            room.await;
        }
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        // History is not kept, so every start position means "from now on".
        let arrived = {
            let mut state = self.shared.state.lock().unwrap();
            let group = state
                .groups
                .entry(options.group_key())
                .or_insert_with(|| Group {
                    patterns: Vec::new(),
                    ready: VecDeque::new(),
                    delayed: BTreeMap::new(),
                    in_flight: HashMap::new(),
                    arrived: Arc::new(Notify::new()),
                    members: 0,
                });
            for topic in &options.topics {
                if !group.patterns.contains(topic) {
                    group.patterns.push(topic.clone());
                }
            }
            group.members += 1;
            group.arrived.clone()
        };
        Ok(Box::new(MemorySubscription {
            shared: self.shared.clone(),
            group: options.group_key(),
            closed: AtomicBool::new(false),
            ephemeral: options.ephemeral,
            arrived,
            mine: Mutex::new(BTreeSet::new()),
        }))
    }
}

struct MemorySubscription {
    shared: Arc<Shared>,
    /// The group's key (name and topics).
    group: String,
    closed: AtomicBool,
    ephemeral: bool,
    arrived: Arc<Notify>,
    /// Deliveries handed to this member and not yet settled, returned to the
    /// group on close, oldest first.
    mine: Mutex<BTreeSet<u64>>,
}

impl MemorySubscription {
    /// Takes up to `max` ready entries; also reports when the next delayed
    /// entry becomes due.
    fn take(&self, max: usize) -> Result<(Vec<Delivery>, Option<Instant>)> {
        let mut state = self.shared.state.lock().unwrap();
        let State {
            groups,
            next_delivery,
        } = &mut *state;
        let Some(group) = groups.get_mut(&self.group) else {
            bail!("subscription to group `{}` is closed", self.group);
        };
        group.promote_due(Instant::now());
        let mut deliveries = Vec::new();
        let mut mine = self.mine.lock().unwrap();
        while deliveries.len() < max {
            let Some(mut entry) = group.ready.pop_front() else {
                break;
            };
            entry.attempts += 1;
            *next_delivery += 1;
            let id = *next_delivery;
            deliveries.push(Delivery {
                message: (*entry.message).clone(),
                attempt: entry.attempts,
                receipt: Receipt::new(id),
            });
            group.in_flight.insert(id, entry);
            mine.insert(id);
        }
        Ok((deliveries, group.next_due()))
    }

    /// Settles deliveries under one lock.
    fn settle_all<'a>(
        &self,
        batch: impl Iterator<Item = (&'a Delivery, &'a Settlement)>,
    ) -> Vec<Result<(), SettleError>> {
        let mut state = self.shared.state.lock().unwrap();
        let Some(group) = state.groups.get_mut(&self.group) else {
            return batch.map(|_| Err(SettleError::Closed)).collect();
        };
        let mut mine = self.mine.lock().unwrap();
        let (mut freed, mut arrived) = (false, false);
        let now = Instant::now();
        let results = batch
            .map(|(delivery, settlement)| {
                let delay = match settlement {
                    Settlement::Ack => None,
                    Settlement::Nack(delay) => Some(*delay),
                    // Not transactional: the router never asks for this.
                    Settlement::PublishAndAck(_) => {
                        return Err(SettleError::Fatal(anyhow!(
                            "the memory backend cannot publish and acknowledge in one transaction"
                        )));
                    }
                };
                let id = *delivery.receipt.get::<u64>().map_err(SettleError::Fatal)?;
                let Some(entry) = group.in_flight.remove(&id) else {
                    return Err(SettleError::Fatal(anyhow!(
                        "delivery {id} was already settled"
                    )));
                };
                mine.remove(&id);
                match delay {
                    None => freed = true,
                    Some(delay) if delay.is_zero() => {
                        // First again, so a retried message keeps its place.
                        group.ready.push_front(entry);
                        arrived = true;
                    }
                    Some(delay) => {
                        group.delayed.insert((now + delay, id), entry);
                        // A fetcher may be sleeping until a later due time.
                        arrived = true;
                    }
                }
                Ok(())
            })
            .collect();
        if arrived {
            group.arrived.notify_waiters();
        }
        if freed {
            self.shared.room.notify_waiters();
        }
        results
    }

    fn settle_one(&self, delivery: &Delivery, settlement: Settlement) -> Result<()> {
        let result = self
            .settle_all(std::iter::once((delivery, &settlement)))
            .pop();
        result.expect("one answer").map_err(anyhow::Error::from)
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(super::closed_error(&self.group));
            }
            let arrived = self.arrived.notified();
            let (deliveries, next_due) = self.take(max.max(1))?;
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= give_up {
                return Ok(Vec::new());
            }
            let until = next_due.map_or(give_up, |due| due.min(give_up));
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.settle_one(delivery, Settlement::Ack)
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        self.settle_one(delivery, Settlement::Nack(delay))
    }

    async fn settle(&self, batch: Vec<(&Delivery, Settlement)>) -> Vec<Result<(), SettleError>> {
        self.settle_all(
            batch
                .iter()
                .map(|(delivery, settlement)| (*delivery, settlement)),
        )
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut state = self.shared.state.lock().unwrap();
        let Some(group) = state.groups.get_mut(&self.group) else {
            return Ok(());
        };
        let mine = std::mem::take(&mut *self.mine.lock().unwrap());
        // Returned in reverse so the oldest ends up first again.
        for id in mine.into_iter().rev() {
            if let Some(entry) = group.in_flight.remove(&id) {
                group.ready.push_front(entry);
            }
        }
        group.members = group.members.saturating_sub(1);
        group.arrived.notify_waiters();
        if self.ephemeral && group.members == 0 {
            state.groups.remove(&self.group);
            self.shared.room.notify_waiters();
        }
        Ok(())
    }
}

/// Nothing to reach: the backend lives in the process that opens it.
pub async fn probe(url: &str) -> Result<String> {
    MemoryBackend::from_url(url)?;
    Ok("in the process itself (messages are lost when it exits)".into())
}
