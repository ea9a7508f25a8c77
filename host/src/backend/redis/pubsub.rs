//! The Redis pub/sub backend: broadcast, best effort, at most once.
//!
//! Each message is PUBLISHed as one envelope (`envelope.rs`) on channel
//! `<prefix><topic>`. Each consumer group of a backend instance has its own
//! Redis connection subscribed to the group's topics (SUBSCRIBE for topics,
//! PSUBSCRIBE for patterns, whose `*` also crosses dots in Redis, so what
//! arrives is matched again against the group's patterns). What arrives is
//! handed to an in-process [`MemoryBackend`] holding just that group: its
//! members compete for messages, nacks redeliver after their delay,
//! attempts count, and a closing member's unsettled messages go to the
//! others. Across processes there is no coordination: each process's group
//! receives every message.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::Client;
use ::redis::aio::ConnectionManager;
use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use tokio::sync::{oneshot, watch};

use super::config::{self, PubSubConfig, RedisUrl, Tls};
use super::listener::Listener;
use super::{envelope, glob_escape, transient};
use crate::backend::memory::MemoryBackend;
use crate::backend::{Backend, Capabilities, Delivery, SubscribeOptions, Subscription, pattern};
use crate::message::Message;

/// How long a publish waits for this instance's own groups to be listening
/// again after a reconnect.
const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: false,
    history: false,
    // Within one process; across processes each process's group
    // receives every message.
    consumer_groups: true,
    ordered_per_key: true,
    native_delay: false,
    lease: false,
    wildcards: true,
    at_least_once: false,
    lease_checked: false,
    // Nothing is kept: a message is delivered as it is published.
    backlog: false,
    key_affinity: false,
};

pub struct RedisPubSubBackend {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    conn: ConnectionManager,
    config: PubSubConfig,
    redacted: String,
    groups: tokio::sync::Mutex<HashMap<String, Arc<Group>>>,
}

/// A consumer group of this instance: one Redis subscription, one
/// in-process queue.
struct Group {
    /// The group's topics and patterns.
    topics: Vec<String>,
    local: Arc<MemoryBackend>,
    members: AtomicUsize,
    /// True while the Redis subscription is live.
    listening: watch::Receiver<bool>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Group {
    fn wants(&self, topic: &str) -> bool {
        self.topics.iter().any(|p| pattern::matches(p, topic))
    }
}

/// Connects and reads the server's version; changes nothing.
pub async fn probe(url: &str) -> Result<String> {
    let (url, tls, _) = RedisPubSubBackend::parse(url)?;
    let client = url.client(&tls)?;
    let mut conn = super::streams::manage(&client, &url.redacted).await?;
    let version = super::streams::server_version(&mut conn, &url.redacted).await?;
    Ok(format!("Redis {version}"))
}

impl RedisPubSubBackend {
    /// Connects to `redis[s]+pubsub://[user:password@]host[:port][?params]`.
    /// The URL's address, TLS and settings, every parameter checked.
    pub(crate) fn parse(url: &str) -> Result<(RedisUrl, Tls, PubSubConfig)> {
        let (mut url, tls) = config::open(url, "redis+pubsub")?;
        let config = PubSubConfig::from_url(&mut url)?;
        url.finish(&[PubSubConfig::PARAMS, Tls::PARAMS].concat())?;
        Ok((url, tls, config))
    }

    pub async fn connect(url: &str) -> Result<Self> {
        let (url, tls, config) = Self::parse(url)?;
        let client = url.client(&tls)?;
        let conn = super::streams::manage(&client, &url.redacted).await?;
        Ok(RedisPubSubBackend {
            shared: Arc::new(Shared {
                client,
                conn,
                config,
                redacted: url.redacted,
                groups: tokio::sync::Mutex::new(HashMap::new()),
            }),
        })
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}{topic}", self.shared.config.prefix)
    }

