//! The NATS JetStream backend (`jetstream://`): messages kept in streams,
//! a durable pull consumer per consumer group, at-least-once.
//!
//! URL: `jetstream://[user:pass@]host:port[,host:port…][?param=value&…]`:
//!
//! | parameter | meaning |
//! |---|---|
//! | `stream` | use this one stream for every topic (created or updated from the parameters below) |
//! | `subjects` | with `stream`: its subjects, comma-separated (`orders.>,jobs`) |
//! | `stream_prefix` | without `stream`: prefix of the streams made per first topic token (default `SLUICE`) |
//! | `retention` | `limits` (default), `workqueue` (one group per subject), `interest` (no history for late groups) |
//! | `storage` | `file` (default) or `memory` |
//! | `replicas`, `max_age_ms`, `max_bytes`, `max_msgs`, `duplicate_window_ms` | stream limits |
//! | `max_ack_pending` | unacked deliveries a group may hold (default 1000) |
//! | `progress` | `true` (default): keep held deliveries alive with in-progress acks, see `pull.rs` |
//! | `shards` | keep each topic in this many key shards (1 to 1024), so ordered groups keep each key's order, see `shards.rs`; fixed when a stream is made |
//! | `name`, `tls`, `timeout_ms` | connection name, require TLS, API and publish timeout (default 10000) |
//!
//! Streams: without `stream`, a topic is kept in the stream
//! `<stream_prefix>_<first token>` with the subjects `<token>` and
//! `<token>.>`, created on first use with the parameters above (an existing
//! stream is used as it is). So `orders.eu`, `orders.us.paid` and the
//! dead-letter topic `orders.dead-letter` share one stream, and a pattern
//! whose first token is a wildcard (`*.paid`, `>`) needs `stream` to say
//! where to look. If another stream already captures the topic's token, it
//! is used instead.
//!
//! Publishing sends every message without waiting for the server and
//! awaits the acknowledgements together (a sliding window of a few hundred
//! in flight, see `window.rs`), so a returned publish is stored.
//! `Nats-Msg-Id` is the Sluice id: a publish retried after a lost
//! acknowledgement is stored once (within the stream's duplicate window,
//! two minutes by default).
//!
//! Consumers: one durable pull consumer per group and topic, because NATS
//! 2.9 allows one filter subject per consumer. Its name is derived from
//! [`SubscribeOptions::group_key`]; explicit acks, `AckWait` = the
//! subscription's lease, unlimited deliveries (the host's retry policy
//! decides, counting from the server's delivery count), deliver-all for
//! `earliest` and deliver-new for `latest`. A subscription to overlapping
//! patterns gets a message that matches both twice. With `shards`, an
//! ordered group has a consumer per shard instead, each read by the member
//! that leases it (see `shards.rs`, `leases.rs` and `turns.rs`); the leases
//! are kept in the key-value bucket `sluice_shard_leases`, made on first
//! use. Ephemeral groups get a
//! consumer that the server also removes by itself after inactivity, and
//! that `close` deletes.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use async_nats::Client;
use async_nats::jetstream;
use async_trait::async_trait;

use super::core::check_publish_topic;
use super::leases::ShardLeases;
use super::provision::Provision;
use super::pull::{JsSubscription, MAX_PULL};
use super::settings::{SCHEME, Settings};
use super::window::{self, Outgoing, WINDOW};
use super::{ServerUrl, shards, split_url};
use crate::backend::{Backend, Capabilities, SubscribeOptions, Subscription, pattern};
use crate::message::Message;

/// Asks for the account's JetStream info, read loosely: the client's own
/// `query_account` expects fields that NATS 2.9 does not send.
async fn check_available(client: &Client, server: &ServerUrl) -> Result<()> {
    let unavailable = || {
        format!(
            "JetStream is not available at `{}` (is nats-server running with -js?)",
            server.shown()
        )
    };
    let reply = client
        .request("$JS.API.INFO", Vec::new().into())
        .await
        .with_context(unavailable)?;
    let info: serde_json::Value =
        serde_json::from_slice(&reply.payload).with_context(unavailable)?;
    if let Some(error) = info.get("error") {
        bail!("{}: {error}", unavailable());
    }
    Ok(())
}

/// Connects, checks that JetStream answers and, for a URL that names one
/// stream for every topic, whether it exists and keeps the shards the URL
/// says; changes nothing.
pub async fn probe(url: &str) -> Result<String> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    let (server, settings) = JetStreamBackend::parse(url)?;
    let client = server.connect(1).await?;
    check_available(&client, &server).await?;
    let found = format!("NATS {} with JetStream", client.server_info().version);
    let Some(name) = &settings.stream else {
        return Ok(found);
    };
    match jetstream::new(client).get_stream(name).await {
        Ok(stream) => {
            let description = stream.cached_info().config.description.as_deref();
            shards::check_stream(name, description, settings.shards)?;
            Ok(format!("{found}, stream `{name}` exists"))
        }
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(ref js)
                if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            anyhow::ensure!(
                settings.subjects.is_some(),
                "{found}, but stream `{name}` does not exist; give subjects= to create it"
            );
            Ok(format!(
                "{found}, stream `{name}` does not exist yet; the first run makes it"
            ))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read stream `{name}`")),
    }
}

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: true,
    history: true,
    consumer_groups: true,
    // A nack lets later messages pass, and members share a consumer.
    ordered_per_key: false,
    native_delay: true,
    lease: true,
    wildcards: true,
    at_least_once: true,
    // The server takes an ack for whichever delivery of the message
    // is current (see `pull.rs`).
    lease_checked: false,
    // The consumers' `num_pending`.
    backlog: true,
    key_affinity: false,
};

