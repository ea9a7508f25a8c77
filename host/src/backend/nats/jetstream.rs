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
//! patterns gets a message that matches both twice. Ephemeral groups get a
//! consumer that the server also removes by itself after inactivity, and
//! that `close` deletes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::Client;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, FromConsumer, pull};
use async_nats::jetstream::context::{
    ConsumerInfoErrorKind, CreateStreamErrorKind, GetStreamErrorKind,
};
use async_nats::jetstream::stream::Config as StreamConfig;
use async_nats::jetstream::{self, ErrorCode};
use async_trait::async_trait;

use super::core::check_publish_topic;
use super::pull::{JsSubscription, PullTarget};
use super::settings::{SCHEME, Settings};
use super::window::{self, Outgoing, WINDOW};
use super::{ServerUrl, nats_name, split_url};
use crate::backend::{Backend, Capabilities, StartFrom, SubscribeOptions, Subscription, pattern};
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

pub struct JetStreamBackend {
    client: Client,
    js: jetstream::Context,
    server: ServerUrl,
    settings: Settings,
    /// First topic token → the stream that keeps it (default mode only).
    streams: Mutex<HashMap<String, String>>,
}

impl JetStreamBackend {
    pub async fn connect(url: &str) -> Result<Self> {
        let (mut server, pairs) = split_url(url, SCHEME)?;
        let settings = Settings::parse(&mut server, pairs)?;
        let client = server.connect(65_536).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(server.timeout)
            // Room for a few publish calls at once, each with its window.
            .max_ack_inflight(WINDOW * 4)
            .backpressure_on_inflight(true)
            .build(client.clone());
        check_available(&client, &server).await?;
        let backend = JetStreamBackend {
            client,
            js,
            server,
            settings,
            streams: Mutex::new(HashMap::new()),
        };
        if let Some(name) = backend.settings.stream.clone() {
            backend.ensure_named(&name).await?;
        }
        Ok(backend)
    }

    /// Creates the named stream, or updates it to what the URL says.
    async fn ensure_named(&self, name: &str) -> Result<()> {
        match self.js.get_stream(name).await {
            Ok(mut stream) => {
                let current = stream.info().await?.config.clone();
                let mut wanted = current.clone();
                self.settings.apply(&mut wanted);
                if wanted != current {
                    self.js.update_stream(&wanted).await.with_context(|| {
                        format!("{SCHEME} URL: cannot update stream `{name}` to the URL's settings")
                    })?;
                }
                Ok(())
            }
            Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                if self.settings.subjects.is_none() {
                    bail!(
                        "{SCHEME} URL: stream `{name}` does not exist; give subjects= to create it"
                    );
                }
                let mut config = StreamConfig {
                    name: name.to_string(),
                    ..Default::default()
                };
                self.settings.apply(&mut config);
                self.js
                    .create_stream(config)
                    .await
                    .with_context(|| format!("cannot create JetStream stream `{name}`"))?;
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot look up JetStream stream `{name}`")),
        }
    }

    /// The stream that keeps `topic` (a topic or pattern), made if needed.
    async fn stream_for(&self, topic: &str) -> Result<String> {
        if let Some(name) = &self.settings.stream {
            return Ok(name.clone());
        }
        let token = topic.split('.').next().unwrap_or(topic);
        if token == "*" || token == ">" {
            bail!(
                "the pattern `{topic}` starts with a wildcard, so no stream can be chosen for it: \
                 name one in the backend URL with stream= and subjects="
            );
        }
        if let Some(name) = self.streams.lock().unwrap().get(token) {
            return Ok(name.clone());
        }
        let name = self.ensure_token_stream(token).await?;
        self.streams
            .lock()
            .unwrap()
            .insert(token.to_string(), name.clone());
        Ok(name)
    }

    async fn ensure_token_stream(&self, token: &str) -> Result<String> {
        let name = if token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            format!("{}_{token}", self.settings.prefix)
        } else {
            nats_name(&format!("{}_{token}", self.settings.prefix), token)
        };
        let mut config = StreamConfig {
            name: name.clone(),
            subjects: vec![token.to_string(), format!("{token}.>")],
            ..Default::default()
        };
        self.settings.apply(&mut config);
        let error = match self.js.create_stream(config).await {
            Ok(_) => return Ok(name),
            Err(e) => e,
        };
        let code = match error.kind() {
            CreateStreamErrorKind::JetStream(ref j) => Some(j.error_code()),
            _ => None,
        };
        if code == Some(ErrorCode::STREAM_NAME_EXIST) {
            // It exists with other settings (someone tuned it): use it as it is.
            return Ok(name);
        }
        if code == Some(ErrorCode::STREAM_SUBJECT_OVERLAP) {
            // Another stream already keeps this token's topics.
            if let Ok(other) = self.js.stream_by_subject(format!("{token}.>")).await {
                return Ok(other);
            }
            if let Ok(other) = self.js.stream_by_subject(token).await {
                return Ok(other);
            }
        }
        Err(error).with_context(|| {
            format!("cannot create JetStream stream `{name}` for the topics `{token}.>`")
        })
    }
}

