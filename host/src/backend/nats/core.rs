//! The NATS core backend (`nats://`): subjects as topics, a queue group per
//! consumer group, at-most-once by NATS's design.
//!
//! URL: `nats://[user:pass@]host:port[,host:port…][?name=…&tls=true&timeout_ms=N&pending=N]`.
//! `timeout_ms` (default 10000) bounds a publish's round trip; `pending` (default
//! 65536) is how many messages a subscription buffers before the server
//! counts it a slow consumer and drops messages for it.
//!
//! What NATS does not keep, the host cannot get back: a message published
//! while no member of a group is subscribed, a delivery a consumer held when
//! it closed or crashed, and one waiting for its nack delay (kept in this
//! process) are lost. A nack redelivers within this subscription, after the
//! delay, with the attempt counted up. Every route gets at most once what
//! it is subscribed to, which suits telemetry and caches, not orders.
//!
//! Request-reply: a message that came as a request (it has a reply subject)
//! is delivered with the header `sluice-reply-to`; publishing a message to
//! that topic answers the requester. A plugin answers with an output whose
//! topic is that header's value (and `_INBOX.>` in its `publish_to`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::{Client, Subscriber};
use async_trait::async_trait;
use futures::stream::SelectAll;
use futures::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::headers;
use super::{COMMON_PARAMS, ServerUrl, nats_name, split_url};
use crate::backend::{
    Backend, Capabilities, Delivery, Receipt, SubscribeOptions, Subscription, closed_error, pattern,
};
use crate::message::{Message, now_ms};

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: false,
    history: false,
    consumer_groups: true,
    // NATS keeps the order of one connection's messages to a member.
    ordered_per_key: true,
    // In this process, like the memory backend; lost on close.
    native_delay: true,
    lease: false,
    wildcards: true,
    at_least_once: false,
    lease_checked: false,
    // Nothing is kept: a message is delivered as it is published.
    backlog: false,
    key_affinity: false,
};

pub struct NatsCoreBackend {
    client: Client,
    server: ServerUrl,
    /// A subject only this handle subscribes to, for [`Self::round_trip`].
    echo_subject: String,
    echo: tokio::sync::Mutex<Subscriber>,
    echo_count: AtomicU64,
}

/// Connects and waits for the server's answer to a flush; changes nothing.
pub async fn probe(url: &str) -> Result<String> {
    let (server, _) = parse_url(url)?;
    let client = server.connect(1).await?;
    flush(&client, &server).await?;
    Ok(format!("NATS {}", client.server_info().version))
}

impl NatsCoreBackend {
    pub async fn connect(url: &str) -> Result<Self> {
        let (server, pending) = parse_url(url)?;
        let client = server.connect(pending.max(1)).await?;
        let echo_subject = client.new_inbox();
        let echo = client
            .subscribe(echo_subject.clone())
            .await
            .context("NATS subscribe to the echo subject")?;
        Ok(NatsCoreBackend {
            client,
            server,
            echo_subject,
            echo: tokio::sync::Mutex::new(echo),
            echo_count: AtomicU64::new(0),
        })
    }

    /// Waits until the server has processed everything sent so far: it
    /// handles one connection's messages in order, so once a marker sent to
    /// ourselves comes back, what was sent before it has been passed on.
    /// (The client's own flush only empties the socket buffer; what the
    /// kernel held when the server died would be lost unnoticed.)
    async fn round_trip(&self) -> Result<()> {
        let mut echo = self.echo.lock().await;
        let first = self.echo_count.load(Ordering::Relaxed);
        let wait = async {
            loop {
                let connects = self.client.statistics().connects.load(Ordering::SeqCst);
                let marker = self.echo_count.fetch_add(1, Ordering::Relaxed);
                self.client
                    .publish(
                        self.echo_subject.clone(),
                        marker.to_string().into_bytes().into(),
                    )
                    .await?;
                self.client.flush().await?;
                // A reconnect loses a marker still in the old socket: send
                // another. Markers of earlier round trips may come first.
                loop {
                    tokio::select! {
                        back = echo.next() => {
                            let Some(back) = back else {
                                bail!("the NATS connection was closed");
                            };
                            let seen: Option<u64> = std::str::from_utf8(&back.payload)
                                .ok()
                                .and_then(|m| m.parse().ok());
                            if seen.is_some_and(|seen| seen >= first) {
                                return anyhow::Ok(());
                            }
                        }
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if self.client.statistics().connects.load(Ordering::SeqCst) != connects {
                                break;
                            }
                        }
                    }
                }
            }
        };
        match tokio::time::timeout(self.server.timeout, wait).await {
            Ok(result) => result.with_context(|| format!("NATS at `{}`", self.server.shown())),
            Err(_) => bail!(
                "NATS at `{}` did not answer within {:?} (disconnected?)",
                self.server.shown(),
                self.server.timeout
            ),
        }
    }
}

