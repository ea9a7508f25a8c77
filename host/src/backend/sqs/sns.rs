//! `sns+sqs://`: an SNS topic per topic, and a queue per topic and group
//! subscribed to it with raw delivery (without it SNS wraps each body in a
//! JSON envelope). Each queue's policy lets only its topic send to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use async_trait::async_trait;
use aws_sdk_sns::types::PublishBatchRequestEntry;
use aws_sdk_sqs::types::QueueAttributeName;
use futures::{StreamExt, TryStreamExt};

use super::client::error_code;
use super::codec::{Encoded, META_ATTRIBUTE, encode};
use super::config::SqsConfig;
use super::names::{Names, queue_name_of};
use super::send::{EntryFailure, Sent, batches, with_entry_retries};
use super::subscription::{QueueSource, Restore, SqsSubscription, SubscriptionSpec, Teardown};
use super::{CAPABILITIES, GroupQueues, by_topic, client, exact_topics, queues};
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
        Ok(SnsSqsBackend {
            names: Names::new(&config.prefix),
            sqs,
            sns,
            config,
            topics: Arc::default(),
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

    /// Subscribes the queue at `url` to the SNS topic `topic_arn`; returns
    /// the subscription's ARN.
    async fn connect_queue(&self, topic_arn: &str, url: &str) -> Result<String> {
        let queue_arn = queues::queue_arn(&self.sqs, url).await?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "sluice-sns-fan-out",
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } },
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
        let out = self
            .sns
            .subscribe()
            .topic_arn(topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .attributes("RawMessageDelivery", "true")
            .return_subscription_arn(true)
            .send()
            .await
            .with_context(|| format!("SNS Subscribe of `{}`", queue_name_of(url)))?;
        out.subscription_arn.with_context(|| {
            format!(
                "SNS returned no subscription ARN for `{}`",
                queue_name_of(url)
            )
        })
    }

    /// Publishes `messages` (all of `topic`) to its SNS topic.
    async fn publish_topic(&self, topic: &str, messages: &[&Message]) -> Result<()> {
        let encoded: Vec<Encoded> = messages.iter().map(|m| encode(m)).collect::<Result<_>>()?;
        let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
        let arn = self.topic_arn(topic).await?;
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
        let topics = exact_topics(&options, SCHEME)?;
        let group_key = options.group_key();
        let mut sources = Vec::new();
        let mut subscriptions = Vec::new();
        let mut names = Vec::new();
        for topic in topics {
            let topic_arn = self.topic_arn(&topic).await?;
            let name = self.names.queue(&topic, &options.group, &group_key);
            let url = queues::ensure_group_queue(&self.sqs, &self.config, &name, options.ephemeral)
                .await?;
            subscriptions.push(self.connect_queue(&topic_arn, &url).await?);
            sources.push(QueueSource { url, topic });
            names.push(name);
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
                    let topic_arn = backend.topic_arn(&topic).await?;
                    let url =
                        queues::ensure_group_queue(&backend.sqs, &backend.config, &name, ephemeral)
                            .await?;
                    backend.connect_queue(&topic_arn, &url).await?;
                    Ok(url)
                })
            })
        };
        self.groups.insert(
            group_key.clone(),
            sources.iter().map(|s| s.url.clone()).collect(),
        );
        let teardown: Option<Teardown> = options.ephemeral.then(|| {
            let (sqs, sns, groups) = (self.sqs.clone(), self.sns.clone(), self.groups.clone());
            let urls: Vec<String> = sources.iter().map(|s| s.url.clone()).collect();
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
                    for url in urls {
                        queues::delete(&sqs, &url).await?;
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
