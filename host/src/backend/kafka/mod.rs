//! The Kafka backend (`kafka://`), through librdkafka (bundled, built from
//! source): consumer groups, at-least-once delivery, offsets committed only
//! past settled messages.
//!
//! # URL: `kafka://HOST:PORT[,HOST:PORT…][?params]`
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `partitions` | 3 | partitions of a topic Sluice creates |
//! | `replication` | 1 | replication factor of a topic Sluice creates |
//! | `timeout_ms` | 30000 | longest wait for the broker: admin requests, a publish's acknowledgement (`message.timeout.ms`), offset look-ups |
//! | `commit_ms` | 200 | how often settled offsets are committed |
//! | `heartbeat_ms` | 500 | consumer heartbeat; members notice a rebalance within about one |
//! | `session_timeout_ms` | the lease, within 6 s–30 min | how long a crashed member keeps its partitions |
//! | `metadata_refresh_ms` | 1000 | how often metadata is refreshed, so patterns see new topics |
//! | `buffer` | 1000 | messages a group member buffers before it takes records only now and then; in an ordered group, those it could hand out now, or an eighth of all it holds if that is more (librdkafka prefetches besides, up to its `queued.max.messages.kbytes`, then stops fetching) |
//! | `join_timeout_ms` | 15000 | longest `subscribe` waits for the group to assign this member |
//! | `rdkafka.NAME` | | any librdkafka property (e.g. `rdkafka.security.protocol=SASL_SSL`), applied last to producer, consumers and admin client; values percent-decoded |
//!
//! # Semantics
//!
//! | | |
//! |---|---|
//! | publish | idempotent producer, `acks=all`; the whole batch is produced, then the delivery reports are awaited together; returns once the broker acknowledged every message; key → record key (murmur2 partitioner, as Java clients); keyless messages in runs of 16 per partition, rotating (see [`spread`]); id and headers → record headers (see [`wire`]) |
//! | topics | created on first publish or subscribe (`partitions`, `replication`); a topic must be a valid Kafka name |
//! | groups | a Kafka consumer group per [`SubscribeOptions::group_key`]; one member per group and process, shared by that process's subscriptions to the group (see [`members`]); members split partitions, every group gets every message |
//! | start | `earliest` → the beginning; `latest` → the end when the group first gets the partition (the high watermark of a fetch response: tansu's ListOffsets answers inside the last batch), committed at once so the group's start stays put |
//! | subscribe | the first subscription of a group in a process returns once its member holds its partitions and knows where each starts (at most `join_timeout_ms`); later ones join that member at once |
//! | resuming | a partition taken over at a committed offset is read from the offset expected, even on a broker that answers a fetch from inside a record batch with the next batch (see [`landing`]); a full buffer never pauses a partition (that would fetch it again from inside a batch), the member just stops taking records |
//! | ordering | per partition, so per key; a nacked message with no delay goes first in line again; one with a delay lets later ones pass, except on an ordered subscription (key affinity), where a key's later messages are shelved out of line until it is settled |
//! | settling | a batch of acks and nacks under one lock of the member's books, no broker round trip (commits follow); a delivery whose partition the member gave up, or that was handed out again since, answers "lease lost" and changes nothing |
//! | commits | the lowest unsettled offset per partition, every `commit_ms`, on revocation and on close; never past an unfinished message |
//! | patterns | `*` and `>` become anchored regular expressions in the subscription (`^orders\.[^.]+$`); new topics are found within `metadata_refresh_ms` |
//! | persistence, history | the broker's; a new `earliest` group reads what the topics still hold |
//!
//! ## nack with a delay
//!
//! Kafka has no per-message delay, and a partition is one queue. The member
//! keeps a nacked message in memory and hands it out again once the delay
//! is over, while later offsets keep flowing; the commit stays at the
//! unfinished offset. Chosen over republishing the message with an attempt
//! header because that reorders the partition for good, duplicates the
//! message in the log (a crash between republish and commit delivers both
//! copies), and needs a retry topic per group to keep other groups from
//! seeing the copy. The price: a crash (or a rebalance) loses the delay, and
//! the message comes back at once to the partition's next owner, and a
//! message nacked over and over holds the commit back, so after a crash its
//! later, settled neighbours are delivered again too.
//!
//! ## Attempts
//!
//! Kafka does not count deliveries. A member counts them, and each commit
//! carries them in its metadata (`v1;THROUGH;OFFSET:ATTEMPTS,…`, see
//! [`ledger::Prior`]): every offset up to THROUGH was handed out at least
//! once, the listed ones more often. The next owner of the partition counts
//! on from there, so attempts grow across rebalances, restarts and crashes
//! (up to the last commit, at most `commit_ms` old).
//!
//! ## Rebalances, the lease and closing
//!
//! Eager rebalancing: on revocation the member commits, then forgets the
//! partitions; acks and nacks of their deliveries become no-ops and the next
//! owner delivers what was unfinished. A subscription that has neither
//! fetched nor settled for its lease while it holds deliveries is taken for
//! dead, as Kafka's `max.poll.interval.ms` would: its deliveries go back in
//! line for the member's other subscriptions. (A busy route may not fetch
//! for longer than a lease, its workers' queues full, while it settles all
//! along.) If no subscription of the member fetches or settles for its
//! lease while messages wait, the member leaves the group so members
//! elsewhere take its partitions, and joins again on the next fetch. A
//! crashed process keeps its partitions for the session timeout, by default
//! the lease. A subscription that closes puts its deliveries back in line;
//! the last one to close makes the member leave the group (committing
//! first), waiting for that at most `min(timeout_ms, 10 s)`.
//!
//! Each member's consumer runs on a thread of its own (see
//! [`consumer`]): destroying an rdkafka consumer connected to tansu was seen
//! to hang for ever in `rd_kafka_destroy`, so consumers, producers and admin
//! clients are dropped on detached threads that are waited for a few
//! seconds at most. An ephemeral group commits nothing and is deleted when
//! its subscription closes.
//!
//! [`SubscribeOptions::group_key`]: crate::backend::SubscribeOptions::group_key