#[async_trait]
impl Backend for JetStreamBackend {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
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
        }
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        let mut checked: HashSet<&str> = HashSet::new();
        for message in &messages {
            if checked.insert(&message.topic) {
                check_publish_topic(&message.topic)?;
                self.stream_for(&message.topic).await?;
            }
        }
        drop(checked);
        let outgoing: Vec<Outgoing> = messages.into_iter().map(Outgoing::new).collect();
        let mut failed = window::publish(&self.client, &self.js, &outgoing).await;
        if failed.iter().any(|f| f.no_stream) && self.settings.stream.is_none() {
            // A stream deleted since it was made here: make it again, once.
            // Republishing the ones that failed is safe: ids deduplicate.
            let again: Vec<Outgoing> = failed.iter().map(|f| outgoing[f.index].clone()).collect();
            self.streams.lock().unwrap().clear();
            for message in &again {
                self.stream_for(message.subject.as_str()).await?;
            }
            let indices: Vec<usize> = failed.iter().map(|f| f.index).collect();
            failed = window::publish(&self.client, &self.js, &again).await;
            for failure in &mut failed {
                failure.index = indices[failure.index];
            }
        }
        if let Some(failure) = failed.into_iter().next() {
            let topic = outgoing[failure.index].subject.as_str();
            if failure.no_stream {
                bail!(
                    "no JetStream stream keeps the topic `{topic}`{}",
                    match &self.settings.stream {
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
            let stream = self.stream_for(topic).await?;
            let name = nats_name(&options.group, &format!("{key}\n{topic}"));
            self.ensure_consumer(&stream, &name, topic, &options)
                .await?;
            targets.push(PullTarget {
                stream,
                consumer: name,
            });
        }
        let subscription = JsSubscription::start(
            self.client.clone(),
            self.js.clone(),
            self.server.clone(),
            key,
            targets,
            options.lease,
            options.ephemeral,
            self.settings.progress,
        )
        .await?;
        Ok(Box::new(subscription))
    }
}

impl JetStreamBackend {
    /// Makes the group's consumer for one topic unless it exists; the
    /// group's first subscription decides where it starts.
    async fn ensure_consumer(
        &self,
        stream: &str,
        name: &str,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<()> {
        let handle = self.js.get_stream_no_info(stream).await?;
        match handle.consumer_info(name).await {
            Ok(info) => {
                if info.config.ack_wait != options.lease {
                    self.change_lease(stream, name, info.config, options.lease)
                        .await;
                }
                return Ok(());
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot look up JetStream consumer `{name}` on stream `{stream}`")
                });
            }
        }
        let config = pull::Config {
            durable_name: Some(name.to_string()),
            description: Some(format!("sluice group {} on {topic}", options.group)),
            deliver_policy: match options.start {
                StartFrom::Earliest => DeliverPolicy::All,
                StartFrom::Latest => DeliverPolicy::New,
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.lease,
            max_deliver: -1,
            filter_subject: topic.to_string(),
            max_ack_pending: self.settings.max_ack_pending,
            // An ephemeral group left behind by a crash goes away by itself.
            inactive_threshold: if options.ephemeral {
                (options.lease * 2).max(Duration::from_secs(300))
            } else {
                Duration::ZERO
            },
            ..Default::default()
        };
        match self.js.create_consumer_on_stream(config, stream).await {
            Ok(_) => Ok(()),
            // Another member made it first: theirs decides.
            Err(_) if handle.consumer_info(name).await.is_ok() => Ok(()),
            Err(e) => Err(e).with_context(|| {
                format!("cannot create JetStream consumer for `{topic}` on stream `{stream}`")
            }),
        }
    }
}

impl JetStreamBackend {
    /// A later subscription with another lease moves the group to it;
    /// members with the old lease keep working, so a failure only warns.
    async fn change_lease(
        &self,
        stream: &str,
        name: &str,
        current: jetstream::consumer::Config,
        lease: Duration,
    ) {
        let result = match pull::Config::try_from_consumer_config(current) {
            Ok(config) => self
                .js
                .create_consumer_on_stream(
                    pull::Config {
                        ack_wait: lease,
                        ..config
                    },
                    stream,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(
                consumer = name,
                "could not change the lease (AckWait) of a JetStream consumer: {e}"
            );
        }
    }
}
