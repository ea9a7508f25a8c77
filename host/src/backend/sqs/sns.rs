//! `sns+sqs://`: an SNS topic per topic, and a queue per topic and group
//! subscribed to it with raw delivery (without it SNS wraps each body in a
//! JSON envelope). Each queue's policy lets only its topic send to it.
//!
//! SNS has no topic patterns, so a group's queue for a pattern is
//! subscribed by publishers: before publishing to a topic, a publisher
//! subscribes the pattern queues whose pattern matches it (found through
//! the [`Directory`]) to the topic's SNS topic, once each. Such a queue's
//! policy lets every SNS topic of the deployment (its prefix) send to it.
//! Those subscriptions outlive an ephemeral group's queue; SNS then fails
//! to deliver to it, which costs nothing but the attempt.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use async_trait::async_trait;
use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sqs::types::QueueAttributeName;
use futures::{StreamExt, TryStreamExt};

use super::client::error_code;
use super::codec::{Encoded, META_ATTRIBUTE, encode};
use super::config::SqsConfig;
use super::directory::Directory;
use super::names::{Names, queue_name_of};
use super::send::{EntryFailure, Sent, batches, with_entry_retries};
use super::subscription::{QueueSource, Restore, SqsSubscription, SubscriptionSpec, Teardown};
use super::{
    CAPABILITIES, GroupQueues, by_topic, client, directory, group_queue, queues, subscribed_topics,
};
use crate::backend::{Backend, Capabilities, SubscribeOptions, Subscription};
use crate::message::Message;

pub(crate) const SCHEME: &str = "sns+sqs";
/// PublishBatch requests of one publish under way at once.
const PARALLEL_SENDS: usize = 16;

/// SNS fan-out to SQS. Clones share the topic cache (a subscription keeps
/// one, to make its queue again).
#[derive(Clone)]
pub struct SnsSqsBackend {
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    config: SqsConfig,
    names: Names,
    /// Topic ARNs by Sluice topic.
    topics: Arc<Mutex<HashMap<String, String>>>,
    /// The pattern queues of the deployment.
    directory: Arc<Directory>,
    /// Pattern queues subscribed by this handle, by SNS topic ARN.
    connected: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    groups: Arc<GroupQueues>,
}

impl SnsSqsBackend {
    /// Connects and checks that SQS and SNS answer.
    pub async fn connect(url: &str) -> Result<Self> {
        let config = SqsConfig::parse(url, SCHEME)?;
        let sdk = client::sdk_config(&config).await?;
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let sns = aws_sdk_sns::Client::new(&sdk);
        queues::ping(&sqs, &config.prefix)
            .await
            .with_context(|| format!("cannot reach SQS at `{}`", config.shown))?;
        sns.list_topics()
            .send()
            .await
            .context("SNS ListTopics")
            .with_context(|| format!("cannot reach SNS at `{}`", config.shown))?;
        let names = Names::new(&config.prefix);
        Ok(SnsSqsBackend {
            directory: directory(&config, &sdk, &sqs, &names),
            names,
            sqs,
            sns,
            config,
            topics: Arc::default(),
            connected: Arc::default(),
            groups: Arc::default(),
        })
    }

    /// The ARN of `topic`'s SNS topic, created if need be (CreateTopic
    /// returns the existing one).
    async fn topic_arn(&self, topic: &str) -> Result<String> {
        if let Some(arn) = self.topics.lock().unwrap().get(topic) {
            return Ok(arn.clone());
        }
        let name = self.names.sns_topic(topic);
        let arn = self
            .sns
            .create_topic()
            .name(&name)
            .send()
            .await
            .with_context(|| format!("SNS CreateTopic `{name}`"))?
            .topic_arn
            .with_context(|| format!("SNS returned no ARN for topic `{name}`"))?;
        self.topics
            .lock()
            .unwrap()
            .insert(topic.to_string(), arn.clone());
        Ok(arn)
    }

