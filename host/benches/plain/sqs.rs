//! The plain SQS loop of the broker benchmark, through `aws-sdk-sqs`: a
//! worker receives batches of 10 with long polling, sends each payload to
//! the output queue in one SendMessageBatch, then deletes the batch
//! (outputs before the delete, as Sluice does); a second loop receives,
//! deletes and counts the outputs.
//!
//! The endpoint is `SLUICE_BENCH_SQS` (default `127.0.0.1:5000`, where
//! `moto_server -p 5000` listens). moto scans a whole queue for every
//! message it hands out, so its runs are short: `SLUICE_BENCH_SQS_MESSAGES`
//! (default 1000) caps the timed messages and [`WARMUP`] warms up. Every run
//! names its queues with a prefix of its own and deletes them afterwards.

use std::sync::LazyLock;

use anyhow::{Context, Result, bail};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

/// Messages a warm-up runs through moto.
pub const WARMUP: usize = 100;
/// SQS's largest batch.
const BATCH: usize = 10;
/// Publish batches under way at once.
const PARALLEL_SENDS: usize = 8;

static ADDRESS: LazyLock<String> =
    LazyLock::new(|| std::env::var("SLUICE_BENCH_SQS").unwrap_or_else(|_| "127.0.0.1:5000".into()));

pub fn address() -> &'static str {
    &ADDRESS
}

/// The timed messages of an SQS run: the broker-wide count, capped.
pub fn messages(requested: usize) -> Result<usize> {
    Ok(requested.min(super::positive_env("SLUICE_BENCH_SQS_MESSAGES", 1_000)?))
}

/// Queue names allow 80 characters: a run's namespace is shortened to a
/// hash.
fn prefix(namespace: &str) -> String {
    let digest = Sha256::digest(namespace.as_bytes());
    format!("bench{}-", &hex::encode(digest)[..12])
}

pub fn sluice_url(namespace: &str) -> String {
    format!(
        "sqs://bench:bench@{}?region=us-east-1&prefix={}",
        address(),
        prefix(namespace)
    )
}

async fn client() -> Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(format!("http://{}", address()))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "bench", "bench", None, None, "bench",
        ))
        .build();
    Client::from_conf(config)
}

pub struct PlainSqs {
    sqs: Client,
    input: String,
    output: String,
}

impl PlainSqs {
    pub async fn connect(namespace: &str) -> Result<Self> {
        let sqs = client().await;
        let prefix = prefix(namespace);
        let mut urls = Vec::new();
        for name in ["plain-in", "plain-out"] {
            let out = sqs
                .create_queue()
                .queue_name(format!("{prefix}{name}"))
                .send()
                .await?;
            urls.push(out.queue_url.context("no queue URL")?);
        }
        let output = urls.pop().unwrap();
        let input = urls.pop().unwrap();
        Ok(PlainSqs { sqs, input, output })
    }

    pub async fn publish(&mut self, count: usize, payload: &[u8]) -> Result<()> {
        let body = std::str::from_utf8(payload).context("the payload is text")?;
        let batches: Vec<usize> = (0..count)
            .step_by(BATCH)
            .map(|start| BATCH.min(count - start))
            .collect();
        futures::stream::iter(batches)
            .map(|size| send(&self.sqs, &self.input, vec![body.to_string(); size]))
            .buffer_unordered(PARALLEL_SENDS)
            .try_collect::<()>()
            .await
    }

    pub async fn process(&mut self, count: usize) -> Result<()> {
        let work = async {
            let mut done = 0;
            while done < count {
                let messages = receive(&self.sqs, &self.input).await?;
                if messages.is_empty() {
                    continue;
                }
                let bodies = messages.iter().map(|(body, _)| body.clone()).collect();
                send(&self.sqs, &self.output, bodies).await?;
                delete(&self.sqs, &self.input, &messages).await?;
                done += messages.len();
            }
            anyhow::Ok(())
        };
        let counting = async {
            let mut counted = 0;
            while counted < count {
                let messages = receive(&self.sqs, &self.output).await?;
                if messages.is_empty() {
                    continue;
                }
                delete(&self.sqs, &self.output, &messages).await?;
                counted += messages.len();
            }
            anyhow::Ok(())
        };
        tokio::try_join!(work, counting)?;
        Ok(())
    }
}

/// Up to 10 messages as (body, receipt handle), long polling a second.
async fn receive(sqs: &Client, url: &str) -> Result<Vec<(String, String)>> {
    let out = tokio::time::timeout(
        super::STALL,
        sqs.receive_message()
            .queue_url(url)
            .max_number_of_messages(BATCH as i32)
            .wait_time_seconds(1)
            .send(),
    )
    .await
    .context("ReceiveMessage stalled")??;
    Ok(out
        .messages
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.body.unwrap_or_default(),
                m.receipt_handle.unwrap_or_default(),
            )
        })
        .collect())
}

async fn send(sqs: &Client, url: &str, bodies: Vec<String>) -> Result<()> {
    let entries = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .build()
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let out = sqs
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await?;
    if !out.failed().is_empty() {
        bail!("{} messages of a batch were refused", out.failed().len());
    }
    Ok(())
}

async fn delete(sqs: &Client, url: &str, messages: &[(String, String)]) -> Result<()> {
    let entries = messages
        .iter()
        .enumerate()
        .map(|(i, (_, receipt))| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .build()
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    sqs.delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await?;
    Ok(())
}

/// Deletes every queue the run made (Sluice's and the plain loop's).
pub async fn clean(namespace: &str) -> Result<()> {
    let sqs = client().await;
    let urls = sqs
        .list_queues()
        .queue_name_prefix(prefix(namespace))
        .send()
        .await?
        .queue_urls
        .unwrap_or_default();
    for url in urls {
        sqs.delete_queue().queue_url(url).send().await?;
    }
    Ok(())
}
