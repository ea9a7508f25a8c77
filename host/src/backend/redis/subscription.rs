//! A Redis Streams subscription: one consumer of a group, reading every
//! stream it covers (its topics, the streams its patterns match, and the
//! group's retry stream) on a connection of its own, and settling what it
//! fetched.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use tokio::time::Instant;

use super::reader::Reader;
use super::streams::Shared;
use super::{scripts, settle, transient};
use crate::backend::{
    Delivery, SettleError, Settlement, StartFrom, SubscribeOptions, Subscription, closed_error,
    pattern,
};
use crate::message::Message;

/// The consumer that holds entries handed back on close until a live member
/// claims them.
pub const RETURNED: &str = "sluice-returned";

/// How idle a handed-back entry is made: far beyond any lease.
const HANDED_BACK_IDLE_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// Consumers that hold nothing and have been idle this long are removed
/// when a member joins.
const TIDY_IDLE_MS: u64 = 3600 * 1000;

/// A delivery's receipt: which entry of which stream, and its delivery
/// count in the group when this consumer got it (a reclaim since, here or
/// elsewhere, raises it).
pub struct EntryReceipt {
    pub stream: String,
    pub id: String,
    pub count: u64,
}

/// An entry this consumer holds and has not settled.
pub struct Held {
    /// The entry's delivery count in the group.
    pub count: u64,
    /// Returned by `fetch` (not just read ahead into the buffer).
    pub handed_out: bool,
}

pub struct StreamSubscription {
    pub shared: Arc<Shared>,
    /// The group's key, which is also its name in Redis.
    pub group: String,
    pub consumer: String,
    pub start: StartFrom,
    /// The subscribed topics that are patterns.
    pub patterns: Vec<String>,
    pub ephemeral: bool,
    /// A key's next message waits until its previous one is settled, in
    /// every member of the group (`scripts::TAKE_TURNS`).
    pub ordered: bool,
    /// How idle another consumer's entry must be before this one takes it.
    pub claim_idle: Duration,
    closed: AtomicBool,
    reader: tokio::sync::Mutex<Reader>,
    /// Unsettled entries, by (stream, id), handed back on close.
    pub held: std::sync::Mutex<HashMap<(String, String), Held>>,
    /// Single acks and nacks, sent together when they come at once.
    singles: settle::Singles,
}

