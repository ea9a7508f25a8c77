//! A JetStream subscription: pulls from the group's consumers, settles with
//! ack subjects, keeps held deliveries alive, and hands them back on close.
//!
//! Each consumer has at most one pull request pending at a time, whose
//! answers arrive on an inbox private to the subscription (one subject per
//! consumer, so a request's end is told apart). A request asks for as many
//! messages as the fetch wants and lasts at most [`MAX_PULL`]; what it
//! delivers after a fetch returned waits in the inbox for the next fetch.
//!
//! Settling publishes to the message's ack subject without waiting for the
//! server (`+ACK`, `-NAK` with the delay); a lost ack only means a
//! redelivery, which at-least-once allows. A batch is settled with one
//! look-up of what the subscription holds and its acks sent back to back,
//! so they travel together on the connection. Rejects are dead-lettered by
//! the host (publish, then ack), so `+TERM` is never sent.
//!
//! A stale ack cannot be told apart: the server matches an ack to the
//! message by its stream sequence alone (the delivery count in the ack
//! subject is not compared), and answers nothing to a plain ack. So an ack
//! sent after AckWait passed and the message went to another member settles
//! that member's copy too (the message was handled, so nothing is lost).
//!
//! In-progress acks (`progress=true`, the default): a background task sends
//! `+WPI` for every delivery held longer than half the lease, so a slow
//! handler, a backoff in an ordered lane or a full worker queue does not
//! let the lease run out under a live consumer. A consumer that made no
//! call (fetch, ack, nack) for a whole lease is taken for stalled and gets
//! no more progress acks, so its deliveries return to the group.
//!
//! Lost consumers: a consumer deleted under a running subscription (by an
//! operator, or with a server that came back with an empty store) answers
//! a pull request with "consumer deleted" once, and later requests get no
//! responder or no answer at all (a live consumer always ends a request, at
//! its expiry at the latest). Any of these makes the next fetch ask the
//! server whether the consumer exists; if it does not, the subscription makes the stream and
//! the consumer again (from the group's start position, so what the stream
//! still keeps is delivered again: duplicates, never a loss), warns once
//! and counts it (see [`crate::backend::record_restored`]). If the server
//! cannot say, the fetch fails, so the route shows its backend as down.
//!
//! A fetch while the client is disconnected fails (the client reconnects by
//! itself), so the route reports its backend down rather than idle.
//!
//! Close: a pending pull request may still deliver, so close waits for it
//! to end (at most [`MAX_PULL`] and a little), `-NAK`s what it brought and
//! every delivery still held, and for an ephemeral group deletes the
//! consumers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, StatusCode, Subject, Subscriber};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::core::flush;
use super::leases::ShardLeases;
use super::provision::Provision;
use super::turns::KeyTurns;
use super::{ServerUrl, headers, shards};
use crate::backend::{
    Delivery, Receipt, SettleError, Settlement, SubscribeOptions, Subscription, closed_error,
    record_restored,
};
use crate::message::Message;

/// The longest a pull request waits on the server.
pub const MAX_PULL: Duration = Duration::from_secs(1);
/// How long past its expiry a request's end may arrive.
const GRACE: Duration = Duration::from_millis(200);
/// The shortest pull request (shorter ones could end before they arrive).
const MIN_PULL: Duration = Duration::from_millis(20);
/// A pause before pulling again after the server had no responder.
const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(250);
/// An ordered group pulls no more while this many messages of its leased
/// shards wait behind their keys' previous ones.
const MAX_WAITING: usize = 1024;

/// A consumer this subscription pulls from.
pub(crate) struct PullTarget {
    pub stream: String,
    pub consumer: String,
    /// The topic (or pattern) it reads.
    pub topic: String,
    /// The subject it filters on: the topic, or with shards its shard.
    pub filter: String,
    /// Read only by the member that leases it (a key shard of an ordered
    /// group, see `leases.rs`).
    pub leased: bool,
}

