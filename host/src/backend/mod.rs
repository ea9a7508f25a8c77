//! The backend contract: the small surface every message backend implements.
//!
//! A backend publishes messages and hands out subscriptions. A subscription
//! belongs to a consumer group: members of one group compete for messages,
//! every group gets every message (fan-out). Each delivery is settled exactly
//! once: `ack` removes it, `nack` makes it visible again after a delay.
//! Dead-lettering is done by the host on top of every backend (publish to the
//! dead-letter topic, then ack), so it means the same everywhere.
//!
//! A backend declares what it guarantees in [`Capabilities`]; what it lacks
//! natively (topic patterns, nack delays) it provides itself, with shared
//! pieces such as [`pattern`] (see `docs/architecture.md`).

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::message::Message;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod ack_batch;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod claims;
#[cfg(feature = "filelog")]
pub mod filelog;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
pub mod pattern;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "sqs")]
pub mod sqs;
pub mod url;

/// What a backend guarantees and does natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Messages and group positions survive a restart of the host.
    pub persistent: bool,
    /// A group that subscribes late still receives messages published before
    /// it existed (when it starts from the earliest position).
    pub history: bool,
    /// Consumer groups: members of a group compete, groups fan out.
    pub consumer_groups: bool,
    /// Deliveries of one key arrive in publish order.
    pub ordered_per_key: bool,
    /// `nack` with a delay is honoured by the backend itself.
    pub native_delay: bool,
    /// Unsettled deliveries of a consumer that died come back by themselves
    /// after a lease (visibility timeout).
    pub lease: bool,
    /// Topic patterns (`*`, `>`) are supported in subscriptions.
    pub wildcards: bool,
    /// At-least-once delivery; `false` means at-most-once (best effort).
    pub at_least_once: bool,
    /// Settling a delivery whose lease has passed to another consumer
    /// answers [`SettleError::LeaseLost`] and changes nothing: the other
    /// consumer's copy stays its own. Where `false`, a stale ack may still
    /// remove the message (it was handled, so nothing is lost).
    pub lease_checked: bool,
    /// [`Backend::backlog`] answers how many messages wait for a group.
    pub backlog: bool,
    /// With [`SubscribeOptions::ordered`], a key's next message goes to no
    /// consumer of the group, in any process, until its previous one is
    /// settled (a nack holds the key), so per-key order holds across the
    /// consumers of a group and through retries.
    pub key_affinity: bool,
}

/// Where a group that has never consumed starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// Every message the backend still holds.
    #[default]
    Earliest,
    /// Only messages published after the group was created.
    Latest,
}

/// What to subscribe to and as whom.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Topics or patterns (`orders.*`, `orders.>`).
    pub topics: Vec<String>,
    /// The consumer group.
    pub group: String,
    /// Where a new group starts.
    pub start: StartFrom,
    /// How long a fetched delivery stays invisible to other consumers before
    /// it is considered abandoned and redelivered.
    pub lease: Duration,
    /// The group exists only for this subscription (e.g. `sluice tail`) and
    /// is removed when it closes.
    pub ephemeral: bool,
    /// Key affinity, for routes with `ordered = true`: a key's next message
    /// is handed out, to any consumer of the group, only once its previous
    /// one is settled (acked or dead-lettered; a nack holds the key), so
    /// one key is handled by one consumer at a time, in publish order.
    /// Backends with [`Capabilities::key_affinity`] claim this way;
    /// elsewhere it is ignored.
    pub ordered: bool,
}

impl SubscribeOptions {
    /// The identity of the consumer group inside a backend: its name and
    /// its topics. Two routes that reuse a group name for different topics
    /// are thus independent, and never receive each other's messages.
    pub fn group_key(&self) -> String {
        let mut topics = self.topics.clone();
        topics.sort();
        topics.dedup();
        format!("{}[{}]", self.group, topics.join(","))
    }

