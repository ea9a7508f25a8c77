//! What the JetStream backend makes on the server: the streams that keep
//! topics and the durable consumers of groups. Shared by the backend and
//! its subscriptions, so that a subscription whose consumer is gone (deleted
//! by an operator, or lost with the server's store) can make it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, FromConsumer, pull};
use async_nats::jetstream::context::{
    ConsumerInfoErrorKind, CreateStreamErrorKind, GetStreamErrorKind,
};
use async_nats::jetstream::stream::Config as StreamConfig;
use async_nats::jetstream::{self, ErrorCode};

use super::nats_name;
use super::pull::PullTarget;
use super::settings::{SCHEME, Settings};
use super::shards::{self, Shard};
use crate::backend::{StartFrom, SubscribeOptions};

pub(crate) struct Provision {
    pub js: jetstream::Context,
    pub settings: Settings,
    /// First topic token → the stream that keeps it (default mode only).
    streams: Mutex<HashMap<String, String>>,
    /// Group key → the (stream, consumer) pairs its subscriptions here
    /// pull from, for the backlog.
    groups: Mutex<HashMap<String, Vec<(String, String)>>>,
}

impl Provision {
    pub fn new(js: jetstream::Context, settings: Settings) -> Self {
        Provision {
            js,
            settings,
            streams: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Records the consumers a group pulls from.
    pub fn note_group(&self, group_key: String, consumers: Vec<(String, String)>) {
        self.groups.lock().unwrap().insert(group_key, consumers);
    }

    /// Messages of the group's streams not yet delivered to it: the sum of
    /// its consumers' `num_pending`. `None` for a group not subscribed
    /// through this handle.
    pub async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        let consumers = self.groups.lock().unwrap().get(group_key).cloned();
        let Some(consumers) = consumers else {
            return Ok(None);
        };
        let mut total = 0;
        for (stream, consumer) in consumers {
            let info = self
                .js
                .get_stream_no_info(&stream)
                .await?
                .consumer_info(&consumer)
                .await
                .with_context(|| {
                    format!("cannot look up JetStream consumer `{consumer}` on stream `{stream}`")
                })?;
            total += info.num_pending;
        }
        Ok(Some(total))
    }

    /// Forgets which streams exist, so the next use checks (and makes them
    /// again if they were deleted).
    pub fn forget_streams(&self) {
        self.streams.lock().unwrap().clear();
    }

    /// Creates the named stream, or updates it to what the URL says.
    pub async fn ensure_named(&self, name: &str) -> Result<()> {
        match self.js.get_stream(name).await {
            Ok(mut stream) => {
                let current = stream.info().await?.config.clone();
                shards::check_stream(name, current.description.as_deref(), self.settings.shards)?;
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
                    description: self.settings.shards.map(shards::describe),
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
    pub async fn stream_for(&self, topic: &str) -> Result<String> {
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
        let subjects = [token.to_string(), format!("{token}.>")]
            .map(|subject| self.settings.stored_subject(&subject));
        let mut config = StreamConfig {
            name: name.clone(),
            subjects: subjects.to_vec(),
            description: self.settings.shards.map(shards::describe),
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
            self.check_shards(&name).await?;
            return Ok(name);
        }
        if code == Some(ErrorCode::STREAM_SUBJECT_OVERLAP) {
            // Another stream already keeps this token's topics.
            for subject in subjects.iter().rev() {
                if let Ok(other) = self.js.stream_by_subject(subject).await {
                    self.check_shards(&other).await?;
                    return Ok(other);
                }
            }
        }
        Err(error).with_context(|| {
            format!("cannot create JetStream stream `{name}` for the topics `{token}.>`")
        })
    }

    /// Refuses an existing stream made with other shards than the URL's.
    async fn check_shards(&self, name: &str) -> Result<()> {
        let mut stream = self
            .js
            .get_stream(name)
            .await
            .with_context(|| format!("cannot look up JetStream stream `{name}`"))?;
        let info = stream.info().await?;
        shards::check_stream(
            name,
            info.config.description.as_deref(),
            self.settings.shards,
        )
    }

    /// The consumers a group reads `topic` through: one, or for an ordered
    /// group on sharded streams one per shard.
    pub fn targets(
        &self,
        stream: &str,
        group_key: &str,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<Vec<PullTarget>> {
        let target = |filter: String, shard: Option<Shard>| {
            let identity = match shard {
                Some(shard) => format!("{group_key}\n{topic}\n{shard:?}"),
                None => format!("{group_key}\n{topic}"),
            };
            PullTarget {
                stream: stream.to_string(),
                consumer: nats_name(&options.group, &identity),
                topic: topic.to_string(),
                filter,
                leased: matches!(shard, Some(Shard::Keyed(_))),
            }
        };
        Ok(match self.settings.shards {
            None => vec![target(topic.to_string(), None)],
            Some(_) if !options.ordered => vec![target(shards::filter(topic, None)?, None)],
            Some(count) => Shard::all(count)
                .map(|shard| Ok(target(shards::filter(topic, Some(shard))?, Some(shard))))
                .collect::<Result<_>>()?,
        })
    }

    /// Makes the stream and the group's consumer for one topic again, after
    /// the server lost them; answers the stream that keeps the topic now.
    pub async fn restore(&self, target: &PullTarget, options: &SubscribeOptions) -> Result<String> {
        self.forget_streams();
        if let Some(name) = &self.settings.stream {
            self.ensure_named(name).await?;
        }
        let stream = self.stream_for(&target.topic).await?;
        self.ensure_consumer(&stream, target, options).await?;
        Ok(stream)
    }

    /// Whether the group's consumer still exists on the server; an error
    /// when the server cannot say (it is down or restarting).
    pub async fn consumer_exists(&self, stream: &str, consumer: &str) -> Result<bool> {
        let handle = self.js.get_stream_no_info(stream).await?;
        match handle.consumer_info(consumer).await {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| {
                format!("cannot look up JetStream consumer `{consumer}` on stream `{stream}`")
            }),
        }
    }

    /// Makes the group's consumer for one target unless it exists; the
    /// group's first subscription decides where it starts.
    pub async fn ensure_consumer(
        &self,
        stream: &str,
        target: &PullTarget,
        options: &SubscribeOptions,
    ) -> Result<()> {
        let name = target.consumer.as_str();
        let topic = target.topic.as_str();
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
            description: Some(format!(
                "sluice group {} on {topic}{}",
                options.group,
                if target.filter == topic {
                    String::new()
                } else {
                    format!(" ({})", target.filter)
                }
            )),
            deliver_policy: match options.start {
                StartFrom::Earliest => DeliverPolicy::All,
                StartFrom::Latest => DeliverPolicy::New,
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.lease,
            max_deliver: -1,
            filter_subject: target.filter.clone(),
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
