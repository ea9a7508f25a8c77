//! `sqs://`: a queue per topic and group, and publishers that send each
//! message to every group queue of its topic.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};

use super::codec::{Encoded, encode};
use super::config::SqsConfig;
use super::directory::Directory;
use super::names::Names;
use super::send::{Sent, batches, send_batch};
use super::subscription::{QueueSource, Restore, SqsSubscription, SubscriptionSpec, Teardown};
use super::{
    GroupQueues, SQS_CAPABILITIES, by_topic, client, directory, group_queue, queues,
    subscribed_topics,
};
use crate::backend::{Backend, Capabilities, SubscribeOptions, Subscription};
use crate::message::Message;

pub(crate) const SCHEME: &str = "sqs";
/// Batch requests of one publish under way at once.
const PARALLEL_SENDS: usize = 16;

/// Plain SQS.
pub struct SqsBackend {
    sqs: Client,
    config: SqsConfig,
    names: Names,
    directory: Arc<Directory>,
    groups: Arc<GroupQueues>,
}

impl SqsBackend {
    /// Connects and checks that SQS answers (a queue listing).
    pub async fn connect(url: &str) -> Result<Self> {
        let config = SqsConfig::parse(url, SCHEME)?;
        let sdk = client::sdk_config(&config).await?;
        let sqs = Client::new(&sdk);
        let names = Names::new(&config.prefix);
        queues::ping(&sqs, &config.prefix)
            .await
            .with_context(|| format!("cannot reach SQS at `{}`", config.shown))?;
        let directory = directory(&config, &sdk, &sqs, &names);
        Ok(SqsBackend {
            sqs,
            config,
            names,
            directory,
            groups: Arc::default(),
        })
    }

    /// Sends the run `run` of `out` (one batch) to one group queue of
    /// `topic`.
    async fn send_run(
        &self,
        topic: &str,
        url: &str,
        out: &Outgoing<'_>,
        run: Range<usize>,
    ) -> Result<()> {
        let sent = send_batch(
            &self.sqs,
            url,
            &out.encoded[run.clone()],
            &out.ids[run.clone()],
            &out.keys[run],
        )
        .await?;
        if sent == Sent::Gone {
            tracing::info!(
                topic,
                queue = url,
                "a group's queue is gone; no longer publishing to it"
            );
            self.directory.forget(topic, url);
        }
        Ok(())
    }

    /// Sends every run of `out` to the queue at `url`, one after another.
    async fn send_in_order(
        &self,
        topic: &str,
        url: &str,
        out: &Outgoing<'_>,
        runs: &[Range<usize>],
    ) -> Result<()> {
        for run in runs {
            self.send_run(topic, url, out, run.clone()).await?;
        }
        Ok(())
    }

    /// Sends `messages` (all of `topic`) to every group queue of the topic.
    async fn publish_topic(&self, topic: &str, messages: &[&Message]) -> Result<()> {
        let out = Outgoing {
            encoded: messages.iter().map(|m| encode(m)).collect::<Result<_>>()?,
            ids: messages.iter().map(|m| m.id.as_str()).collect(),
            keys: messages.iter().map(|m| m.key.as_deref()).collect(),
        };
        let urls = self.directory.queues_of(topic).await?;
        if urls.is_empty() {
            tracing::debug!(
                topic,
                "no group has a queue for this topic; messages dropped"
            );
            return Ok(());
        }
        let runs = batches(&out.encoded);
        // A FIFO queue keeps the order its batches arrive in, so its
        // batches go one after another; other queues take them at once.
        let mut sends: Vec<BoxFuture<'_, Result<()>>> = Vec::new();
        for url in &urls {
            if Names::is_fifo(url) {
                sends.push(Box::pin(self.send_in_order(topic, url, &out, &runs)));
            } else {
                for run in &runs {
                    sends.push(Box::pin(self.send_run(topic, url, &out, run.clone())));
                }
            }
        }
        futures::stream::iter(sends)
            .buffer_unordered(PARALLEL_SENDS)
            .try_collect::<()>()
            .await
    }
}

/// A publish's messages for one topic: encoded, with their ids and keys.
struct Outgoing<'a> {
    encoded: Vec<Encoded>,
    ids: Vec<&'a str>,
    keys: Vec<Option<&'a str>>,
}

#[async_trait]
impl Backend for SqsBackend {
    fn kind(&self) -> &'static str {
        SCHEME
    }

    fn capabilities(&self) -> Capabilities {
        SQS_CAPABILITIES
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        futures::future::try_join_all(
            by_topic(&messages)
                .iter()
                .map(|(topic, messages)| self.publish_topic(topic, messages)),
        )
        .await?;
        Ok(())
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        let topics = subscribed_topics(&options, SCHEME)?;
        let group_key = options.group_key();
        let mut sources = Vec::new();
        let mut names = Vec::new();
        for topic in topics {
            let (name, pattern) =
                group_queue(&self.names, &topic, &options, &group_key, options.ordered);
            let url = queues::ensure_group_queue(
                &self.sqs,
                &self.config,
                &name,
                pattern.as_deref(),
                options.ephemeral,
            )
            .await?;
            self.directory.register(&topic, &url);
            sources.push(QueueSource { url, topic });
            names.push((name, pattern));
        }
        let restore: Restore = {
            let (sqs, config, directory) = (
                self.sqs.clone(),
                self.config.clone(),
                self.directory.clone(),
            );
            let topics: Vec<String> = sources.iter().map(|s| s.topic.clone()).collect();
            let ephemeral = options.ephemeral;
            Box::new(move |queue| {
                let (sqs, config, directory) = (sqs.clone(), config.clone(), directory.clone());
                let (topic, (name, pattern)) = (topics[queue].clone(), names[queue].clone());
                Box::pin(async move {
                    let url = queues::ensure_group_queue(
                        &sqs,
                        &config,
                        &name,
                        pattern.as_deref(),
                        ephemeral,
                    )
                    .await?;
                    // Publishers of this process send to it again at once.
                    directory.register(&topic, &url);
                    Ok(url)
                })
            })
        };
        self.groups.insert(
            group_key.clone(),
            sources.iter().map(|s| s.url.clone()).collect(),
        );
        let teardown: Option<Teardown> = options.ephemeral.then(|| {
            let (sqs, directory, groups) = (
                self.sqs.clone(),
                self.directory.clone(),
                self.groups.clone(),
            );
            let sources = sources.clone();
            Box::new(move || {
                Box::pin(async move {
                    groups.remove(&group_key);
                    for source in &sources {
                        directory.forget(&source.topic, &source.url);
                        queues::delete(&sqs, &source.url).await?;
                    }
                    Ok(())
                }) as futures::future::BoxFuture<'static, Result<()>>
            }) as Teardown
        });
        Ok(Box::new(SqsSubscription::start(
            self.sqs.clone(),
            SubscriptionSpec {
                group: options.group,
                queues: sources,
                lease: options.lease,
                ack_batch: self.config.ack_batch,
                heartbeat: self.config.heartbeat,
                wait_s: self.config.wait_s,
                ordered: options.ordered,
                teardown,
                restore,
            },
        )))
    }

    async fn pending(&self, group_key: &str) -> Result<Option<u64>> {
        self.groups.pending(&self.sqs, group_key).await
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        self.groups.backlog(&self.sqs, group_key).await
    }
}
