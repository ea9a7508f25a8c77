//! The AWS backends: plain SQS (`sqs://`), where publishers send to every
//! group's queue themselves, and SNS fan-out to SQS (`sns+sqs://`), where
//! they publish to an SNS topic and SNS copies each message into the queue
//! of every group subscribed to it.
//!
//! # URLs
//!
//! `sqs://aws?region=eu-west-1[&params]` is AWS itself, with credentials
//! (and, without `region`, the region) from the standard AWS chain:
//! environment, shared config and credentials files, SSO, web identity,
//! container and instance roles. `sqs://[KEY:SECRET@]HOST:PORT[?params]`
//! is an endpoint override, `http://HOST:PORT` (`https` with `tls=true`),
//! for a local emulator or a private endpoint; the user info gives static
//! credentials (percent-encoded: a `/` in a secret is `%2F`), else the
//! chain's. `sns+sqs://` takes the same forms.
//!
//! Parameters (see [`config::SqsConfig`]): `region`; `prefix` (of every
//! queue and topic name, default `sluice-`); `max_receive` (redrive to a
//! dead-letter queue after that many receives, default 25, 0 = none);
//! `retention_s` (default 14 days, SQS's most); `discover_ms` (`sqs://`
//! only: how long a publisher trusts its list of a topic's groups, default
//! 2000); `ack_batch_ms` (how long acks wait to be deleted together,
//! default 10); `heartbeat` (extend held deliveries, default true);
//! `wait_s` (the longest a receive long-polls, 1 to 20 seconds, default
//! 20; the tests run moto with 1, as it busy-waits a FIFO long poll while a
//! message group is in flight); `tls`;
//! `profile` (the shared files' profile the chain reads, instead of
//! `AWS_PROFILE`). The chain is asked for credentials when the backend
//! connects, so having none is one error naming the URL and the reason.
//!
//! # Semantics
//!
//! | | `sqs://` | `sns+sqs://` |
//! |---|---|---|
//! | delivery | at least once: a received message is invisible for the lease, deleted on ack, visible again after a nack's delay or when the lease runs out | the same |
//! | groups | a queue per topic and group ([`names`]); members of a group share it, and a publisher sends each message to every group's queue of its topic, found by listing queues by name ([`directory`]) | an SNS topic per topic; a queue per topic and group, subscribed to the topic with raw delivery |
//! | history | no: a group receives what is published once it exists (and, across processes, once publishers have listed it, within `discover_ms`); `start` makes no difference | no: a group receives what is published once its subscription is in place (for a pattern: once a publisher of the topic has listed it) |
//! | ordering | none for standard queues; an ordered group (`ordered` route) reads a FIFO queue whose message groups are the keys: SQS hands a key's next message to no member while one is in flight, so each key's order holds across the group's members, through nacks and crashes (see [`subscription`] for the few messages of a key one receive may bring) | none: SNS standard topics deliver to standard queues |
//! | persistence | SQS's: an accepted publish is stored redundantly; messages are kept `retention_s` | the same, once SNS delivered it to the queues |
//! | nack with delay | native: ChangeMessageVisibility to the delay (whole seconds, rounded up; at most 12 hours after the first receive) | the same |
//! | lease | the receive's visibility timeout = the route's lease (whole seconds, at least 1); a heartbeat extends what a live consumer holds | the same |
//! | attempts | `ApproximateReceiveCount` | the same |
//! | patterns | `*` and `>`: a group's pattern has a queue of its own, tagged with the pattern ([`names`]); publishers list the pattern queues (trusting the list `discover_ms`) and send each message to those whose pattern matches its topic too | the same queues; publishers subscribe those whose pattern matches to their topic's SNS topic before they publish to it |
//! | what the host adds | dead-lettering (to the route's dead-letter topic) and the retry policy; the per-queue dead-letter queue after `max_receive` receives is only a safety net, see [`queues`] | the same |
//!
//! Receiving long polls (WaitTimeSeconds from the fetch's wait, at most 20
//! s) for up to 10 messages per call; publishing sends SendMessageBatch
//! (PublishBatch on SNS) of up to 10 messages and 256 KiB; acks are deleted
//! in DeleteMessageBatch. How a message travels is in [`codec`]; fetching,
//! settling and close in [`subscription`].
//!
//! Plain `sqs://` needs nothing but SQS, and one send per group; its price
//! is that fan-out is decided by the publisher, so a group that a
//! publisher has not yet listed misses what it publishes. `sns+sqs://` lets
//! SNS fan out (one publish whatever the number of groups, and a new group
//! gets every message SNS accepts once its subscription is in place), for
//! SNS's cost and limits.

mod client;
pub mod codec;
pub mod config;
pub mod directory;
mod lease;
pub mod names;
pub(crate) mod plain;
pub mod queues;
mod receive;
mod send;
mod settle;
pub(crate) mod sns;
pub mod subscription;

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Result, bail};
use aws_sdk_sqs::types::QueueAttributeName;

pub use plain::SqsBackend;
pub use sns::SnsSqsBackend;