    pub fn new(topics: Vec<String>, group: impl Into<String>) -> Self {
        SubscribeOptions {
            topics,
            group: group.into(),
            start: StartFrom::Earliest,
            lease: Duration::from_secs(30),
            ephemeral: false,
            ordered: false,
        }
    }
}

/// A backend's handle on one delivery, opaque to the host.
pub struct Receipt(Box<dyn Any + Send + Sync>);

impl Receipt {
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Receipt(Box::new(value))
    }

    /// The backend's own value, or an error if the receipt came from another
    /// backend.
    pub fn get<T: Any>(&self) -> Result<&T> {
        match self.0.downcast_ref::<T>() {
            Some(value) => Ok(value),
            None => bail!("receipt belongs to a different backend"),
        }
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Receipt(..)")
    }
}

/// One delivery of a message to a consumer.
#[derive(Debug)]
pub struct Delivery {
    pub message: Message,
    /// 1 on first delivery.
    pub attempt: u32,
    pub receipt: Receipt,
}

/// What the host decided for one delivery.
#[derive(Debug)]
pub enum Settlement {
    /// Handled: never deliver it to this group again.
    Ack,
    /// Failed: deliver it again after the delay.
    Nack(Duration),
    /// Publish these to the subscription's own backend and ack the
    /// delivery, both or neither (only on [`Subscription::transactional`]
    /// subscriptions).
    PublishAndAck(Vec<Message>),
}

/// Why one settlement did not take effect: the router branches on it.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The delivery's lease ran out and another consumer may hold it now:
    /// nothing took effect, and the message is that consumer's to handle.
    #[error("the delivery's lease was lost; another consumer holds it now")]
    LeaseLost,
    /// The subscription was closed; the delivery goes back to the group.
    #[error("the subscription is closed")]
    Closed,
    /// A transient failure (connection, timeout): trying again may work.
    #[error("the backend is unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// Trying again will not help (e.g. a permission or schema error).
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for SettleError {
    /// A typed error raised inside a backend keeps its kind; anything else
    /// counts as transient.
    fn from(error: anyhow::Error) -> Self {
        match error.downcast::<SettleError>() {
            Ok(typed) => typed,
            Err(other) => SettleError::Unavailable(other),
        }
    }
}