/// What a JetStream URL's backend guarantees: with `shards`, order per key.
pub fn capabilities_for(url: &str) -> Capabilities {
    match JetStreamBackend::parse(url) {
        Ok((_, settings)) if settings.shards.is_some() => SHARDED_CAPABILITIES,
        _ => CAPABILITIES,
    }
}

/// What this backend guarantees with `shards=N`: an ordered group takes a
/// key's messages one at a time (see `shards.rs`).
pub const SHARDED_CAPABILITIES: Capabilities = Capabilities {
    ordered_per_key: true,
    key_affinity: true,
    ..CAPABILITIES
};

pub struct JetStreamBackend {
    client: Client,
    server: ServerUrl,
    provision: Arc<Provision>,
}

impl JetStreamBackend {
    /// The URL's server and stream settings, every parameter checked.
    pub(crate) fn parse(url: &str) -> Result<(ServerUrl, Settings)> {
        let (mut server, pairs) = split_url(url, SCHEME)?;
        let settings = Settings::parse(&mut server, pairs)?;
        Ok((server, settings))
    }

    pub async fn connect(url: &str) -> Result<Self> {
        let (server, settings) = Self::parse(url)?;
        let client = server.connect(65_536).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(server.timeout)
            // Room for a few publish calls at once, each with its window.
            .max_ack_inflight(WINDOW * 4)
            .backpressure_on_inflight(true)
            .build(client.clone());
        check_available(&client, &server).await?;
        let provision = Arc::new(Provision::new(js, settings));
        if let Some(name) = provision.settings.stream.clone() {
            provision.ensure_named(&name).await?;
        }
        Ok(JetStreamBackend {
            client,
            server,
            provision,
        })
    }
}

#[async_trait]
impl Backend for JetStreamBackend {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn capabilities(&self) -> Capabilities {
        match self.provision.settings.shards {
            Some(_) => SHARDED_CAPABILITIES,
            None => CAPABILITIES,
        }
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        self.provision.backlog(group_key).await
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        let mut checked: HashSet<&str> = HashSet::new();
        for message in &messages {
            if checked.insert(&message.topic) {
                check_publish_topic(&message.topic)?;
                self.provision.stream_for(&message.topic).await?;
            }
        }
        drop(checked);
        let shards = self.provision.settings.shards;
        let outgoing: Vec<Outgoing> = messages
            .into_iter()
            .map(|message| Outgoing::new(message, shards))
            .collect();
        let js = &self.provision.js;
        let mut failed = window::publish(&self.client, js, &outgoing).await;
        if failed.iter().any(|f| f.no_stream) && self.provision.settings.stream.is_none() {
            // A stream deleted since it was made here: make it again, once.
            // Republishing the ones that failed is safe: ids deduplicate.
            let again: Vec<Outgoing> = failed.iter().map(|f| outgoing[f.index].clone()).collect();
            self.provision.forget_streams();
            for message in &again {
                self.provision.stream_for(message.subject.as_str()).await?;
            }
            let indices: Vec<usize> = failed.iter().map(|f| f.index).collect();
            failed = window::publish(&self.client, js, &again).await;
            for failure in &mut failed {
                failure.index = indices[failure.index];
            }
        }
        if let Some(failure) = failed.into_iter().next() {
            let topic = outgoing[failure.index].topic(shards);
            if failure.no_stream {
                bail!(
                    "no JetStream stream keeps the topic `{topic}`{}",
                    match &self.provision.settings.stream {
                        Some(name) => format!(" (stream `{name}` does not capture it)"),
                        None => String::new(),
                    }
                );
            }
            return Err(failure
                .error
                .context(format!("JetStream publish to `{topic}`")));
        }
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        let mut topics = options.topics.clone();
        topics.sort();
        topics.dedup();
        for topic in &topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        let key = options.group_key();
        let mut targets = Vec::with_capacity(topics.len());
        for topic in &topics {
            let stream = self.provision.stream_for(topic).await?;
            for target in self.provision.targets(&stream, &key, topic, &options)? {
                self.provision
                    .ensure_consumer(&stream, &target, &options)
                    .await?;
                targets.push(target);
            }
        }
        self.provision.note_group(
            key,
            targets
                .iter()
                .map(|t| (t.stream.clone(), t.consumer.clone()))
                .collect(),
        );
        let leases = match targets.iter().any(|t| t.leased) {
            true => Some(
                ShardLeases::start(
                    &self.provision.js,
                    &options.group_key(),
                    targets
                        .iter()
                        .map(|t| (t.consumer.clone(), t.leased))
                        .collect(),
                    options.lease,
                    MAX_PULL,
                )
                .await?,
            ),
            false => None,
        };
        let subscription = JsSubscription::start(
            self.client.clone(),
            self.provision.clone(),
            self.server.clone(),
            targets,
            options,
            leases,
        )
        .await?;
        Ok(Box::new(subscription))
    }
}