    /// Lets SNS topics send to the queue at `url`: the one topic
    /// `topic_arn`, or (`None`, for a pattern queue) every topic of the
    /// deployment. Returns the queue's ARN.
    async fn allow_senders(&self, url: &str, topic_arn: Option<&str>) -> Result<String> {
        let queue_arn = queues::queue_arn(&self.sqs, url).await?;
        let condition = match topic_arn {
            Some(arn) => serde_json::json!({ "ArnEquals": { "aws:SourceArn": arn } }),
            None => serde_json::json!({
                "ArnLike": { "aws:SourceArn": self.deployment_topics(&queue_arn) }
            }),
        };
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "sluice-sns-fan-out",
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": condition,
            }],
        });
        self.sqs
            .set_queue_attributes()
            .queue_url(url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .with_context(|| {
                format!(
                    "SQS SetQueueAttributes (policy) of `{}`",
                    queue_name_of(url)
                )
            })?;
        Ok(queue_arn)
    }

    /// The ARN pattern of every SNS topic of the deployment, in the
    /// partition, region and account of the queue `queue_arn`.
    fn deployment_topics(&self, queue_arn: &str) -> String {
        let parts: Vec<&str> = queue_arn.splitn(6, ':').collect();
        let (partition, region, account) = match parts.as_slice() {
            [_, partition, _, region, account, _] => (*partition, *region, *account),
            _ => ("*", "*", "*"),
        };
        format!(
            "arn:{partition}:sns:{region}:{account}:{}*",
            self.config.prefix
        )
    }

    /// Subscribes the queue `queue_arn` to the SNS topic `topic_arn`
    /// (SNS returns the subscription that exists); returns the
    /// subscription's ARN.
    async fn subscribe_queue(&self, topic_arn: &str, queue_arn: &str) -> Result<String> {
        let out = self
            .sns
            .subscribe()
            .topic_arn(topic_arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .with_context(|| format!("SNS Subscribe of `{queue_arn}` to `{topic_arn}`"))?;
        out.subscription_arn
            .with_context(|| format!("SNS returned no subscription ARN for `{queue_arn}`"))
    }

    /// Subscribes the queue at `url` to the SNS topic `topic_arn` alone;
    /// returns the subscription's ARN.
    async fn connect_queue(&self, topic_arn: &str, url: &str) -> Result<String> {
        let queue_arn = self.allow_senders(url, Some(topic_arn)).await?;
        self.subscribe_queue(topic_arn, &queue_arn).await
    }

    /// Makes a group's queue `name` for `topic` (tagged with `pattern` for a
    /// pattern) and lets SNS deliver to it: subscribed to the topic's SNS
    /// topic, or, for a pattern, open to the deployment's topics and made
    /// known to this process's publishers. Returns the queue's URL and the
    /// subscription made.
    async fn set_up_queue(
        &self,
        topic: &str,
        (name, pattern): &(String, Option<String>),
        ephemeral: bool,
    ) -> Result<(String, Option<String>)> {
        let url = queues::ensure_group_queue(
            &self.sqs,
            &self.config,
            name,
            pattern.as_deref(),
            ephemeral,
        )
        .await?;
        if pattern.is_none() {
            let topic_arn = self.topic_arn(topic).await?;
            let subscription = self.connect_queue(&topic_arn, &url).await?;
            return Ok((url, Some(subscription)));
        }
        self.allow_senders(&url, None).await?;
        // A queue made again is subscribed again.
        for known in self.connected.lock().unwrap().values_mut() {
            known.remove(&url);
        }
        self.directory.register(topic, &url);
        Ok((url, None))
    }

    /// Subscribes the pattern queues that match `topic` and are not yet
    /// subscribed to its SNS topic `topic_arn`.
    async fn connect_pattern_queues(&self, topic: &str, topic_arn: &str) -> Result<()> {
        let urls = self.directory.pattern_queues_of(topic).await?;
        let (missing, stale) = {
            let connected = self.connected.lock().unwrap();
            let known = connected.get(topic_arn);
            let missing: Vec<String> = urls
                .iter()
                .filter(|url| !known.is_some_and(|k| k.contains(*url)))
                .cloned()
                .collect();
            // Known queues that no longer match are gone: forget them.
            let stale = known.is_some_and(|k| k.len() + missing.len() != urls.len());
            (missing, stale)
        };
        if missing.is_empty() && !stale {
            return Ok(());
        }
        for url in &missing {
            let queue_arn = queues::queue_arn(&self.sqs, url).await?;
            self.subscribe_queue(topic_arn, &queue_arn).await?;
        }
        let mut connected = self.connected.lock().unwrap();
        let known = connected.entry(topic_arn.to_string()).or_default();
        known.retain(|url| urls.contains(url));
        known.extend(missing);
        Ok(())
    }

    /// Publishes `messages` (all of `topic`) to its SNS topic.
    async fn publish_topic(&self, topic: &str, messages: &[&Message]) -> Result<()> {
        let encoded: Vec<Encoded> = messages.iter().map(|m| encode(m)).collect::<Result<_>>()?;
        let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
        let arn = self.topic_arn(topic).await?;
        self.connect_pattern_queues(topic, &arn).await?;
        let sends: Vec<_> = batches(&encoded)
            .into_iter()
            .map(|run| self.publish_run(topic, &arn, &encoded[run.clone()], &ids[run]))
            .collect();
        futures::stream::iter(sends)
            .buffer_unordered(PARALLEL_SENDS)
            .try_collect::<()>()
            .await
    }

    /// Publishes one batch to the SNS topic `arn` of `topic`.
    async fn publish_run(
        &self,
        topic: &str,
        arn: &str,
        encoded: &[Encoded],
        ids: &[&str],
    ) -> Result<()> {
        let sent = with_entry_retries(encoded.len(), ids, arn, |indices| {
            self.publish_batch(arn, encoded, indices)
        })
        .await?;
        if sent == Sent::Gone {
            self.topics.lock().unwrap().remove(topic);
            anyhow::bail!("SNS topic `{arn}` of topic `{topic}` no longer exists");
        }
        Ok(())
    }

    async fn publish_batch(
        &self,
        arn: &str,
        messages: &[Encoded],
        indices: Vec<usize>,
    ) -> Result<Option<Vec<EntryFailure>>> {
        let entries = indices
            .iter()
            .map(|&i| {
                PublishBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message(&messages[i].body)
                    .message_attributes(META_ATTRIBUTE, messages[i].sns_attribute())
                    .build()
                    .expect("id and message are set")
            })
            .collect();
        let out = match self
            .sns
            .publish_batch()
            .topic_arn(arn)
            .set_publish_batch_request_entries(Some(entries))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if error_code(&e) == Some("NotFound") => return Ok(None),
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("SNS PublishBatch to `{arn}`"));
            }
        };
        out.failed()
            .iter()
            .map(|f| {
                EntryFailure::from_reply("SNS", f.id(), f.sender_fault(), f.code(), f.message())
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

#[async_trait]
impl Backend for SnsSqsBackend {
    fn kind(&self) -> &'static str {
        SCHEME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
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
        let mut subscriptions = Vec::new();
        let mut names = Vec::new();
        for topic in topics {
            // SNS standard topics deliver to standard queues only.
            let queue = group_queue(&self.names, &topic, &options, &group_key, false);
            let (url, subscription) = self.set_up_queue(&topic, &queue, options.ephemeral).await?;
            subscriptions.extend(subscription);
            sources.push(QueueSource { url, topic });
            names.push(queue);
        }
        let restore: Restore = {
            let backend = self.clone();
            let topics: Vec<String> = sources.iter().map(|s| s.topic.clone()).collect();
            let ephemeral = options.ephemeral;
            Box::new(move |queue| {
                let backend = backend.clone();
                let (topic, name) = (topics[queue].clone(), names[queue].clone());
                Box::pin(async move {
                    // The topic may be gone too (a server that lost everything).
                    backend.topics.lock().unwrap().remove(&topic);
                    Ok(backend.set_up_queue(&topic, &name, ephemeral).await?.0)
                })
            })
        };
        self.groups.insert(
            group_key.clone(),
            sources.iter().map(|s| s.url.clone()).collect(),
        );
        let teardown: Option<Teardown> = options.ephemeral.then(|| {
            let (sqs, sns, groups) = (self.sqs.clone(), self.sns.clone(), self.groups.clone());
            let directory = self.directory.clone();
            let sources = sources.clone();
            Box::new(move || {
                Box::pin(async move {
                    groups.remove(&group_key);
                    for arn in subscriptions {
                        sns.unsubscribe()
                            .subscription_arn(&arn)
                            .send()
                            .await
                            .with_context(|| format!("SNS Unsubscribe `{arn}`"))?;
                    }
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
                // Standard queues: no order to keep.
                ordered: false,
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