pub(crate) async fn flush(client: &Client, server: &ServerUrl) -> Result<()> {
    match tokio::time::timeout(server.timeout, client.flush()).await {
        Ok(result) => result.with_context(|| format!("NATS flush to `{}`", server.shown())),
        Err(_) => bail!(
            "NATS at `{}` did not answer within {:?} (disconnected?)",
            server.shown(),
            server.timeout
        ),
    }
}

/// Splits a `nats://` URL into the servers and how many messages a
/// subscription buffers (`pending`).
pub(crate) fn parse_url(url: &str) -> Result<(ServerUrl, usize)> {
    let (mut server, mut params) = split_url(url, "nats")?;
    server.take_common(&mut params)?;
    let pending = params.take("pending", "a number")?.unwrap_or(65_536);
    params.finish(&[&["pending"], COMMON_PARAMS].concat())?;
    Ok((server, pending))
}

/// A topic a message may be published to: concrete, well-formed.
pub(crate) fn check_publish_topic(topic: &str) -> Result<()> {
    pattern::validate(topic).map_err(anyhow::Error::msg)?;
    if pattern::is_pattern(topic) {
        bail!("cannot publish to the pattern `{topic}`: a topic must be concrete");
    }
    Ok(())
}

#[async_trait]
impl Backend for NatsCoreBackend {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        let connects = self.client.statistics().connects.load(Ordering::SeqCst);
        let send = async {
            for message in messages {
                check_publish_topic(&message.topic)?;
                let encoded = headers::encode(&message);
                self.client
                    .publish_with_headers(message.topic.clone(), encoded, message.payload.into())
                    .await
                    .with_context(|| format!("NATS publish to `{}`", message.topic))?;
            }
            anyhow::Ok(())
        };
        // A disconnected client buffers; do not wait for it forever.
        tokio::time::timeout(self.server.timeout, send)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "NATS at `{}` took longer than {:?} to take the messages (disconnected?)",
                    self.server.shown(),
                    self.server.timeout
                )
            })??;
        // Returning means the server has them (and has passed them on).
        self.round_trip().await?;
        // What was written to a connection that then broke is gone, though
        // the flush on the new one succeeds: say so, the caller may resend.
        if self.client.statistics().connects.load(Ordering::SeqCst) != connects {
            bail!(
                "the connection to NATS at `{}` was re-established during the publish; \
                 messages sent before that may be lost (NATS core is at-most-once)",
                self.server.shown()
            );
        }
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        let queue = nats_name(&options.group, &options.group_key());
        let mut merged = SelectAll::new();
        for topic in &options.topics {
            let subscriber = self
                .client
                .queue_subscribe(topic.clone(), queue.clone())
                .await
                .with_context(|| format!("NATS subscribe to `{topic}`"))?;
            merged.push(subscriber);
        }
        // Only once the server knows the interest will later publishes reach it.
        self.round_trip().await?;
        Ok(Box::new(CoreSubscription {
            client: self.client.clone(),
            server: self.server.clone(),
            group: options.group_key(),
            inbox: tokio::sync::Mutex::new(Some(merged)),
            delayed: Mutex::new(BTreeMap::new()),
            held: Mutex::new(HashSet::new()),
            next_token: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            woken: Notify::new(),
        }))
    }
}

struct CoreSubscription {
    client: Client,
    server: ServerUrl,
    group: String,
    /// `None` once closed.
    inbox: tokio::sync::Mutex<Option<SelectAll<Subscriber>>>,
    /// Nacked messages by the time they are due again, with their next attempt.
    delayed: Mutex<BTreeMap<(Instant, u64), (Message, u32)>>,
    /// Tokens of deliveries handed out and not settled yet.
    held: Mutex<HashSet<u64>>,
    next_token: AtomicU64,
    closed: AtomicBool,
    /// Woken by a nack (a new due time) and by close.
    woken: Notify,
}

