//! The connection behind one pub/sub group: subscribes, hands what arrives
//! to the group's in-process queue, notices a dead connection (PING), and
//! subscribes again with backoff after a loss.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::redis::aio::PubSub;
use ::redis::{Client, Msg, Value};
use anyhow::Result;
use futures::{FutureExt, StreamExt};
use tokio::sync::{oneshot, watch};

use super::{envelope, transient};
use crate::backend::Backend;
use crate::backend::memory::MemoryBackend;

/// How often an idle subscriber connection checks it is still alive.
const PING_EVERY: Duration = Duration::from_secs(15);

/// The task that keeps one group's Redis subscription alive.
pub struct Listener {
    pub client: Client,
    /// SUBSCRIBE'd channels (topics).
    pub channels: Vec<String>,
    /// PSUBSCRIBE'd globs (patterns).
    pub globs: Vec<String>,
    /// The group's key, for logs.
    pub group: String,
    /// The server's URL, safe to log.
    pub redacted: String,
    /// The group's queue. The listener is aborted when the group is dropped.
    pub local: Arc<MemoryBackend>,
    /// Messages dropped because the group's queue was full.
    pub dropped: AtomicU64,
}

impl Listener {
    /// Runs until aborted. `listening` is true while subscribed; `ready`
    /// gets the outcome of the first subscription (retried for a while, so a
    /// blip does not fail `subscribe`).
    pub async fn run(self, listening: watch::Sender<bool>, ready: oneshot::Sender<Result<()>>) {
        let mut ready = Some(ready);
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.subscribe()).await {
                Ok(Ok(pubsub)) => {
                    backoff = Duration::from_millis(100);
                    listening.send_replace(true);
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                    self.pump(pubsub).await;
                    listening.send_replace(false);
                    tracing::warn!(group = %self.group, "Redis subscriber connection lost; messages published until it is back are missed");
                }
                failed => {
                    let e = match failed {
                        Ok(Err(e)) => e,
                        _ => anyhow::anyhow!("no answer within 5 s"),
                    };
                    let e = e.context(format!("cannot subscribe at Redis `{}`", self.redacted));
                    if started.elapsed() >= transient::RIDE_OVER
                        && let Some(ready) = ready.take()
                    {
                        let _ = ready.send(Err(e));
                        return;
                    }
                    tracing::warn!(group = %self.group, "{e:#}; retrying in {backoff:?}");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn subscribe(&self) -> Result<PubSub> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        if !self.channels.is_empty() {
            pubsub.subscribe(&self.channels).await?;
        }
        if !self.globs.is_empty() {
            pubsub.psubscribe(&self.globs).await?;
        }
        Ok(pubsub)
    }

    /// Hands messages to the group until the connection is lost.
    async fn pump(&self, pubsub: PubSub) {
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { return };
                    self.hand_over(&message);
                }
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(Duration::from_secs(5), sink.ping::<Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        return;
                    }
                }
            }
        }
    }

    fn hand_over(&self, raw: &Msg) {
        let message = match envelope::decode(raw.get_payload_bytes()) {
            Ok((message, _)) => message,
            Err(e) => {
                tracing::warn!(group = %self.group, channel = raw.get_channel_name(), "ignored a message that is not Sluice's: {e:#}");
                return;
            }
        };
        // The group's queue matches the topic against its patterns and
        // takes it only if there is room: at most once, never blocking the
        // connection (Redis would drop a subscriber that falls behind).
        match self.local.publish(vec![message]).now_or_never() {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::warn!(group = %self.group, "message dropped: {e:#}"),
            None => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped == 1 || dropped.is_multiple_of(1000) {
                    tracing::warn!(group = %self.group, dropped, "group is full; dropping messages");
                }
            }
        }
    }
}
