//! Creating, finding and removing a group's queues: the queue, and (unless
//! `max_receive=0` or the group is ephemeral) its dead-letter queue with a
//! redrive policy.
//!
//! The dead-letter queue is a safety net under the host's own
//! dead-lettering: the host dead-letters a message (to the route's
//! dead-letter topic) after its route's `max_attempts`, but only if a
//! consumer lives long enough to settle it. A message that kills the whole
//! process each time it is handled is never settled; SQS then moves it to
//! `<queue>-dlq` after `max_receive` receives. So `max_receive` must be
//! above every route's `max_attempts` (default 25 against 5), or SQS takes
//! messages away before the host dead-letters them.

use anyhow::{Context, Result};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;

use super::client::{error_code, is_missing_queue};
use super::config::SqsConfig;
use super::names::{Names, PATTERN_TAG, queue_name_of};

/// Dead letters are kept as long as SQS allows.
const DEAD_LETTER_RETENTION_S: u64 = 1_209_600;

/// Creates queue `name` for a group (with its dead-letter queue, for a
/// durable group) if it does not exist, and returns its URL. A group's
/// queue for a topic pattern is tagged with the pattern.
pub async fn ensure_group_queue(
    sqs: &Client,
    config: &SqsConfig,
    name: &str,
    pattern: Option<&str>,
    ephemeral: bool,
) -> Result<String> {
    // An ordered group's queue, and its dead-letter queue with it.
    let fifo = || Names::is_fifo(name).then(|| (QueueAttributeName::FifoQueue, "true".to_string()));
    let mut attributes = vec![(
        QueueAttributeName::MessageRetentionPeriod,
        config.retention.as_secs().to_string(),
    )];
    attributes.extend(fifo());
    if config.max_receive > 0 && !ephemeral {
        let dead_letters = Names::dead_letter_queue(name);
        let mut dead_attributes = vec![(
            QueueAttributeName::MessageRetentionPeriod,
            DEAD_LETTER_RETENTION_S.to_string(),
        )];
        dead_attributes.extend(fifo());
        let url = create(sqs, &dead_letters, dead_attributes, None).await?;
        let policy = serde_json::json!({
            "deadLetterTargetArn": queue_arn(sqs, &url).await?,
            "maxReceiveCount": config.max_receive.to_string(),
        });
        attributes.push((QueueAttributeName::RedrivePolicy, policy.to_string()));
    }
    create(sqs, name, attributes, pattern).await
}

/// CreateQueue, which returns the existing queue when its attributes are
/// the same; when they differ (another process set it up with other
/// parameters) the existing queue is used as it is.
async fn create(
    sqs: &Client,
    name: &str,
    attributes: Vec<(QueueAttributeName, String)>,
    pattern: Option<&str>,
) -> Result<String> {
    let mut request = sqs.create_queue().queue_name(name);
    if let Some(pattern) = pattern {
        request = request.tags(PATTERN_TAG, hex::encode(pattern));
    }
    for (attribute, value) in attributes {
        request = request.attributes(attribute, value);
    }
    match request.send().await {
        Ok(out) => out
            .queue_url
            .with_context(|| format!("SQS created queue `{name}` but returned no URL")),
        Err(e)
            if matches!(
                error_code(&e),
                Some("QueueNameExists" | "QueueAlreadyExists")
            ) =>
        {
            tracing::warn!(
                queue = name,
                "SQS queue exists with other attributes (retention or redrive policy); using it as it is"
            );
            let out = sqs
                .get_queue_url()
                .queue_name(name)
                .send()
                .await
                .with_context(|| format!("SQS GetQueueUrl of `{name}`"))?;
            out.queue_url
                .with_context(|| format!("SQS returned no URL for queue `{name}`"))
        }
        Err(e) => Err(anyhow::Error::new(e)).with_context(|| format!("SQS CreateQueue `{name}`")),
    }
}

/// The ARN of the queue at `url`.
pub async fn queue_arn(sqs: &Client, url: &str) -> Result<String> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .with_context(|| format!("SQS GetQueueAttributes of `{}`", queue_name_of(url)))?;
    out.attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .with_context(|| format!("SQS returned no ARN for `{}`", queue_name_of(url)))
}

/// A cheap call that fails if SQS cannot be reached or refuses the
/// credentials.
pub async fn ping(sqs: &Client, prefix: &str) -> Result<()> {
    sqs.list_queues()
        .queue_name_prefix(prefix)
        .max_results(1)
        .send()
        .await
        .context("SQS ListQueues")?;
    Ok(())
}

/// URLs of the group queues whose names start with `prefix` (dead-letter
/// queues left out).
pub async fn list_group_queues(sqs: &Client, prefix: &str) -> Result<Vec<String>> {
    let mut urls = Vec::new();
    let mut next = None;
    loop {
        let out = sqs
            .list_queues()
            .queue_name_prefix(prefix)
            .max_results(1000)
            .set_next_token(next)
            .send()
            .await
            .with_context(|| format!("SQS ListQueues with prefix `{prefix}`"))?;
        urls.extend(
            out.queue_urls()
                .iter()
                .filter(|url| Names::is_group_queue(queue_name_of(url)))
                .cloned(),
        );
        next = out.next_token;
        if next.is_none() {
            return Ok(urls);
        }
    }
}

/// The topic pattern a pattern queue was tagged with, if it has one.
pub async fn pattern_of(sqs: &Client, url: &str) -> Result<Option<String>> {
    let out = match sqs.list_queue_tags().queue_url(url).send().await {
        Ok(out) => out,
        // Listed a while after it was deleted.
        Err(e) if is_missing_queue(error_code(&e)) => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::new(e))
                .with_context(|| format!("SQS ListQueueTags of `{}`", queue_name_of(url)));
        }
    };
    Ok(out
        .tags
        .and_then(|mut tags| tags.remove(PATTERN_TAG))
        .and_then(|hex_text| hex::decode(hex_text).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok()))
}

/// One of the queue's approximate counts (SQS's estimates settle within
/// about a minute of a change).
pub async fn count(sqs: &Client, url: &str, attribute: QueueAttributeName) -> Result<u64> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(attribute.clone())
        .send()
        .await
        .with_context(|| format!("SQS GetQueueAttributes of `{}`", queue_name_of(url)))?;
    Ok(out
        .attributes
        .and_then(|a| a.get(&attribute).and_then(|n| n.parse().ok()))
        .unwrap_or(0))
}

/// Deletes a queue; one that is already gone is fine.
pub async fn delete(sqs: &Client, url: &str) -> Result<()> {
    match sqs.delete_queue().queue_url(url).send().await {
        Ok(_) => Ok(()),
        Err(e) if is_missing_queue(error_code(&e)) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e))
            .with_context(|| format!("SQS DeleteQueue `{}`", queue_name_of(url))),
    }
}