/// A message backend.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name of the kind of backend: its URL scheme, e.g. `sqlite`
    /// (without the `s` of a TLS scheme such as `rediss`).
    fn kind(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Publishes messages; returns once the backend has accepted all of them
    /// (durably, for a persistent backend).
    async fn publish(&self, messages: Vec<Message>) -> Result<()>;

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>>;

    /// Messages of a group (by [`SubscribeOptions::group_key`]) delivered
    /// and not yet settled, or waiting out a nack delay, for monitoring;
    /// `None` where the backend cannot say cheaply.
    async fn pending(&self, _group_key: &str) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Messages published to a group's topics (by
    /// [`SubscribeOptions::group_key`]) and not yet delivered to it, from
    /// the backend's own figure, for monitoring: what a paused or slow
    /// route has waiting. `None` where the backend has no such figure
    /// (those that keep nothing, such as Redis pub/sub and NATS core), and
    /// for a group it does not know.
    async fn backlog(&self, _group_key: &str) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// A consumer's view of one consumer group.
#[async_trait]
pub trait Subscription: Send + Sync {
    /// Up to `max` deliveries; waits at most `wait` for the first one and
    /// returns an empty list if none came. Cancel-safe: dropping the future
    /// loses nothing (a claimed delivery comes back after its lease).
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>>;

    /// The delivery was handled: never deliver it to this group again.
    async fn ack(&self, delivery: &Delivery) -> Result<()>;

    /// The delivery failed: deliver it again after `delay`.
    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()>;

    /// Whether [`Subscription::publish_and_ack`] is available: the backend
    /// can publish to itself and settle a delivery in one transaction.
    fn transactional(&self) -> bool {
        false
    }

    /// Publishes `messages` to this subscription's own backend and acks
    /// `delivery` atomically: both take effect, or neither does and an
    /// error says why (e.g. the delivery's lease ran out and another
    /// consumer holds it). Only for [`Subscription::transactional`] ones.
    async fn publish_and_ack(&self, delivery: &Delivery, messages: Vec<Message>) -> Result<()> {
        let _ = (delivery, messages);
        bail!("this backend cannot publish and acknowledge in one transaction")
    }

    /// Settles a batch of deliveries, answering for each in order. Each
    /// item takes effect on its own: one item's failure leaves the others'
    /// results standing. The default settles one at a time; a backend that
    /// can do a batch in one round trip (or one transaction) overrides it.
    async fn settle(&self, batch: Vec<(&Delivery, Settlement)>) -> Vec<Result<(), SettleError>> {
        let mut results = Vec::with_capacity(batch.len());
        for (delivery, settlement) in batch {
            let result = match settlement {
                Settlement::Ack => self.ack(delivery).await,
                Settlement::Nack(delay) => self.nack(delivery, delay).await,
                Settlement::PublishAndAck(messages) => {
                    self.publish_and_ack(delivery, messages).await
                }
            };
            results.push(result.map_err(SettleError::from));
        }
        results
    }

    /// Stops consuming: later fetches fail. Unsettled deliveries go back to
    /// the group.
    async fn close(&self) -> Result<()>;
}

/// Server-side state (a consumer, group, queue or table) that backends
/// found lost under a running subscription and made again, per kind of
/// backend.
static RESTORED: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts one piece of server-side state a backend of `kind` made again;
/// the backend warns about it itself, with what was lost.
pub fn record_restored(kind: &'static str) {
    *RESTORED.lock().unwrap().entry(kind).or_default() += 1;
}

/// How often backends of each kind made lost server-side state again.
pub fn restored() -> Vec<(&'static str, u64)> {
    RESTORED
        .lock()
        .unwrap()
        .iter()
        .map(|(kind, n)| (*kind, *n))
        .collect()
}

/// The error of a fetch on a closed subscription.
pub fn closed_error(group: &str) -> anyhow::Error {
    anyhow::anyhow!("the subscription of group `{group}` is closed")
}

/// Opens the backend a URL names: `memory://`, `sqlite://PATH`, `file://DIR`,
/// `redis://`, `redis+pubsub://` (`rediss` for TLS), `nats://`, `jetstream://`, `postgres://`,
/// `kafka://`, `sqs://`, `sns+sqs://`.
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    let Some((scheme, _)) = url.split_once("://") else {
        bail!(
            "backend URL `{}` has no scheme (expected e.g. sqlite://sluice.db or memory://)",
            redact(url)
        );
    };
    match kinds().iter().find(|kind| kind.schemes.contains(&scheme)) {
        Some(kind) => (kind.connect)(url).await,
        None => bail!(
            "backend URL `{}`: {}",
            redact(url),
            unsupported_scheme(scheme, &supported_schemes())
        ),
    }
}

/// Chooses ring as rustls' process-wide crypto provider, which the Redis
/// and NATS clients and plugins' outbound HTTP take: with more than one
/// built in (the AWS SDK brings aws-lc-rs) rustls cannot choose, and panics
/// at the first TLS client. Another provider installed first stays.
pub(crate) fn choose_rustls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error and its sources on one line, leaving out a source whose text
/// is already there: client libraries often put their source's text in
/// their own, which `{:#}` would then show twice.
#[cfg(any(feature = "redis", feature = "nats", feature = "postgres"))]
pub(crate) fn cause_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// A kind of backend this build can open.
pub struct BackendKind {
    /// Its URL schemes.
    pub schemes: &'static [&'static str],
    /// What it guarantees with a given URL, known before anything is
    /// connected (a URL that does not parse gets the scheme's defaults).
    pub capabilities: fn(&str) -> Capabilities,
    /// Parses a URL of this kind as `connect` would, every parameter
    /// checked, without connecting.
    pub parse: fn(&str) -> Result<()>,
    /// Opens the backend a URL of this kind names.
    pub connect: Connect,
    /// Reaches the backend a URL of this kind names, changing nothing, and
    /// says what it found (`sluice check --connect`).
    pub probe: Probe,
}

