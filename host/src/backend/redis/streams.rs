//! The Redis Streams backend: publishing (XADD, one MULTI per batch), joining
//! consumer groups, the key layout, and the pending count for monitoring.
//! What a subscription does is in `subscription.rs`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::streams::StreamInfoGroupsReply;
use ::redis::{Client, Value};
use anyhow::{Context, Result, bail};
use async_trait::async_trait;

use super::config::{self, RedisUrl, StreamsConfig, Tls};
use super::subscription::StreamSubscription;
use super::{glob_escape, scripts, transient};
use crate::backend::{Backend, Capabilities, StartFrom, SubscribeOptions, Subscription, pattern};
use crate::message::Message;

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    // With AOF (`appendonly yes`, `appendfsync always` for every
    // write); a server that keeps nothing on disk loses everything.
    persistent: true,
    history: true,
    consumer_groups: true,
    // Per stream; with `ordered`, through nacks and across the
    // members of a group too (key affinity).
    ordered_per_key: true,
    native_delay: false,
    lease: true,
    wildcards: true,
    at_least_once: true,
    // The settling script checks that this consumer still holds
    // the entry, with the delivery count it was given, before it
    // changes anything.
    lease_checked: true,
    // XINFO GROUPS `lag` (Redis 7 and later).
    backlog: true,
    // An ordered group hands out a key's next message only once its
    // previous one is settled: see `TAKE_TURNS` in `scripts.rs`.
    key_affinity: true,
};

/// Where everything lives, under the configured prefix `P`:
///
/// | key | type | holds |
/// |---|---|---|
/// | `P<topic>` | stream | the topic's messages (fields `id`, `key`, `headers`, `payload`, `ts`) |
/// | `P.retry:<group>` | stream | the group's redeliveries, one envelope per entry (`m`) |
/// | `P.delayed:<group>` | sorted set | envelopes waiting for their delay, scored by due time |
/// | `P.streams:<group>` | set | every stream the group has joined |
/// | `P.groups` | hash | group → the id it starts new streams at |
/// | `P.busy:<group>` | hash | for an ordered group: each key with a message in flight → that message's id |
/// | `P.waiting:<group>:<key>` | list | for an ordered group: the key's later messages, read and waiting for it, in order |
/// | `P.turned:<group>` | hash | each topic stream → its last entry that had its key's turn in the group (kept for every group, used by ordered ones) |
///
/// A topic never starts with `.` (its first token would be empty), so the
/// bookkeeping keys can never collide with a topic's stream.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn stream(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// The topic a stream key belongs to, if it is a topic stream.
    pub fn topic<'a>(&self, key: &'a str) -> Option<&'a str> {
        let topic = key.strip_prefix(&self.prefix)?;
        (pattern::validate(topic).is_ok() && !pattern::is_pattern(topic)).then_some(topic)
    }

    pub fn retry(&self, group: &str) -> String {
        format!("{}.retry:{group}", self.prefix)
    }

    pub fn delayed(&self, group: &str) -> String {
        format!("{}.delayed:{group}", self.prefix)
    }

    pub fn streams_of(&self, group: &str) -> String {
        format!("{}.streams:{group}", self.prefix)
    }

    pub fn groups(&self) -> String {
        format!("{}.groups", self.prefix)
    }

    pub fn busy(&self, group: &str) -> String {
        format!("{}.busy:{group}", self.prefix)
    }

    pub fn turned(&self, group: &str) -> String {
        format!("{}.turned:{group}", self.prefix)
    }

    /// What a key's waiting list is named after: the key follows.
    pub fn waiting_prefix(&self, group: &str) -> String {
        format!("{}.waiting:{group}:", self.prefix)
    }

    /// A SCAN MATCH glob covering every stream a pattern could match: the
    /// literal tokens before its first wildcard, then anything.
    pub fn scan_glob(&self, topic_pattern: &str) -> String {
        let mut literal = String::new();
        for token in topic_pattern.split('.') {
            if token == "*" || token == ">" {
                break;
            }
            literal.push_str(token);
            literal.push('.');
        }
        format!("{}{}*", glob_escape(&self.prefix), glob_escape(&literal))
    }
}