impl CoreSubscription {
    fn deliver(&self, message: Message, attempt: u32) -> Delivery {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.held.lock().unwrap().insert(token);
        Delivery {
            message,
            attempt,
            receipt: Receipt::new(token),
        }
    }

    /// Due redeliveries, up to `max`, and when the next one is due.
    fn take_due(&self, max: usize, out: &mut Vec<Delivery>) -> Option<Instant> {
        let now = Instant::now();
        let mut delayed = self.delayed.lock().unwrap();
        while out.len() < max {
            let Some(entry) = delayed.first_entry() else {
                break;
            };
            if entry.key().0 > now {
                break;
            }
            let (message, attempt) = entry.remove();
            out.push(self.deliver(message, attempt));
        }
        delayed.keys().next().map(|(at, _)| *at)
    }

    fn settle(&self, delivery: &Delivery) -> Result<()> {
        let token = *delivery.receipt.get::<u64>()?;
        if !self.held.lock().unwrap().remove(&token) {
            bail!(
                "delivery of message {} was already settled",
                delivery.message.id
            );
        }
        Ok(())
    }
}

/// A received NATS message as a Sluice message.
fn to_message(raw: async_nats::Message) -> Message {
    let decoded = headers::decode_lossy(raw.headers.as_ref());
    let mut message = Message {
        id: decoded
            .id
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        topic: raw.subject.to_string(),
        key: decoded.key,
        headers: decoded.headers,
        payload: raw.payload.to_vec(),
        timestamp_ms: decoded.timestamp_ms.unwrap_or_else(now_ms),
    };
    if let Some(reply) = raw.reply {
        message.set_header(headers::REPLY_TO, reply.to_string());
    }
    message
}

#[async_trait]
impl Subscription for CoreSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let give_up = Instant::now() + wait;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(closed_error(&self.group));
            }
            let woken = self.woken.notified();
            let mut out = Vec::new();
            let next_due = self.take_due(max, &mut out);
            let mut inbox = self.inbox.lock().await;
            let Some(stream) = inbox.as_mut() else {
                return Err(closed_error(&self.group));
            };
            while out.len() < max {
                match stream.next().now_or_never() {
                    Some(Some(raw)) if raw.status.is_none() => {
                        out.push(self.deliver(to_message(raw), 1))
                    }
                    Some(Some(_status)) => {}
                    _ => break,
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            if Instant::now() >= give_up {
                return Ok(out);
            }
            let until = next_due.map_or(give_up, |due| due.min(give_up));
            tokio::select! {
                raw = stream.next() => match raw {
                    Some(raw) if raw.status.is_none() => {
                        out.push(self.deliver(to_message(raw), 1));
                        while out.len() < max {
                            match stream.next().now_or_never() {
                                Some(Some(raw)) if raw.status.is_none() => {
                                    out.push(self.deliver(to_message(raw), 1))
                                }
                                Some(Some(_status)) => {}
                                _ => break,
                            }
                        }
                        return Ok(out);
                    }
                    Some(_status) => {}
                    None => bail!("the NATS connection of group `{}` was closed", self.group),
                },
                _ = tokio::time::sleep_until(until) => {}
                _ = woken => {}
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.settle(delivery)
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        self.settle(delivery)?;
        let token = *delivery.receipt.get::<u64>()?;
        self.delayed.lock().unwrap().insert(
            (Instant::now() + delay, token),
            (delivery.message.clone(), delivery.attempt + 1),
        );
        self.woken.notify_waiters();
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.woken.notify_waiters();
        let merged = self.inbox.lock().await.take();
        if let Some(mut merged) = merged {
            for subscriber in merged.iter_mut() {
                // Dropping would unsubscribe too; this reports a failure.
                if let Err(e) = subscriber.unsubscribe().await {
                    tracing::debug!(group = %self.group, "NATS unsubscribe: {e}");
                }
            }
        }
        let lost = self.held.lock().unwrap().len() + self.delayed.lock().unwrap().len();
        if lost > 0 {
            tracing::debug!(group = %self.group, lost, "NATS core is at-most-once: unsettled deliveries are dropped on close");
        }
        self.delayed.lock().unwrap().clear();
        flush(&self.client, &self.server).await
    }
}
