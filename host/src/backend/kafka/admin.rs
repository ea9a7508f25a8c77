//! Topic creation on demand and group clean-up, through librdkafka's admin
//! client. Every call has a request timeout and is bounded once more from
//! outside: without one, `create_topics` against tansu was seen to wait
//! for ever.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;

use super::config::KafkaConfig;
use super::{Detached, LogContext, apply_properties, client_config};

pub struct Admin {
    client: Detached<AdminClient<LogContext>>,
    timeout: Duration,
    partitions: i32,
    replication: i32,
    /// Topics known to exist: created, or found to exist, by this handle.
    known: Mutex<HashSet<String>>,
}

impl Admin {
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        let mut settings = client_config(config);
        apply_properties(&mut settings, config);
        let client = settings.create_with_context(LogContext).with_context(|| {
            format!("cannot create a Kafka admin client for `{}`", config.shown)
        })?;
        Ok(Admin {
            client: Detached::new(client),
            timeout: config.timeout,
            partitions: config.partitions,
            replication: config.replication,
            known: Mutex::new(HashSet::new()),
        })
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout))
    }

    /// Creates those of `topics` not known to exist, with the configured
    /// partitions and replication; one that exists already is fine.
    pub async fn ensure_topics(&self, topics: &[&str]) -> Result<()> {
        let missing: Vec<&str> = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            let mut missing: Vec<&str> = topics
                .iter()
                .copied()
                .filter(|t| !known.contains(*t))
                .collect();
            missing.sort_unstable();
            missing.dedup();
            missing
        };
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.partitions,
                    TopicReplication::Fixed(self.replication),
                )
            })
            .collect();
        let created = tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            self.client.get().create_topics(&new, &self.options()),
        )
        .await
        .with_context(|| format!("creating Kafka topics {missing:?} timed out"))?
        .with_context(|| format!("cannot create Kafka topics {missing:?}"))?;
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        for result in created {
            match result {
                Ok(topic) | Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    known.insert(topic);
                }
                Err((topic, code)) => bail!("cannot create Kafka topic `{topic}`: {code}"),
            }
        }
        Ok(())
    }

    /// Deletes a consumer group with its committed offsets; best effort
    /// (what a broker does not support or refuses is logged).
    pub async fn delete_group(&self, group_id: &str) {
        let deleted = tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            self.client
                .get()
                .delete_groups(&[group_id], &self.options()),
        )
        .await;
        match deleted {
            Ok(Ok(results)) => {
                for result in results {
                    if let Err((group, code)) = result {
                        tracing::debug!("Kafka: group `{group}` not deleted: {code}");
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!("Kafka: group `{group_id}` not deleted: {e}"),
            Err(_) => tracing::warn!("Kafka: deleting group `{group_id}` timed out"),
        }
    }
}