pub(crate) struct JsSubscription {
    inner: Arc<Inner>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    leaser: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    client: Client,
    js: jetstream::Context,
    provision: Arc<Provision>,
    server: ServerUrl,
    group: String,
    options: SubscribeOptions,
    targets: Vec<PullTarget>,
    /// Consumer name → its index in `targets`.
    by_name: HashMap<String, usize>,
    inbox_prefix: String,
    lease: Duration,
    ephemeral: bool,
    pulls: tokio::sync::Mutex<Pulls>,
    /// Per target: until when its pending pull request may still deliver.
    open: Vec<Mutex<Option<Instant>>>,
    /// Which member reads which key shard, for an ordered group.
    leases: Option<ShardLeases>,
    /// Which message of each key of the leased shards is out.
    turns: Mutex<KeyTurns>,
    held: Mutex<HashMap<u64, Held>>,
    next_token: AtomicU64,
    closed: AtomicBool,
    /// Woken by close, so a waiting fetch lets go of the inbox.
    woken: Notify,
    last_call: Mutex<Instant>,
}

struct Pulls {
    /// `None` once closed.
    inbox: Option<Subscriber>,
    /// Per target: when its pending request ends, and what it still owes.
    pending: Vec<Option<(Instant, usize)>>,
    /// Per target: the server answered as if its consumer were gone.
    suspect: Vec<bool>,
    /// Per target: the stream that keeps its topic (it changes only if the
    /// stream is made again elsewhere).
    streams: Vec<String>,
}

struct Held {
    ack_subject: Subject,
    /// Its target's index.
    target: usize,
    stream_sequence: u64,
    /// Keyed, from a leased shard: it takes turns with its key's other
    /// messages (the key is the delivery's own).
    takes_turns: bool,
    /// Fetched or last kept alive.
    since: Instant,
}

impl JsSubscription {
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start(
        client: Client,
        provision: Arc<Provision>,
        server: ServerUrl,
        targets: Vec<PullTarget>,
        options: SubscribeOptions,
        leases: Option<ShardLeases>,
    ) -> Result<Self> {
        let inbox_prefix = client.new_inbox();
        let inbox = client
            .subscribe(format!("{inbox_prefix}.*"))
            .await
            .context("NATS subscribe to the pull inbox")?;
        let by_name = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.consumer.clone(), i))
            .collect();
        let count = targets.len();
        let progress = provision.settings.progress;
        let inner = Arc::new(Inner {
            client,
            js: provision.js.clone(),
            provision,
            server,
            group: options.group_key(),
            lease: options.lease,
            ephemeral: options.ephemeral,
            options,
            pulls: tokio::sync::Mutex::new(Pulls {
                inbox: Some(inbox),
                pending: vec![None; count],
                suspect: vec![false; count],
                streams: targets.iter().map(|t| t.stream.clone()).collect(),
            }),
            open: targets.iter().map(|_| Mutex::new(None)).collect(),
            leases,
            turns: Mutex::new(KeyTurns::default()),
            targets,
            by_name,
            inbox_prefix,
            held: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            woken: Notify::new(),
            last_call: Mutex::new(Instant::now()),
        });
        let ticker = progress.then(|| tokio::spawn(keep_alive(Arc::downgrade(&inner))));
        let leaser = inner.leases.is_some().then(|| {
            let inner = Arc::downgrade(&inner);
            tokio::spawn(keep_leases(inner))
        });
        Ok(JsSubscription {
            inner,
            ticker,
            leaser,
        })
    }
}

impl Drop for JsSubscription {
    fn drop(&mut self) {
        for task in self.ticker.iter().chain(&self.leaser) {
            task.abort();
        }
    }
}

/// Sends in-progress acks for deliveries held longer than half the lease,
/// while the subscription shows signs of life.
async fn keep_alive(inner: Weak<Inner>) {
    let lease = match inner.upgrade() {
        Some(inner) => inner.lease,
        None => return,
    };
    let tick = (lease / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if inner.last_call.lock().unwrap().elapsed() >= lease {
            continue;
        }
        let now = Instant::now();
        let due: Vec<Subject> = {
            let mut held = inner.held.lock().unwrap();
            held.values_mut()
                .filter(|h| now.duration_since(h.since) >= lease / 2 && inner.holds(h.target))
                .map(|h| {
                    h.since = now;
                    h.ack_subject.clone()
                })
                .collect()
        };
        for subject in due {
            if let Err(e) = inner.send_ack(subject, AckKind::Progress).await {
                tracing::debug!(group = %inner.group, "in-progress ack: {e:#}");
            }
        }
    }
}