pub struct RedisStreamsBackend {
    shared: Arc<Shared>,
}

/// What the backend and its subscriptions share.
pub struct Shared {
    pub client: Client,
    /// Publishing, acks, nacks, scripts: everything that never blocks.
    pub conn: ConnectionManager,
    pub config: StreamsConfig,
    pub keys: Keys,
    /// Topics this instance published to, in order, so its pattern
    /// subscriptions find new streams at once instead of at the next scan.
    published: Mutex<(Vec<String>, HashSet<String>)>,
    /// Bumped by every nack here, so readers look for due retries now.
    pub nacks: AtomicU64,
    /// Bumped when a subscription here hands entries back on close, so the
    /// group's other members claim them now rather than at their next
    /// reclaim round.
    pub handbacks: AtomicU64,
}

impl Shared {
    /// Records the topics of messages just published, for pattern
    /// subscriptions here to find their streams at once.
    pub fn note_published<'a>(&self, topics: impl Iterator<Item = &'a str>) {
        let mut published = self.published.lock().unwrap();
        for topic in topics {
            if !published.1.contains(topic) {
                published.1.insert(topic.to_string());
                published.0.push(topic.to_string());
            }
        }
    }

    /// Topics published here since `seen`, and the new mark.
    pub fn published_since(&self, seen: usize) -> (Vec<String>, usize) {
        let published = self.published.lock().unwrap();
        (
            published.0[seen.min(published.0.len())..].to_vec(),
            published.0.len(),
        )
    }

    /// A connection of its own, for a subscription's blocking reads.
    pub fn reader_connection(&self) -> Result<ConnectionManager> {
        // No response timeout: XREADGROUP BLOCK answers late on purpose, and
        // the reader bounds each call itself.
        let config = reconnecting().set_response_timeout(None);
        Ok(ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            config,
        )?)
    }

    /// Makes sure the group exists on the retry stream and on `streams`,
    /// returning the id new streams start at.
    pub async fn ensure_groups(
        &self,
        group: &str,
        start: StartFrom,
        streams: &[String],
    ) -> Result<String> {
        let mut invocation = scripts::ENSURE_GROUPS.prepare_invoke();
        invocation
            .key(self.keys.groups())
            .key(self.keys.streams_of(group))
            .key(self.keys.retry(group))
            .key(self.keys.turned(group));
        for stream in streams {
            invocation.key(stream);
        }
        invocation.arg(group).arg(match start {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        });
        let invocation = &invocation;
        let start: String = transient::retry(|| {
            let mut conn = self.conn.clone();
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
        .with_context(|| format!("cannot create consumer group `{group}`"))?;
        Ok(start)
    }

    /// Every topic stream whose topic matches `topic_pattern`.
    pub async fn scan(&self, topic_pattern: &str) -> Result<Vec<String>> {
        let glob = self.keys.scan_glob(topic_pattern);
        let mut cursor = 0u64;
        let mut found = Vec::new();
        loop {
            let mut scan = ::redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&glob)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream");
            let scan = &scan;
            let (next, keys): (u64, Vec<String>) = transient::retry(|| {
                let mut conn = self.conn.clone();
                async move { scan.query_async(&mut conn).await }
            })
            .await
            .context("SCAN for streams")?;
            for key in keys {
                if self
                    .keys
                    .topic(&key)
                    .is_some_and(|topic| pattern::matches(topic_pattern, topic))
                {
                    found.push(key);
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        found.sort();
        found.dedup();
        Ok(found)
    }
}

/// One field of a stream entry: its name and value.
pub type EntryField<'a> = (&'static str, Cow<'a, [u8]>);

/// The fields of a message's stream entry, as name/value pairs (the key
/// and headers only when present); refuses a topic that cannot be
/// published to.
pub fn entry_fields(message: &Message) -> Result<Vec<EntryField<'_>>> {
    if let Err(e) = pattern::validate(&message.topic) {
        bail!("cannot publish: {e}");
    }
    if pattern::is_pattern(&message.topic) {
        bail!(
            "cannot publish to `{}`: a pattern is not a topic",
            message.topic
        );
    }
    let mut fields = Vec::with_capacity(5);
    fields.push(("id", Cow::Borrowed(message.id.as_bytes())));
    if let Some(key) = &message.key {
        fields.push(("key", Cow::Borrowed(key.as_bytes())));
    }
    if !message.headers.is_empty() {
        fields.push(("headers", Cow::Owned(serde_json::to_vec(&message.headers)?)));
    }
    fields.push(("payload", Cow::Borrowed(&message.payload[..])));
    fields.push((
        "ts",
        Cow::Owned(message.timestamp_ms.to_string().into_bytes()),
    ));
    Ok(fields)
}

/// The backend's command connection to the server `client` names
/// (`redacted` for errors): reconnecting on its own, a command answered
/// within 10 s; a failure is one line naming the server and the cause.
pub(super) async fn manage(client: &redis::Client, redacted: &str) -> Result<ConnectionManager> {
    ConnectionManager::new_with_config(
        client.clone(),
        reconnecting().set_response_timeout(Some(Duration::from_secs(10))),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to Redis at `{redacted}`: {}",
            crate::backend::cause_line(&e)
        )
    })
}