mod admin;
pub(crate) mod config;
mod consumer;
mod lag;
mod landing;
pub(crate) mod ledger;
mod members;
mod names;
mod notes;
mod spread;
mod state;
mod subscription;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::backend::{Backend, Capabilities, StartFrom, SubscribeOptions, Subscription, pattern};
use crate::message::Message;

pub use config::KafkaConfig;

use admin::Admin;
use consumer::{Behaviour, Context as ConsumerContext};
use state::Shared;
use subscription::{GroupNames, KafkaSubscription};

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: true,
    history: true,
    consumer_groups: true,
    ordered_per_key: true,
    // In the member's memory (see the module documentation).
    native_delay: false,
    lease: true,
    wildcards: true,
    at_least_once: true,
    // Stale settlements are refused once the member knows its
    // partitions moved; until it hears of a lapsed session, the
    // broker's generation check is all that stops its commits.
    lease_checked: false,
    // Watermarks less committed offsets.
    backlog: true,
    // A key's partition has one member; within it, an ordered group's
    // next message of a key waits for the previous one (see `state.rs`).
    key_affinity: true,
};

/// A handle on a Kafka cluster: one producer and one admin client; each
/// subscription adds a consumer.
pub struct KafkaBackend {
    config: KafkaConfig,
    producer: Arc<Detached<FutureProducer<LogContext>>>,
    admin: Arc<Admin>,
    spread: spread::Spread,
}