    /// Waits (bounded) until this instance's groups that want these messages
    /// are subscribed, so a process does not lose its own messages while it
    /// resubscribes after a reconnect.
    async fn wait_for_listeners(&self, messages: &[Message]) {
        let waiting: Vec<watch::Receiver<bool>> = {
            let groups = self.shared.groups.lock().await;
            groups
                .values()
                .filter(|g| !*g.listening.borrow())
                .filter(|g| messages.iter().any(|m| g.wants(&m.topic)))
                .map(|g| g.listening.clone())
                .collect()
        };
        if waiting.is_empty() {
            return;
        }
        let all = futures::future::join_all(waiting.into_iter().map(|mut rx| async move {
            let _ = rx.wait_for(|listening| *listening).await;
        }));
        if tokio::time::timeout(RESUBSCRIBE_WAIT, all).await.is_err() {
            tracing::debug!("publishing while a local group is still resubscribing");
        }
    }

    async fn start_group(&self, options: &SubscribeOptions) -> Result<Arc<Group>> {
        let prefix = &self.shared.config.prefix;
        let (mut channels, mut globs) = (Vec::new(), Vec::new());
        for topic in &options.topics {
            if pattern::is_pattern(topic) {
                globs.push(to_glob(prefix, topic));
            } else {
                channels.push(format!("{prefix}{topic}"));
            }
        }
        let local = Arc::new(MemoryBackend::new(self.shared.config.capacity));
        let (listening_tx, listening) = watch::channel(false);
        let (ready_tx, ready) = oneshot::channel();
        let listener = Listener {
            client: self.shared.client.clone(),
            channels,
            globs,
            group: options.group_key(),
            redacted: self.shared.redacted.clone(),
            local: local.clone(),
            dropped: AtomicU64::new(0),
        };
        let group = Arc::new(Group {
            topics: options.topics.clone(),
            local,
            members: AtomicUsize::new(0),
            listening,
            listener: tokio::spawn(listener.run(listening_tx, ready_tx)),
        });
        match ready.await {
            Ok(Ok(())) => Ok(group),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!(
                "the subscriber connection of group `{}` ended",
                options.group_key()
            ),
        }
    }
}

#[async_trait]
impl Backend for RedisPubSubBackend {
    fn kind(&self) -> &'static str {
        "redis+pubsub"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        for message in &messages {
            if let Err(e) = pattern::validate(&message.topic) {
                bail!("cannot publish: {e}");
            }
            if pattern::is_pattern(&message.topic) {
                bail!(
                    "cannot publish to `{}`: a pattern is not a topic",
                    message.topic
                );
            }
        }
        self.wait_for_listeners(&messages).await;
        let mut pipe = ::redis::pipe();
        for message in &messages {
            pipe.cmd("PUBLISH")
                .arg(self.channel(&message.topic))
                .arg(envelope::encode(message, 0))
                .ignore();
        }
        let pipe = &pipe;
        let _: () = transient::retry(|| {
            let mut conn = self.shared.conn.clone();
            async move { pipe.query_async(&mut conn).await }
        })
        .await
        .context("PUBLISH to Redis")?;
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        let key = options.group_key();
        let mut groups = self.shared.groups.lock().await;
        let group = match groups.get(&key) {
            Some(group) => group.clone(),
            None => {
                let group = self.start_group(&options).await?;
                groups.insert(key.clone(), group.clone());
                group
            }
        };
        let inner = group.local.subscribe(options).await?;
        group.members.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(PubSubSubscription {
            shared: self.shared.clone(),
            key,
            group,
            inner,
            closed: AtomicBool::new(false),
        }))
    }
}

/// A channel glob for a topic pattern: each wildcard token becomes `*`.
fn to_glob(prefix: &str, topic_pattern: &str) -> String {
    let tokens: Vec<String> = topic_pattern
        .split('.')
        .map(|t| match t {
            "*" | ">" => "*".to_string(),
            literal => glob_escape(literal),
        })
        .collect();
    format!("{}{}", glob_escape(prefix), tokens.join("."))
}

struct PubSubSubscription {
    shared: Arc<Shared>,
    key: String,
    group: Arc<Group>,
    inner: Box<dyn Subscription>,
    closed: AtomicBool,
}

#[async_trait]
impl Subscription for PubSubSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.inner.fetch(max, wait).await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        self.inner.ack(delivery).await
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        self.inner.nack(delivery, delay).await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.close().await?;
        let mut groups = self.shared.groups.lock().await;
        if self.group.members.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last member: the Redis subscription ends with the group.
            if groups
                .get(&self.key)
                .is_some_and(|g| Arc::ptr_eq(g, &self.group))
            {
                groups.remove(&self.key);
            }
        }
        Ok(())
    }
}