/// Takes, keeps and hands over the key shards of an ordered group.
async fn keep_leases(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(leases) = &strong.leases else {
            return;
        };
        let period = leases.period();
        leases.tick(|index| strong.quiet(index)).await;
        drop(strong);
        tokio::time::sleep(period).await;
    }
}

impl Inner {
    /// Whether to pull from target `index` now.
    fn reading(&self, index: usize) -> bool {
        self.leases.as_ref().is_none_or(|l| l.reading(index))
    }

    /// Whether this member may keep target `index`'s deliveries alive.
    fn holds(&self, index: usize) -> bool {
        self.leases.as_ref().is_none_or(|l| l.holds(index))
    }

    /// Whether nothing of target `index` is held or may still be delivered.
    fn quiet(&self, index: usize) -> bool {
        let open = *self.open[index].lock().unwrap();
        if open.is_some_and(|until| Instant::now() < until + GRACE) {
            return false;
        }
        !self
            .held
            .lock()
            .unwrap()
            .values()
            .any(|h| h.target == index)
    }

    /// Records that target `index`'s pull request ended, or was sent and
    /// lasts until `until`.
    fn set_pending(
        &self,
        pending: &mut [Option<(Instant, usize)>],
        index: usize,
        request: Option<(Instant, usize)>,
    ) {
        pending[index] = request;
        *self.open[index].lock().unwrap() = request.map(|(until, _)| until);
    }

    fn touch(&self) {
        *self.last_call.lock().unwrap() = Instant::now();
    }

    async fn send_ack(&self, subject: Subject, kind: AckKind) -> Result<()> {
        self.client
            .publish(subject, kind.into())
            .await
            .context("NATS publish of an ack")
    }

    /// Sends a pull request to every consumer that has none pending.
    async fn request_more(
        &self,
        pending: &mut [Option<(Instant, usize)>],
        streams: &[String],
        max: usize,
        wait: Duration,
    ) -> Result<()> {
        let now = Instant::now();
        let expires = wait.clamp(MIN_PULL, MAX_PULL);
        // An ordered group's fetch shares what it asks for among the
        // shards it reads, so that many shards do not bring in many times
        // as much.
        if self.turns.lock().unwrap().waiting() >= MAX_WAITING {
            return Ok(());
        }
        let max = match self.leases {
            Some(_) => {
                let reading = (0..pending.len()).filter(|&i| self.reading(i)).count();
                max.div_ceil(reading.max(1))
            }
            None => max,
        };
        for index in 0..pending.len() {
            if matches!(pending[index], Some((until, _)) if now < until + GRACE)
                || !self.reading(index)
            {
                continue;
            }
            let target = &self.targets[index];
            let request = serde_json::json!({
                "batch": max,
                "expires": expires.as_nanos() as u64,
            });
            self.client
                .publish_with_reply(
                    format!(
                        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                        streams[index], target.consumer
                    ),
                    format!("{}.{index}", self.inbox_prefix),
                    serde_json::to_vec(&request)?.into(),
                )
                .await
                .context("NATS publish of a pull request")?;
            self.set_pending(pending, index, Some((now + expires, max)));
        }
        Ok(())
    }