impl KafkaBackend {
    /// Connects to the cluster a `kafka://` URL names; fails if no broker
    /// answers within `timeout_ms`.
    pub async fn connect(url: &str) -> Result<Self> {
        let config = KafkaConfig::parse(url)?;
        config.check_files()?;
        let mut producer_config = client_config(&config);
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", config.timeout.as_millis().to_string());
        apply_properties(&mut producer_config, &config);
        let producer: FutureProducer<LogContext> = producer_config
            .create_with_context(LogContext)
            .with_context(|| format!("cannot create a Kafka producer for `{}`", config.shown))?;
        let producer = Arc::new(Detached::new(producer));
        let admin = Arc::new(Admin::new(&config)?);
        // librdkafka connects lazily: ask for metadata so a wrong address
        // fails here rather than at the first publish.
        let probed = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || probe_metadata(&config)).await?
        };
        if let Err(unreachable) = probed {
            bail!(unreachable.explain(&config));
        }
        Ok(KafkaBackend {
            config,
            producer,
            admin,
            spread: spread::Spread::default(),
        })
    }

    /// Partitions for the keyless messages among `messages`, by index.
    async fn keyless_partitions(&self, messages: &[Message]) -> Result<Vec<Option<i32>>> {
        let mut by_topic: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (index, message) in messages.iter().enumerate() {
            if message.key.is_none() {
                by_topic.entry(&message.topic).or_default().push(index);
            }
        }
        let mut partitions = vec![None; messages.len()];
        for (topic, indices) in by_topic {
            if self.spread.partitions(topic).is_none() {
                let count = self.partition_count(topic).await?;
                self.spread.learn(topic, count);
            }
            let plan = self.spread.plan(topic, indices.len());
            for (index, partition) in indices.into_iter().zip(plan) {
                partitions[index] = Some(partition);
            }
        }
        Ok(partitions)
    }

    /// Whether any topic in the cluster matches one of `patterns`.
    async fn any_topic_matches(&self, patterns: &[String]) -> bool {
        let producer = self.producer.clone();
        let timeout = self.config.timeout;
        let metadata = tokio::task::spawn_blocking(move || {
            producer.get().client().fetch_metadata(None, timeout)
        })
        .await;
        match metadata {
            Ok(Ok(metadata)) => metadata
                .topics()
                .iter()
                .any(|t| patterns.iter().any(|p| pattern::matches(p, t.name()))),
            // Unknown: wait as for any subscription.
            _ => true,
        }
    }

    /// How many partitions `topic` has, from the cluster's metadata. A topic
    /// made a moment ago may show none for a while (the broker's metadata
    /// catches up), so it is asked again until `timeout_ms` has passed.
    async fn partition_count(&self, topic: &str) -> Result<i32> {
        let give_up = tokio::time::Instant::now() + self.config.timeout;
        loop {
            let producer = self.producer.clone();
            let timeout = self.config.timeout;
            let name = topic.to_string();
            let metadata = tokio::task::spawn_blocking(move || {
                producer.get().client().fetch_metadata(Some(&name), timeout)
            })
            .await?
            .with_context(|| format!("cannot read the metadata of Kafka topic `{topic}`"))?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len());
            if count > 0 {
                return Ok(i32::try_from(count).unwrap_or(i32::MAX));
            }
            if tokio::time::Instant::now() >= give_up {
                bail!(
                    "Kafka topic `{topic}` has no partitions (still none after {:?})",
                    self.config.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a group member whose first subscription is `first`: its
    /// consumer joins the group on a thread of its own.
    fn start_member(
        &self,
        behaviour: &Behaviour,
        lease: Duration,
        ordered: bool,
        first: u64,
    ) -> Result<Arc<members::Member>> {
        let shared = Arc::new(Shared::default());
        let consumer: BaseConsumer<ConsumerContext> = self
            .consumer_config(behaviour, lease)
            .create_with_context(ConsumerContext::new(shared.clone(), behaviour.clone()))
            .with_context(|| {
                format!("cannot create a Kafka consumer for `{}`", self.config.shown)
            })?;
        let topics: Vec<&str> = behaviour.subscription.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("cannot subscribe to {:?}", behaviour.subscription))?;
        let (commands, received) = std::sync::mpsc::channel();
        let member = Arc::new(members::Member::new(shared.clone(), commands));
        member.attach(first, lease, ordered);
        std::thread::Builder::new()
            .name("sluice-kafka-consumer".into())
            .spawn(move || consumer::run(consumer, shared, received))
            .context("cannot start a Kafka consumer thread")?;
        Ok(member)
    }

    fn consumer_config(&self, behaviour: &Behaviour, lease: Duration) -> ClientConfig {
        let session = self.config.session_timeout(lease);
        let heartbeat = self.config.heartbeat.min(session / 3);
        let mut config = client_config(&self.config);
        config
            .set("group.id", &behaviour.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false")
            .set(
                "auto.offset.reset",
                match behaviour.start {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            )
            .set("session.timeout.ms", session.as_millis().to_string())
            .set(
                "heartbeat.interval.ms",
                heartbeat.as_millis().max(1).to_string(),
            )
            .set(
                "max.poll.interval.ms",
                session
                    .max(Duration::from_secs(300))
                    .as_millis()
                    .to_string(),
            )
            .set(
                "topic.metadata.refresh.interval.ms",
                self.config.metadata_refresh.as_millis().to_string(),
            )
            .set("fetch.wait.max.ms", "100");
        apply_properties(&mut config, &self.config);
        config
    }
}

#[async_trait]
impl Backend for KafkaBackend {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        let config = self.config.clone();
        let producer = self.producer.clone();
        let group_key = group_key.to_string();
        // A monitoring figure: a broker that does not answer soon is
        // reported as unknown rather than holding up the scrape.
        let timeout = self.config.timeout.min(Duration::from_secs(5));
        tokio::task::spawn_blocking(move || {
            lag::backlog(&config, producer.get(), &group_key, timeout)
        })
        .await?
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let topics: BTreeSet<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
        for topic in &topics {
            names::check_topic(topic)?;
        }
        self.admin
            .ensure_topics(&topics.into_iter().collect::<Vec<_>>())
            .await?;
        let keyless = self.keyless_partitions(&messages).await?;
        let producer = self.producer.get();
        let mut acknowledgements = Vec::with_capacity(messages.len());
        for (message, partition) in messages.iter().zip(keyless) {
            let mut record = FutureRecord::<str, [u8]>::to(&message.topic)
                .payload(message.payload.as_slice())
                .headers(wire::headers(message))
                .timestamp(i64::try_from(message.timestamp_ms).unwrap_or(i64::MAX));
            if let Some(key) = &message.key {
                record = record.key(key.as_str());
            }
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            loop {
                match producer.send_result(record) {
                    Ok(acknowledgement) => {
                        acknowledgements.push(acknowledgement);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        return Err(e).with_context(|| {
                            format!("cannot publish to Kafka topic `{}`", message.topic)
                        });
                    }
                }
            }
        }
        // Every record is on its way: awaiting the reports in order costs
        // the slowest one, not one round trip each.
        for (acknowledgement, message) in acknowledgements.into_iter().zip(&messages) {
            match acknowledgement.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(e).with_context(|| {
                        format!("Kafka did not accept a message for `{}`", message.topic)
                    });
                }
                Err(_) => bail!("the Kafka producer went away while publishing"),
            }
        }
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        if options.topics.is_empty() {
            bail!("a subscription needs at least one topic");
        }
        for topic in &options.topics {
            names::check_pattern(topic)?;
        }
        let exact: Vec<&str> = options
            .topics
            .iter()
            .filter(|t| !pattern::is_pattern(t))
            .map(String::as_str)
            .collect();
        self.admin.ensure_topics(&exact).await?;
        let behaviour = Behaviour {
            group_id: names::group_id(&options.group_key()),
            subscription: options
                .topics
                .iter()
                .map(|t| names::subscription(t))
                .collect(),
            start: options.start,
            ephemeral: options.ephemeral,
            commit_interval: self.config.commit_interval,
            buffer: self.config.buffer,
            timeout: self.config.timeout,
        };
        let slot = members::slot(&self.config.bootstrap, &behaviour.group_id);
        let mut current = slot.lock().await;
        let id = subscription::next_id();
        let member = match current.upgrade() {
            Some(member) => {
                member.attach(id, options.lease, options.ordered);
                member
            }
            None => {
                let member = self.start_member(&behaviour, options.lease, options.ordered, id)?;
                *current = Arc::downgrade(&member);
                // librdkafka joins the group only once a pattern matches a topic.
                let will_join = !exact.is_empty() || self.any_topic_matches(&options.topics).await;
                if will_join
                    && !subscription::joined(&member.shared, self.config.join_timeout).await
                {
                    tracing::warn!(
                        group = %behaviour.group_id,
                        "Kafka: no partitions assigned within {:?}; consuming once the group assigns them",
                        self.config.join_timeout
                    );
                }
                member
            }
        };
        drop(current);
        let names = GroupNames {
            group: options.group.clone(),
            group_id: behaviour.group_id.clone(),
        };
        let subscription = KafkaSubscription::new(
            id,
            names,
            options.ephemeral,
            member,
            slot,
            self.admin.clone(),
            self.config.timeout.min(Duration::from_secs(10)) + Duration::from_secs(1),
        );
        Ok(Box::new(subscription))
    }
}