use super::{Capabilities, SubscribeOptions, pattern};
use crate::message::Message;

/// Connects as `sqs://` does (a queue listing, which also checks the
/// credentials); changes nothing.
pub async fn probe_sqs(url: &str) -> Result<String> {
    SqsBackend::connect(url).await?;
    Ok("SQS answers ListQueues".into())
}

/// Connects as `sns+sqs://` does (a queue and a topic listing); changes
/// nothing.
pub async fn probe_sns_sqs(url: &str) -> Result<String> {
    SnsSqsBackend::connect(url).await?;
    Ok("SQS answers ListQueues, SNS ListTopics".into())
}

/// What `sns+sqs://` guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: true,
    history: false,
    consumer_groups: true,
    ordered_per_key: false,
    native_delay: true,
    lease: true,
    wildcards: true,
    at_least_once: true,
    lease_checked: false,
    backlog: true,
    key_affinity: false,
};

/// What `sqs://` guarantees: as `sns+sqs://`, and an ordered group's FIFO
/// queue keeps each key's order across its members.
pub const SQS_CAPABILITIES: Capabilities = Capabilities {
    ordered_per_key: true,
    key_affinity: true,
    ..CAPABILITIES
};

/// A publish's messages by topic: each topic is sent on its own.
fn by_topic(messages: &[Message]) -> HashMap<&str, Vec<&Message>> {
    let mut by_topic: HashMap<&str, Vec<&Message>> = HashMap::new();
    for message in messages {
        by_topic.entry(&message.topic).or_default().push(message);
    }
    by_topic
}

/// The distinct topics and patterns of a subscription.
fn subscribed_topics(options: &SubscribeOptions, scheme: &str) -> Result<Vec<String>> {
    let mut topics = options.topics.clone();
    topics.sort();
    topics.dedup();
    if topics.is_empty() {
        bail!("group `{}` subscribes to no topic", options.group);
    }
    if let Some(p) = topics
        .iter()
        .find(|t| pattern::is_pattern(t) && t.len() > names::MAX_PATTERN_BYTES)
    {
        bail!(
            "{scheme}: topic pattern `{p}` of group `{}` is longer than the {} bytes an SQS tag holds",
            options.group,
            names::MAX_PATTERN_BYTES
        );
    }
    Ok(topics)
}

/// A group's queue for one of its topics or patterns (a FIFO queue if
/// `fifo`): its name, and the pattern it is tagged with.
fn group_queue(
    names: &names::Names,
    topic: &str,
    options: &SubscribeOptions,
    group_key: &str,
    fifo: bool,
) -> (String, Option<String>) {
    if pattern::is_pattern(topic) {
        let name = names.pattern_queue(topic, &options.group, group_key, fifo);
        (name, Some(topic.to_string()))
    } else {
        (names.queue(topic, &options.group, group_key, fifo), None)
    }
}

/// The process's directory of group queues for one deployment: what tells
/// deployments apart is the endpoint, region, credentials' key and prefix.
fn directory(
    config: &config::SqsConfig,
    sdk: &aws_config::SdkConfig,
    sqs: &aws_sdk_sqs::Client,
    names: &names::Names,
) -> std::sync::Arc<directory::Directory> {
    let scope = format!(
        "{:?}|{:?}|{:?}|{}",
        config.endpoint,
        sdk.region(),
        config.credentials.as_ref().map(|(key, _)| key),
        config.prefix
    );
    directory::Directory::shared(scope, sqs.clone(), names.clone(), config.discover)
}

/// The queues of the groups subscribed through one backend handle, by
/// group key, for [`crate::backend::Backend::pending`] and
/// [`crate::backend::Backend::backlog`].
#[derive(Default)]
struct GroupQueues(Mutex<HashMap<String, Vec<String>>>);

impl GroupQueues {
    fn insert(&self, group_key: String, urls: Vec<String>) {
        self.0.lock().unwrap().insert(group_key, urls);
    }

    fn remove(&self, group_key: &str) {
        self.0.lock().unwrap().remove(group_key);
    }

    /// Messages in flight or waiting out a nack delay, summed over the
    /// group's queues.
    async fn pending(&self, sqs: &aws_sdk_sqs::Client, group_key: &str) -> Result<Option<u64>> {
        self.sum(
            sqs,
            group_key,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )
        .await
    }

    /// Messages waiting to be received, summed over the group's queues.
    async fn backlog(&self, sqs: &aws_sdk_sqs::Client, group_key: &str) -> Result<Option<u64>> {
        self.sum(
            sqs,
            group_key,
            QueueAttributeName::ApproximateNumberOfMessages,
        )
        .await
    }

    async fn sum(
        &self,
        sqs: &aws_sdk_sqs::Client,
        group_key: &str,
        attribute: QueueAttributeName,
    ) -> Result<Option<u64>> {
        let urls = self.0.lock().unwrap().get(group_key).cloned();
        let Some(urls) = urls else {
            return Ok(None);
        };
        let mut total = 0;
        for url in urls {
            total += queues::count(sqs, &url, attribute.clone()).await?;
        }
        Ok(Some(total))
    }
}