/// How a [`BackendKind`] opens a backend.
pub type Connect = fn(&str) -> BoxFuture<'_, Result<Arc<dyn Backend>>>;

/// How a [`BackendKind`] reaches a backend without changing it.
pub type Probe = fn(&str) -> BoxFuture<'_, Result<String>>;

/// The [`Probe`] of an `async fn(&str) -> Result<String>`.
macro_rules! probe_with {
    ($probe:path) => {{
        fn probe(url: &str) -> BoxFuture<'_, Result<String>> {
            Box::pin($probe(url))
        }
        probe
    }};
}

/// The [`Connect`] of a backend type with an `async fn connect(&str)`.
#[allow(unused_macros)] // every backend that uses it may be left out of a build
macro_rules! connect_with {
    ($backend:ty) => {{
        fn connect(url: &str) -> BoxFuture<'_, Result<Arc<dyn Backend>>> {
            Box::pin(
                async move { Ok(Arc::new(<$backend>::connect(url).await?) as Arc<dyn Backend>) },
            )
        }
        connect
    }};
}

fn connect_memory(url: &str) -> BoxFuture<'_, Result<Arc<dyn Backend>>> {
    Box::pin(async move { Ok(Arc::new(memory::MemoryBackend::from_url(url)?) as Arc<dyn Backend>) })
}

/// Every kind of backend this build can open: adding a backend is its
/// module and one entry here.
pub fn kinds() -> Vec<BackendKind> {
    let kind = |schemes, capabilities, parse, connect, probe| BackendKind {
        schemes,
        capabilities,
        parse,
        connect,
        probe,
    };
    #[allow(unused_mut)]
    let mut kinds = vec![kind(
        &["memory"],
        |_| memory::CAPABILITIES,
        |url| memory::MemoryBackend::from_url(url).map(drop),
        connect_memory,
        probe_with!(memory::probe),
    )];
    #[cfg(feature = "sqlite")]
    kinds.push(kind(
        &["sqlite"],
        |_| sqlite::CAPABILITIES,
        |url| sqlite::parse_url(url).map(drop),
        connect_with!(sqlite::SqliteBackend),
        probe_with!(sqlite::probe),
    ));
    #[cfg(feature = "filelog")]
    kinds.push(kind(
        &["file"],
        |_| filelog::CAPABILITIES,
        |url| filelog::parse_url(url).map(drop),
        connect_with!(filelog::FileLogBackend),
        probe_with!(filelog::probe),
    ));
    #[cfg(feature = "redis")]
    kinds.extend([
        kind(
            &["redis", "rediss"],
            |_| redis::streams::CAPABILITIES,
            |url| redis::RedisStreamsBackend::parse(url).map(drop),
            connect_with!(redis::RedisStreamsBackend),
            probe_with!(redis::streams::probe),
        ),
        kind(
            &["redis+pubsub", "rediss+pubsub"],
            |_| redis::pubsub::CAPABILITIES,
            |url| redis::RedisPubSubBackend::parse(url).map(drop),
            connect_with!(redis::RedisPubSubBackend),
            probe_with!(redis::pubsub::probe),
        ),
    ]);
    #[cfg(feature = "nats")]
    kinds.extend([
        kind(
            &["nats"],
            |_| nats::core::CAPABILITIES,
            |url| nats::core::parse_url(url).map(drop),
            connect_with!(nats::core::NatsCoreBackend),
            probe_with!(nats::core::probe),
        ),
        kind(
            &["jetstream"],
            nats::jetstream::capabilities_for,
            |url| nats::jetstream::JetStreamBackend::parse(url).map(drop),
            connect_with!(nats::jetstream::JetStreamBackend),
            probe_with!(nats::jetstream::probe),
        ),
    ]);
    #[cfg(feature = "postgres")]
    kinds.push(kind(
        &["postgres", "postgresql"],
        |_| postgres::CAPABILITIES,
        |url| postgres::PostgresSettings::parse(url).map(drop),
        connect_with!(postgres::PostgresBackend),
        probe_with!(postgres::probe),
    ));
    #[cfg(feature = "kafka")]
    kinds.push(kind(
        &["kafka"],
        |_| kafka::CAPABILITIES,
        |url| kafka::KafkaConfig::parse(url).map(drop),
        connect_with!(kafka::KafkaBackend),
        probe_with!(kafka::probe),
    ));
    #[cfg(feature = "sqs")]
    kinds.extend([
        kind(
            &["sqs"],
            |_| sqs::SQS_CAPABILITIES,
            |url| sqs::config::SqsConfig::parse(url, sqs::plain::SCHEME).map(drop),
            connect_with!(sqs::SqsBackend),
            probe_with!(sqs::probe_sqs),
        ),
        kind(
            &["sns+sqs"],
            |_| sqs::CAPABILITIES,
            |url| sqs::config::SqsConfig::parse(url, sqs::sns::SCHEME).map(drop),
            connect_with!(sqs::SnsSqsBackend),
            probe_with!(sqs::probe_sns_sqs),
        ),
    ]);
    kinds
}