/// Asks for the cluster's metadata, as connecting does; changes nothing.
pub async fn probe(url: &str) -> Result<String> {
    let config = KafkaConfig::parse(url)?;
    config.check_files()?;
    let probed = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || probe_metadata(&config)).await?
    };
    probed.map_err(|unreachable| anyhow::anyhow!(unreachable.explain(&config)))
}

/// Why the cluster's metadata could not be had.
enum Unreachable {
    /// A broker answered and turned this client away (a refused login or
    /// TLS handshake): trying again cannot help, so the wait ends at once.
    Refused(String),
    /// No broker answered within `timeout_ms`; the last error librdkafka
    /// reported, if any.
    NoAnswer(String),
    /// librdkafka would not make a client of these settings.
    Unusable(String),
}

impl Unreachable {
    fn explain(&self, config: &KafkaConfig) -> String {
        match self {
            Unreachable::Refused(reason) => format!(
                "the Kafka broker at `{}` refused this client: {reason}",
                config.shown
            ),
            Unreachable::NoAnswer(reason) => format!(
                "no Kafka broker answered at `{}` within {} ms: {reason}",
                config.shown,
                config.timeout.as_millis()
            ),
            Unreachable::Unusable(reason) => format!(
                "cannot make a Kafka client for `{}`: {reason}",
                config.shown
            ),
        }
    }
}