    /// Takes one message from the inbox: a delivery, or news about a pull
    /// request (which ends it, or says why there is nothing).
    fn receive(
        &self,
        raw: async_nats::Message,
        pending: &mut [Option<(Instant, usize)>],
        suspect: &mut [bool],
    ) -> Result<Option<Delivery>> {
        if let Some(status) = raw.status {
            let index = raw
                .subject
                .rsplit('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
                .filter(|i| *i < pending.len());
            let Some(index) = index else {
                return Ok(None);
            };
            match status {
                StatusCode::IDLE_HEARTBEAT => {}
                StatusCode::NOT_FOUND | StatusCode::TIMEOUT => {
                    self.set_pending(pending, index, None)
                }
                StatusCode::NO_RESPONDERS => {
                    // JetStream not ready (just restarted) or the consumer is gone.
                    tracing::debug!(group = %self.group, consumer = %self.targets[index].consumer, "JetStream did not answer a pull request");
                    pending[index] = Some((Instant::now() + UNAVAILABLE_PAUSE - GRACE, 0));
                    *self.open[index].lock().unwrap() = None;
                    suspect[index] = true;
                }
                _ => {
                    let why = raw.description.clone().unwrap_or_default();
                    tracing::debug!(group = %self.group, "pull request ended: {status} {why}");
                    self.set_pending(pending, index, None);
                    if why.to_ascii_lowercase().contains("consumer deleted") {
                        suspect[index] = true;
                    }
                }
            }
            return Ok(None);
        }
        let Some(ack_subject) = raw.reply.clone() else {
            return Ok(None);
        };
        let message = jetstream::Message {
            message: raw,
            context: self.js.clone(),
        };
        let info = message
            .info()
            .map_err(|e| anyhow::anyhow!("malformed JetStream ack subject: {e}"))?;
        let target = self.by_name.get(info.consumer).copied();
        if let Some(index) = target
            && let Some((until, owed)) = pending[index]
        {
            self.set_pending(pending, index, (owed > 1).then_some((until, owed - 1)));
        }
        let stream_sequence = info.stream_sequence;
        let attempt = u32::try_from(info.delivered).unwrap_or(u32::MAX).max(1);
        let fallback_id = format!("{}:{}", info.stream, info.stream_sequence);
        let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
        let raw = message.message;
        let decoded = headers::decode_lossy(raw.headers.as_ref());
        let topic = match self.provision.settings.shards {
            Some(_) => shards::topic(&raw.subject),
            None => raw.subject.to_string(),
        };
        let message = Message {
            id: decoded.id.unwrap_or(fallback_id),
            topic,
            key: decoded.key,
            headers: decoded.headers,
            payload: raw.payload.to_vec(),
            timestamp_ms: decoded.timestamp_ms.unwrap_or(published_ms),
        };
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let target = target.unwrap_or(usize::MAX);
        let takes_turns = self.targets.get(target).is_some_and(|t| t.leased);
        // Cloned only for a message that takes turns: the turns key it.
        let key = takes_turns.then(|| message.key.clone()).flatten();
        let delivery = Delivery {
            message,
            attempt,
            receipt: Receipt::new(token),
        };
        // Held before its turn may come, so a settle finds it.
        self.held.lock().unwrap().insert(
            token,
            Held {
                ack_subject,
                target,
                stream_sequence,
                takes_turns: key.is_some(),
                since: Instant::now(),
            },
        );
        let Some(key) = key else {
            return Ok(Some(delivery));
        };
        let place = (target, stream_sequence);
        if !self.turns.lock().unwrap().admit(key, place, delivery) {
            // A redelivery of one this member holds: its ack settles both.
            self.held.lock().unwrap().remove(&token);
        }
        Ok(None)
    }

    /// Asks the server whether each suspect target's consumer still exists,
    /// and makes the ones that do not again. Fails while the server cannot
    /// answer.
    async fn restore_lost(&self, suspect: &mut [bool], streams: &mut [String]) -> Result<()> {
        for (index, target) in self.targets.iter().enumerate() {
            if !suspect[index] {
                continue;
            }
            if self
                .provision
                .consumer_exists(&streams[index], &target.consumer)
                .await?
            {
                suspect[index] = false;
                continue;
            }
            streams[index] = self
                .provision
                .restore(target, &self.options)
                .await
                .with_context(|| {
                    format!(
                        "JetStream consumer `{}` of group `{}` is gone and cannot be made again",
                        target.consumer, self.group
                    )
                })?;
            suspect[index] = false;
            record_restored("jetstream");
            tracing::warn!(
                group = %self.group,
                consumer = %target.consumer,
                stream = %streams[index],
                "the JetStream consumer of this group was gone (deleted, or lost with the server's store) and was made again; messages its stream still keeps are delivered again from the group's start position"
            );
        }
        Ok(())
    }

    /// Takes what the subscription holds of `delivery`, to settle it.
    fn take_held(
        &self,
        held: &mut HashMap<u64, Held>,
        delivery: &Delivery,
    ) -> Result<(u64, Held), SettleError> {
        let token = *delivery.receipt.get::<u64>().map_err(SettleError::Fatal)?;
        match held.remove(&token) {
            Some(held) => Ok((token, held)),
            None if self.closed.load(Ordering::SeqCst) => Err(SettleError::Closed),
            None => Err(SettleError::Fatal(anyhow::anyhow!(
                "delivery of message {} was already settled",
                delivery.message.id
            ))),
        }
    }
}

#[async_trait]
impl Subscription for JsSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let inner = &self.inner;
        inner.touch();
        let max = max.max(1);
        let give_up = Instant::now() + wait;
        let mut out = Vec::new();
        let mut asked = false;
        loop {
            if inner.closed.load(Ordering::SeqCst) {
                return Err(closed_error(&inner.group));
            }
            let woken = inner.woken.notified();
            let mut pulls = inner.pulls.lock().await;
            let Pulls {
                inbox,
                pending,
                suspect,
                streams,
            } = &mut *pulls;
            let Some(inbox) = inbox.as_mut() else {
                return Err(closed_error(&inner.group));
            };
            while out.len() < max {
                match inbox.next().now_or_never() {
                    Some(Some(raw)) => out.extend(inner.receive(raw, pending, suspect)?),
                    Some(None) => {
                        bail!("the NATS connection of group `{}` was closed", inner.group)
                    }
                    None => break,
                }
            }
            let room = max.saturating_sub(out.len());
            out.extend(inner.turns.lock().unwrap().take(room));
            if !out.is_empty() {
                inner.touch();
                return Ok(out);
            }
            let now = Instant::now();
            if asked && now >= give_up {
                return Ok(out);
            }
            // A pull request sent while disconnected waits in the client's
            // buffer and gets no answer: say so instead of seeming idle.
            if inner.client.connection_state() == async_nats::connection::State::Disconnected {
                bail!(
                    "not connected to NATS at `{}` (reconnecting)",
                    inner.server.shown()
                );
            }
            // A live consumer ends every request (with messages, or a
            // timeout status at its expiry); one that got no answer at all
            // reached no consumer: a server that came back without it.
            for (slot, suspect) in pending.iter().zip(suspect.iter_mut()) {
                if matches!(slot, Some((until, _)) if now >= *until + GRACE) {
                    *suspect = true;
                }
            }
            if suspect.contains(&true) {
                inner.restore_lost(suspect, streams).await?;
            }
            // Even a fetch that may not wait asks the server once.
            inner
                .request_more(
                    pending,
                    streams,
                    max,
                    give_up.saturating_duration_since(now),
                )
                .await?;
            asked = true;
            let until = give_up.max(now + MIN_PULL);
            let retry = inner.turns.lock().unwrap().next_retry();
            tokio::select! {
                raw = inbox.next() => match raw {
                    Some(raw) => out.extend(inner.receive(raw, pending, suspect)?),
                    None => bail!("the NATS connection of group `{}` was closed", inner.group),
                },
                _ = tokio::time::sleep_until(until) => {
                    out.extend(inner.turns.lock().unwrap().take(max));
                    return Ok(out);
                }
                // A retry came due, or a settle gave a key's next its turn.
                _ = tokio::time::sleep_until(retry.unwrap_or(until)), if retry.is_some() => {}
                _ = woken => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        one(self.settle(vec![(delivery, Settlement::Ack)]).await)
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        one(self.settle(vec![(delivery, Settlement::Nack(delay))]).await)
    }

    async fn settle(&self, batch: Vec<(&Delivery, Settlement)>) -> Vec<Result<(), SettleError>> {
        let inner = &self.inner;
        inner.touch();
        let taken: Vec<Result<(u64, Held), SettleError>> = {
            let mut held = inner.held.lock().unwrap();
            batch
                .iter()
                .map(|(delivery, settlement)| match settlement {
                    Settlement::PublishAndAck(_) => Err(SettleError::Fatal(anyhow::anyhow!(
                        "JetStream cannot publish and acknowledge in one transaction"
                    ))),
                    _ => inner.take_held(&mut held, delivery),
                })
                .collect()
        };
        let mut unsent = Vec::new();
        let mut results = Vec::with_capacity(batch.len());
        let mut turned = false;
        for ((delivery, settlement), taken) in batch.into_iter().zip(taken) {
            let (token, held) = match taken {
                Ok(taken) => taken,
                Err(e) => {
                    results.push(Err(e));
                    continue;
                }
            };
            if let Settlement::Nack(delay) = settlement
                && held.takes_turns
            {
                // Kept here, its key held: the server would hand it out
                // again only after the key's later messages.
                let again = Delivery {
                    message: delivery.message.clone(),
                    attempt: delivery.attempt.saturating_add(1),
                    receipt: Receipt::new(token),
                };
                inner.held.lock().unwrap().insert(token, held);
                inner.turns.lock().unwrap().retry(again, delay);
                inner.woken.notify_waiters();
                results.push(Ok(()));
                continue;
            }
            let kind = match settlement {
                Settlement::Nack(delay) => AckKind::Nak((!delay.is_zero()).then_some(delay)),
                _ => AckKind::Ack,
            };
            // Into the connection's queue: the whole batch goes out together.
            match inner.send_ack(held.ack_subject.clone(), kind).await {
                Ok(()) => {
                    if held.takes_turns
                        && let Some(key) = &delivery.message.key
                    {
                        let place = (held.target, held.stream_sequence);
                        inner.turns.lock().unwrap().settled(key, place);
                        turned = true;
                    }
                    results.push(Ok(()))
                }
                Err(e) => {
                    unsent.push((token, held));
                    results.push(Err(SettleError::Unavailable(e)));
                }
            }
        }
        if !unsent.is_empty() {
            // Still held, so settling them again can work.
            inner.held.lock().unwrap().extend(unsent);
        }
        if turned {
            inner.woken.notify_waiters();
        }
        results
    }

    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        inner.woken.notify_waiters();
        let mut pulls = inner.pulls.lock().await;
        let Pulls {
            inbox,
            pending,
            suspect,
            streams,
        } = &mut *pulls;
        if let Some(mut inbox) = inbox.take() {
            let end = pending
                .iter()
                .flatten()
                .map(|(until, _)| *until + GRACE)
                .max()
                .unwrap_or_else(Instant::now)
                .min(Instant::now() + MAX_PULL + GRACE);
            while pending.iter().any(Option::is_some) {
                let raw = tokio::select! {
                    raw = inbox.next() => raw,
                    _ = tokio::time::sleep_until(end) => None,
                };
                let Some(raw) = raw else {
                    break;
                };
                // Received only to be handed back: `receive` holds it below.
                if let Err(e) = inner.receive(raw, pending, suspect) {
                    tracing::debug!(group = %inner.group, "while closing: {e:#}");
                }
            }
            if let Err(e) = inbox.unsubscribe().await {
                tracing::debug!(group = %inner.group, "NATS unsubscribe: {e}");
            }
        }
        // In stream order, so a key shard's next reader gets them back in
        // the order they were published.
        inner.turns.lock().unwrap().clear();
        let mut held: Vec<Held> = inner.held.lock().unwrap().drain().map(|(_, h)| h).collect();
        held.sort_by_key(|h| h.stream_sequence);
        for held in held {
            inner.send_ack(held.ack_subject, AckKind::Nak(None)).await?;
        }
        flush(&inner.client, &inner.server).await?;
        if let Some(leases) = &inner.leases {
            leases.release_all().await;
        }
        if inner.ephemeral {
            for (target, stream) in inner.targets.iter().zip(streams.iter()) {
                if let Err(e) = inner
                    .js
                    .delete_consumer_from_stream(&target.consumer, stream)
                    .await
                {
                    tracing::warn!(group = %inner.group, consumer = %target.consumer, "could not delete an ephemeral JetStream consumer (the server removes it after inactivity): {e}");
                }
            }
        }
        Ok(())
    }
}

/// The answer of a batch of one, as the single-delivery calls give it.
fn one(mut results: Vec<Result<(), SettleError>>) -> Result<()> {
    match results.pop() {
        Some(result) => result.map_err(anyhow::Error::from),
        None => Ok(()),
    }
}