/// Reaches the backend a URL names without changing anything there, and
/// says what it found.
pub async fn probe(url: &str) -> Result<String> {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match kinds().iter().find(|kind| kind.schemes.contains(&scheme)) {
        Some(kind) => (kind.probe)(url).await,
        None => bail!("{}", unsupported_scheme(scheme, &supported_schemes())),
    }
}

/// Parses a backend URL as connecting would, without connecting: an
/// unknown, repeated or malformed parameter is an error naming it.
pub fn parse_url(url: &str) -> Result<()> {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match kinds().iter().find(|kind| kind.schemes.contains(&scheme)) {
        Some(kind) => (kind.parse)(url),
        None => bail!("{}", unsupported_scheme(scheme, &supported_schemes())),
    }
}

/// URL schemes this build can connect to.
pub fn supported_schemes() -> Vec<&'static str> {
    kinds()
        .iter()
        .flat_map(|kind| kind.schemes.iter().copied())
        .collect()
}

/// What the backend a URL opens guarantees, if this build has it.
pub fn capabilities_of(url: &str) -> Option<Capabilities> {
    let scheme = url.split_once("://").map_or(url, |(scheme, _)| scheme);
    kinds()
        .into_iter()
        .find(|kind| kind.schemes.contains(&scheme))
        .map(|kind| (kind.capabilities)(url))
}

/// The schemes of this build's backends that guarantee what `has` asks,
/// for an error that says where a route could run instead.
pub fn schemes_with(has: impl Fn(&Capabilities) -> bool) -> Vec<&'static str> {
    kinds()
        .iter()
        .filter(|kind| has(&(kind.capabilities)(&format!("{}://", kind.schemes[0]))))
        .flat_map(|kind| kind.schemes.iter().copied())
        .collect()
}

/// The cargo feature a backend's URL scheme needs, for every scheme
/// Sluice knows (`memory` needs none).
pub fn scheme_feature(scheme: &str) -> Option<&'static str> {
    Some(match scheme {
        "sqlite" => "sqlite",
        "file" => "filelog",
        "redis" | "rediss" | "redis+pubsub" | "rediss+pubsub" => "redis",
        "nats" | "jetstream" => "nats",
        "postgres" | "postgresql" => "postgres",
        "kafka" => "kafka",
        "sqs" | "sns+sqs" => "sqs",
        _ => return None,
    })
}

/// Why a build with the backends `supported` cannot open `scheme://`, and
/// what to do: the feature a known scheme needs, or the scheme probably
/// meant.
pub fn unsupported_scheme(scheme: &str, supported: &[&str]) -> String {
    let has = supported.join(", ");
    if let Some(feature) = scheme_feature(scheme) {
        return format!(
            "{scheme}:// needs a sluice built with --features {feature} (or full); \
             this build has: {has}"
        );
    }
    match crate::config::keys::nearest(scheme, supported.iter().copied()) {
        Some(meant) => format!(
            "unknown backend `{scheme}://`; did you mean `{meant}://`? this build has: {has}"
        ),
        None => format!("unknown backend `{scheme}://`; this build has: {has}"),
    }
}