/// Reconnects with backoff (100 ms doubling, at most 2 s between tries);
/// once the tries run out, the next command starts over.
fn reconnecting() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_number_of_retries(6)
        .set_connection_timeout(Some(Duration::from_secs(2)))
}

impl RedisStreamsBackend {
    /// Connects to `redis[s]://[user:password@]host[:port][/db][?params]`.
    /// The URL's address, TLS and stream settings, every parameter checked.
    pub(crate) fn parse(url: &str) -> Result<(RedisUrl, Tls, StreamsConfig)> {
        let (mut url, tls) = config::open(url, "redis")?;
        let config = StreamsConfig::from_url(&mut url)?;
        url.finish(&[StreamsConfig::PARAMS, Tls::PARAMS].concat())?;
        Ok((url, tls, config))
    }

    pub async fn connect(url: &str) -> Result<Self> {
        let (url, tls, config) = Self::parse(url)?;
        let client = url.client(&tls)?;
        let conn = manage(&client, &url.redacted).await?;
        check_version(&mut conn.clone(), &url.redacted).await?;
        Ok(RedisStreamsBackend {
            shared: Arc::new(Shared {
                client,
                conn,
                keys: Keys::new(&config.prefix),
                config,
                published: Mutex::new((Vec::new(), HashSet::new())),
                nacks: AtomicU64::new(0),
                handbacks: AtomicU64::new(0),
            }),
        })
    }

    /// Unsettled messages of a group, for monitoring: delivered and not yet
    /// acknowledged (its pending entries on every stream it reads, including
    /// its retry stream), plus nacked ones waiting for their delay. `group`
    /// is the group's key, [`SubscribeOptions::group_key`].
    pub async fn pending(&self, group: &str) -> Result<u64> {
        let keys = &self.shared.keys;
        let mut conn = self.shared.conn.clone();
        let streams: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(keys.streams_of(group))
            .query_async(&mut conn)
            .await?;
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for stream in &streams {
            pipe.cmd("XPENDING").arg(stream).arg(group);
        }
        pipe.cmd("ZCARD").arg(keys.delayed(group));
        let replies: Vec<::redis::RedisResult<Value>> = pipe.query_async(&mut conn).await?;
        let mut total = 0u64;
        for reply in replies {
            // A stream deleted behind our back answers NOGROUP: nothing pending.
            total += match reply {
                Ok(Value::Int(n)) => n as u64,
                Ok(Value::Array(summary)) => match summary.first() {
                    Some(Value::Int(n)) => *n as u64,
                    _ => 0,
                },
                _ => 0,
            };
        }
        Ok(total)
    }