/// Asks for the cluster's metadata for at most `timeout_ms`, with a client
/// of its own whose context keeps librdkafka's errors, in short tries so
/// that a failed TLS handshake or login ends the wait at once; the error
/// is the broker's reason when librdkafka reported one.
fn probe_metadata(config: &KafkaConfig) -> std::result::Result<String, Unreachable> {
    let mut settings = client_config(config);
    apply_properties(&mut settings, config);
    let probe: rdkafka::producer::BaseProducer<ProbeContext> = settings
        .create_with_context(ProbeContext::default())
        .map_err(|e| Unreachable::Unusable(e.to_string()))?;
    let probe = Detached::new(probe);
    let give_up = std::time::Instant::now() + config.timeout;
    loop {
        let left = give_up.saturating_duration_since(std::time::Instant::now());
        let tried = probe
            .get()
            .client()
            .fetch_metadata(None, left.min(Duration::from_millis(500)));
        let error = match tried {
            Ok(metadata) => {
                return Ok(format!(
                    "{} broker(s), {} topic(s)",
                    metadata.brokers().len(),
                    metadata.topics().len()
                ));
            }
            Err(error) => error,
        };
        // Hands the events librdkafka queued (logs, errors) to the
        // context: each call takes events until its time is up.
        probe.get().poll(Duration::from_millis(100));
        let context = probe.get().context();
        if let Some(reason) = context.refusal() {
            return Err(Unreachable::Refused(reason));
        }
        if std::time::Instant::now() >= give_up {
            return Err(Unreachable::NoAnswer(
                context.last_error().unwrap_or_else(|| error.to_string()),
            ));
        }
    }
}

/// The settings every client shares.
fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.bootstrap)
        .set("client.id", "sluice")
        .set_log_level(RDKafkaLogLevel::Info);
    client
}

fn apply_properties(client: &mut ClientConfig, config: &KafkaConfig) {
    for (name, value) in &config.properties {
        client.set(name, value);
    }
}

/// librdkafka's log, into `tracing`.
pub(crate) fn log_to_tracing(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

/// The context of the producer and the admin client: logs into `tracing`.
#[derive(Default)]
pub struct LogContext;

impl rdkafka::ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_to_tracing(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!("Kafka: {error}: {reason}");
    }
}

/// The context of the client that checks the brokers answer at connect:
/// logs as [`LogContext`], and keeps the last error librdkafka reported,
/// so a connection that fails can say why.
#[derive(Default)]
struct ProbeContext {
    /// The last error, and whether trying again cannot help (a refused
    /// login or TLS handshake).
    last: std::sync::Mutex<Option<(String, bool)>>,
}

impl ProbeContext {
    fn last_error(&self) -> Option<String> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref().map(|(reason, _)| reason.clone())
    }

    /// The reason the broker refused this client, if it did.
    fn refusal(&self) -> Option<String> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(_, refused)| *refused)
            .map(|(reason, _)| reason.clone())
    }
}

impl rdkafka::ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_to_tracing(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!("Kafka: {error}: {reason}");
        let refused = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
            )
        ) || reason.contains("SSL handshake failed");
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((reason.to_string(), refused));
    }
}

impl rdkafka::producer::ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// A librdkafka client dropped on a thread of its own: destroying one can
/// block (flushing, or hanging on a broker that does not answer), and that
/// must not stall the async runtime or the process.
pub struct Detached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Detached<T> {
    pub fn new(client: T) -> Self {
        Detached(Some(client))
    }

    pub fn get(&self) -> &T {
        self.0.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("sluice-kafka-drop".into())
                .spawn(move || drop(client));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting librdkafka refuses is named as such, not taken for a
    /// broker that did not answer.
    #[test]
    fn settings_librdkafka_refuses_are_not_an_unanswered_broker() {
        let config = KafkaConfig::parse("kafka://127.0.0.1:1?rdkafka.no.such.property=1").unwrap();
        let Err(unreachable) = probe_metadata(&config) else {
            panic!("a client was made of an unknown property");
        };
        let said = unreachable.explain(&config);
        assert!(said.starts_with("cannot make a Kafka client for"), "{said}");
        assert!(said.contains("no.such.property"), "{said}");
    }
}