/// Query parameters whose value is a secret, by a part of their name.
const SECRET_PARAMETERS: [&str; 4] = ["password", "passwd", "secret", "token"];

/// Whether the value of query parameter `name` is a secret, never shown.
pub(crate) fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMETERS.iter().any(|secret| name.contains(secret))
}

/// The URL with every secret replaced, safe to log: the password of each
/// `user:password@` (several servers may each have one, and a password may
/// hold an unescaped `/`), and the value of a query parameter whose name
/// says it is a secret (`password=`, `rdkafka.sasl.password=`, `token=`).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // Split where the URL parsers split, so a `?` in a password stays in it.
    let (servers, query) = self::url::split_query(rest);
    let mut out = format!("{scheme}://");
    for (i, server) in servers.split(',').enumerate() {
        if i > 0 {
            out.push(',');
        }
        // The last `@` ends the user part, whatever the password holds.
        match server.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push_str(":***@");
                    out.push_str(host);
                }
                None => out.push_str(server),
            },
            None => out.push_str(server),
        }
    }
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) if is_secret_parameter(name) => {
                    out.push_str(name);
                    out.push_str("=***");
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(super::redact("sqlite://a.db"), "sqlite://a.db");
        assert_eq!(
            super::redact("postgres://app@db/test"),
            "postgres://app@db/test"
        );
    }

    /// Every form of URL a backend takes, with a secret wherever one can be.
    #[test]
    fn redacts_every_form_of_secret() {
        let cases = [
            ("redis://:pw@h:6379", "redis://:***@h:6379"),
            ("redis://u:p/w@h:6379/0", "redis://u:***@h:6379/0"),
            ("redis://u:p@w@h/0?prefix=x:", "redis://u:***@h/0?prefix=x:"),
            ("redis+pubsub://u:pw@h", "redis+pubsub://u:***@h"),
            (
                "nats://a:pw1@h1:4222,b:pw2@h2:4222?name=x",
                "nats://a:***@h1:4222,b:***@h2:4222?name=x",
            ),
            (
                "jetstream://u:pw@h:4222?stream=S",
                "jetstream://u:***@h:4222?stream=S",
            ),
            ("nats://h:4222?token=abc", "nats://h:4222?token=***"),
            (
                "postgres://app:pw@db:5432/test?sslmode=require&password=pw2",
                "postgres://app:***@db:5432/test?sslmode=require&password=***",
            ),
            (
                "kafka://h:9092?rdkafka.sasl.username=u&rdkafka.sasl.password=pw",
                "kafka://h:9092?rdkafka.sasl.username=u&rdkafka.sasl.password=***",
            ),
            (
                "sqs://AKIA:sec/ret+x@localhost:4566?region=us-east-1",
                "sqs://AKIA:***@localhost:4566?region=us-east-1",
            ),
            (
                "sns+sqs://AKIA:s@h?region=r",
                "sns+sqs://AKIA:***@h?region=r",
            ),
            (
                "sqlite:///var/lib/a.db?synchronous=full",
                "sqlite:///var/lib/a.db?synchronous=full",
            ),
            ("file:///var/log/sluice", "file:///var/log/sluice"),
            ("memory://?capacity=10", "memory://?capacity=10"),
            // TLS and credential files are paths, shown; inline secrets are not.
            (
                "rediss://app:pw@h:6380/0?ca=/etc/ca.pem&cert=/c.pem&key=/c.key",
                "rediss://app:***@h:6380/0?ca=/etc/ca.pem&cert=/c.pem&key=/c.key",
            ),
            (
                "rediss+pubsub://:pw@h?ca=/ca.pem",
                "rediss+pubsub://:***@h?ca=/ca.pem",
            ),
            (
                "nats://h:4222?tls=true&ca=/ca.pem&creds=/u.creds&nkey=/u.nk&token=t0k",
                "nats://h:4222?tls=true&ca=/ca.pem&creds=/u.creds&nkey=/u.nk&token=***",
            ),
            (
                "postgres://app:pw@db/x?sslmode=verify-full&sslrootcert=/ca.pem&sslkey=/c.key",
                "postgres://app:***@db/x?sslmode=verify-full&sslrootcert=/ca.pem&sslkey=/c.key",
            ),
            (
                "kafka://h:9093?security.protocol=sasl_ssl&sasl.username=u&sasl.password=pw\
                 &ssl.key.password=kpw&ssl.ca.location=/ca.pem",
                "kafka://h:9093?security.protocol=sasl_ssl&sasl.username=u&sasl.password=***\
                 &ssl.key.password=***&ssl.ca.location=/ca.pem",
            ),
            ("sqs://h:4566?profile=ci", "sqs://h:4566?profile=ci"),
            // A password may hold a `?`, a query value an `@`.
            ("redis://u:p?ss@h/0?prefix=x", "redis://u:***@h/0?prefix=x"),
            ("nats://h:4222?name=app@host", "nats://h:4222?name=app@host"),
        ];
        for (url, shown) in cases {
            assert_eq!(super::redact(url), shown, "{url}");
        }
    }

    /// A valid URL of every scheme Sluice knows, and a parameter its kind
    /// takes, with a valid value.
    const SAMPLES: &[(&str, &str)] = &[
        ("memory://", "capacity=10"),
        ("sqlite://sluice.db", "poll_ms=50"),
        ("file:///var/lib/sluice", "fsync=never"),
        ("redis://127.0.0.1:6379/0", "prefix=app:"),
        ("rediss://u:pw@127.0.0.1:6380/0", "count=5"),
        ("redis+pubsub://127.0.0.1:6379", "capacity=5"),
        ("rediss+pubsub://127.0.0.1:6380", "prefix=app:"),
        ("nats://127.0.0.1:4222,127.0.0.1:4223", "pending=10"),
        ("jetstream://u:pw@127.0.0.1:4222", "stream=ORDERS"),
        (
            "postgres://app:pw@db:5432/sluice?sslmode=disable",
            "schema=app",
        ),
        ("postgresql://db/sluice", "pool=2"),
        ("kafka://127.0.0.1:9092", "partitions=6"),
        ("sqs://aws?region=eu-west-1", "prefix=app-"),
        ("sns+sqs://KEY:SECRET@127.0.0.1:4566", "heartbeat=false"),
    ];

    /// Every kind's parser refuses an unknown, a repeated and a valueless
    /// parameter, naming it, and takes its sample as it is.
    #[test]
    fn every_kind_checks_its_parameters_the_same_way() {
        let mut wrong = Vec::new();
        for kind in super::kinds() {
            for scheme in kind.schemes {
                let Some((sample, param)) = SAMPLES
                    .iter()
                    .find(|(url, _)| url.split_once("://").unwrap().0 == *scheme)
                else {
                    wrong.push(format!("{scheme}: no sample URL in SAMPLES"));
                    continue;
                };
                let name = param.split_once('=').unwrap().0;
                let with = |query: &str| {
                    let joint = if sample.contains('?') { '&' } else { '?' };
                    format!("{sample}{joint}{query}")
                };
                let cases = [
                    (sample.to_string(), None),
                    (with(param), None),
                    (with("colour=red"), Some("colour")),
                    (with(&format!("{param}&{param}")), Some(name)),
                    (with("colour"), Some("colour")),
                    (with(&format!("{param}&{name}")), Some(name)),
                ];
                for (url, refused) in cases {
                    let result = (kind.parse)(&url).map_err(|e| format!("{e:#}"));
                    let right = match (&result, refused) {
                        (Ok(()), None) => true,
                        (Err(e), Some(name)) => e.contains(&format!("`{name}`")),
                        _ => false,
                    };
                    if !right {
                        wrong.push(format!("{url}: {result:?}"));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