    /// Entries of a group's topic streams not yet delivered to it: the
    /// `lag` XINFO GROUPS reports, summed over the streams it joined but
    /// its retry stream, which holds only messages delivered before.
    /// `None` for a group never joined, and where Redis cannot say: before
    /// 7.0 it reports no lag, and 7.x answers nil after deletions within
    /// the part of a stream the group has not read.
    pub async fn backlog(&self, group: &str) -> Result<Option<u64>> {
        let keys = &self.shared.keys;
        let mut conn = self.shared.conn.clone();
        let streams: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(keys.streams_of(group))
            .query_async(&mut conn)
            .await?;
        if streams.is_empty() {
            return Ok(None);
        }
        let retry = keys.retry(group);
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for stream in streams.iter().filter(|s| **s != retry) {
            pipe.cmd("XINFO").arg("GROUPS").arg(stream);
        }
        let replies: Vec<::redis::RedisResult<Value>> = pipe.query_async(&mut conn).await?;
        let mut total = 0u64;
        for reply in replies {
            // A stream deleted behind our back holds nothing to wait for.
            let Ok(reply) = reply else { continue };
            let info: StreamInfoGroupsReply = ::redis::from_redis_value(reply)?;
            if let Some(ours) = info.groups.iter().find(|g| g.name == group) {
                match ours.lag {
                    Some(lag) => total += lag as u64,
                    None => return Ok(None),
                }
            }
        }
        Ok(Some(total + self.waiting(group).await?))
    }

    /// Messages of an ordered group read and waiting for their key's turn
    /// (no longer in any stream's lag).
    async fn waiting(&self, group: &str) -> Result<u64> {
        let keys = &self.shared.keys;
        let mut conn = self.shared.conn.clone();
        let busy: Vec<String> = ::redis::cmd("HKEYS")
            .arg(keys.busy(group))
            .query_async(&mut conn)
            .await?;
        if busy.is_empty() {
            return Ok(0);
        }
        let prefix = keys.waiting_prefix(group);
        let mut pipe = ::redis::pipe();
        for key in &busy {
            pipe.cmd("LLEN").arg(format!("{prefix}{key}"));
        }
        let lengths: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(lengths.iter().sum())
    }

    /// The key layout this backend uses.
    pub fn keys(&self) -> &Keys {
        &self.shared.keys
    }
}

/// XAUTOCLAIM needs 6.2; refuse older servers up front.
async fn check_version(conn: &mut ConnectionManager, redacted: &str) -> Result<String> {
    let version = server_version(conn, redacted).await?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (6, 2) {
        bail!(
            "Redis at `{redacted}` is version `{version}`; the Streams backend needs 6.2 or newer"
        );
    }
    Ok(version)
}

/// The server's `redis_version`.
pub(super) async fn server_version(conn: &mut ConnectionManager, redacted: &str) -> Result<String> {
    let info: String = ::redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .with_context(|| format!("cannot query Redis at `{redacted}`"))?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("")
        .trim()
        .to_string())
}

/// Connects and reads the server's version (the Streams backend needs 6.2
/// or newer); changes nothing.
pub async fn probe(url: &str) -> Result<String> {
    let (url, tls, _) = RedisStreamsBackend::parse(url)?;
    let client = url.client(&tls)?;
    let mut conn = manage(&client, &url.redacted).await?;
    let version = check_version(&mut conn, &url.redacted).await?;
    Ok(format!("Redis {version}"))
}

#[async_trait]
impl Backend for RedisStreamsBackend {
    async fn pending(&self, group_key: &str) -> Result<Option<u64>> {
        RedisStreamsBackend::pending(self, group_key)
            .await
            .map(Some)
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        RedisStreamsBackend::backlog(self, group_key).await
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        // All or nothing, so a failed publish can simply be repeated. The
        // whole batch goes out in one write and its replies are read
        // together: one round trip whatever its size.
        pipe.atomic();
        for message in &messages {
            let cmd = pipe
                .cmd("XADD")
                .arg(self.shared.keys.stream(&message.topic));
            if let Some(maxlen) = self.shared.config.maxlen {
                cmd.arg("MAXLEN").arg("~").arg(maxlen);
            }
            cmd.arg("*");
            for (name, value) in entry_fields(message)? {
                cmd.arg(name).arg(value.as_ref());
            }
            cmd.ignore();
        }
        let pipe = &pipe;
        let _: () = transient::retry(|| {
            let mut conn = self.shared.conn.clone();
            async move { pipe.query_async(&mut conn).await }
        })
        .await
        .context("XADD to Redis")?;
        self.shared
            .note_published(messages.iter().map(|m| m.topic.as_str()));
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        Ok(Box::new(
            StreamSubscription::join(self.shared.clone(), options).await?,
        ))
    }
}