impl StreamSubscription {
    /// Joins the group (creating it where needed) as a new consumer.
    pub async fn join(shared: Arc<Shared>, options: SubscribeOptions) -> Result<Self> {
        let group = options.group_key();
        let keys = &shared.keys;
        let mut streams: Vec<String> = options
            .topics
            .iter()
            .filter(|t| !pattern::is_pattern(t))
            .map(|t| keys.stream(t))
            .collect();
        let patterns: Vec<String> = options
            .topics
            .iter()
            .filter(|t| pattern::is_pattern(t))
            .cloned()
            .collect();
        // Topics this process publishes from now on are not missed by the
        // scan below: the reader looks at them first.
        let published_mark = shared.published_since(usize::MAX).1;
        for topic_pattern in &patterns {
            streams.extend(shared.scan(topic_pattern).await?);
        }
        streams.sort();
        streams.dedup();
        shared
            .ensure_groups(&group, options.start, &streams)
            .await?;
        let retry = keys.retry(&group);
        let mut tidy = scripts::TIDY.prepare_invoke();
        tidy.key(&retry);
        for stream in &streams {
            tidy.key(stream);
        }
        tidy.arg(&group).arg(TIDY_IDLE_MS);
        let tidy = &tidy;
        let removed: i64 = transient::retry(|| {
            let mut conn = shared.conn.clone();
            async move { tidy.invoke_async(&mut conn).await }
        })
        .await?;
        if removed > 0 {
            tracing::debug!(group, removed, "removed idle consumers that held nothing");
        }

        let id = Message::new("", "").id;
        let consumer = format!("sluice-{}-{}", std::process::id(), &id[id.len() - 12..]);
        let claim_idle = shared.config.claim_idle.unwrap_or(options.lease);
        let reader = Reader::new(&shared, retry, streams, published_mark)?;
        Ok(StreamSubscription {
            shared,
            group,
            consumer,
            start: options.start,
            patterns,
            ephemeral: options.ephemeral,
            ordered: options.ordered,
            claim_idle,
            closed: AtomicBool::new(false),
            reader: tokio::sync::Mutex::new(reader),
            held: std::sync::Mutex::new(HashMap::new()),
            singles: settle::Singles::default(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Up to `max` read-ahead deliveries, marked as handed out. Entries read
    /// ahead so long ago that their lease may be gone are left pending and
    /// forgotten (they come back by reclaim, here or elsewhere) rather than
    /// delivered late.
    fn take_buffered(
        &self,
        buffer: &mut VecDeque<(Delivery, Instant)>,
        max: usize,
    ) -> Vec<Delivery> {
        let stale = Instant::now().checked_sub(self.claim_idle / 2);
        let mut out = Vec::new();
        let mut held = self.held.lock().unwrap();
        while out.len() < max {
            let Some((delivery, read_at)) = buffer.pop_front() else {
                break;
            };
            let Ok(receipt) = delivery.receipt.get::<EntryReceipt>() else {
                continue;
            };
            let key = (receipt.stream.clone(), receipt.id.clone());
            if stale.is_some_and(|stale| read_at < stale) {
                held.remove(&key);
                continue;
            }
            if let Some(entry) = held.get_mut(&key) {
                entry.handed_out = true;
            }
            out.push(delivery);
        }
        out
    }

    /// Forgets an entry settled (or lost) so close does not hand it back.
    pub fn release(&self, stream: &str, id: &str) {
        self.held
            .lock()
            .unwrap()
            .remove(&(stream.to_string(), id.to_string()));
    }

    async fn settle_one(&self, delivery: &Delivery, settlement: Settlement) -> Result<()> {
        match self.singles.settle(self, delivery, settlement).await {
            Ok(()) => Ok(()),
            Err(SettleError::Unavailable(e)) => Err(e),
            Err(e) => Err(e.into()),
        }
    }

    /// Hands every unsettled entry back to the group.
    async fn hand_back(&self, reader: &Reader) -> Result<()> {
        let held: Vec<((String, String), Held)> = self.held.lock().unwrap().drain().collect();
        let streams = reader.all_streams();
        let mut invocation = scripts::HAND_BACK.prepare_invoke();
        for stream in &streams {
            invocation.key(stream);
        }
        invocation
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(RETURNED)
            .arg(HANDED_BACK_IDLE_MS);
        for ((stream, id), entry) in &held {
            let Some(index) = streams.iter().position(|s| s == stream) else {
                continue;
            };
            // Read ahead but never handed out: that delivery does not count
            // as an attempt.
            let count = if entry.handed_out {
                entry.count
            } else {
                entry.count.saturating_sub(1)
            };
            invocation.arg(index + 1).arg(id).arg(count);
        }
        let invocation = &invocation;
        let returned: i64 = transient::retry(|| {
            let mut conn = self.shared.conn.clone();
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
        .context("handing unsettled entries back to the group")?;
        if returned > 0 {
            self.shared.handbacks.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Chores, then one read of new entries unless the chores found some.
    async fn step(&self, reader: &mut Reader, max: usize, give_up: Instant) -> Result<()> {
        reader.maintain(self).await?;
        if !reader.buffer.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let until = give_up
            .min(reader.next_chore())
            .min(now + self.shared.config.block);
        reader
            .read_new(self, max, until.saturating_duration_since(now))
            .await
    }

    async fn destroy(&self, reader: &Reader) -> Result<()> {
        let keys = &self.shared.keys;
        let members = ::redis::cmd("SMEMBERS")
            .arg(keys.streams_of(&self.group))
            .clone();
        let members = &members;
        let mut streams: Vec<String> = transient::retry(|| {
            let mut conn = self.shared.conn.clone();
            async move { members.query_async(&mut conn).await }
        })
        .await?;
        streams.extend(reader.all_streams());
        streams.sort();
        streams.dedup();
        let mut invocation = scripts::DESTROY.prepare_invoke();
        invocation
            .key(keys.groups())
            .key(keys.streams_of(&self.group))
            .key(keys.retry(&self.group))
            .key(keys.delayed(&self.group))
            .key(keys.busy(&self.group))
            .key(keys.turned(&self.group));
        for stream in &streams {
            invocation.key(stream);
        }
        invocation
            .arg(&self.group)
            .arg(keys.waiting_prefix(&self.group));
        let invocation = &invocation;
        let _: i64 = transient::retry(|| {
            let mut conn = self.shared.conn.clone();
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
        .with_context(|| format!("removing ephemeral group `{}`", self.group))?;
        self.held.lock().unwrap().clear();
        Ok(())
    }
}

#[async_trait]
impl Subscription for StreamSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let give_up = Instant::now() + wait;
        let max = max.max(1);
        let mut reader = self.reader.lock().await;
        let mut read_once = false;
        loop {
            if self.is_closed() {
                return Err(closed_error(&self.group));
            }
            let out = self.take_buffered(&mut reader.buffer, max);
            if !out.is_empty() {
                return Ok(out);
            }
            if read_once && Instant::now() >= give_up {
                return Ok(Vec::new());
            }
            match self.step(&mut reader, max, give_up).await {
                Ok(()) => reader.outage = None,
                Err(e) if transient::is_transient_any(&e) => {
                    // A blip (a restart, a failover) looks like a quiet
                    // moment; a longer outage is the caller's to see.
                    let since = *reader.outage.get_or_insert_with(Instant::now);
                    if since.elapsed() >= transient::RIDE_OVER {
                        return Err(e.context("Redis has been unreachable for a while"));
                    }
                    tracing::debug!(group = %self.group, "fetch waits for Redis: {e:#}");
                    let pause = give_up.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(Duration::from_millis(100))).await;
                }
                Err(e) => return Err(e),
            }
            read_once = true;
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.settle_one(delivery, Settlement::Ack).await
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
        settle::settle(self, batch).await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Waits for a fetch in progress, so nothing it reads is missed.
        let mut reader = self.reader.lock().await;
        reader.buffer.clear();
        if self.ephemeral {
            self.destroy(&reader).await
        } else {
            self.hand_back(&reader).await
        }
    }
}
