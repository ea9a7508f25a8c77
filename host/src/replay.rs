//! Replay: a route's stored messages from a time on, handled again by that
//! route alone.
//!
//! The topics' history is read as a throwaway group from the earliest
//! message the backend still keeps, and each message of the time range is
//! sent, as a new message with its key, headers and payload, to the
//! route's redrive topic, which only the route's group reads (with
//! `redrive = true`); the route hands it to its plugin under its own
//! topic. So replay works alike on every backend that keeps history (file
//! log, SQLite, PostgreSQL within its retention, Redis Streams, JetStream,
//! Kafka) through the backend contract alone, and moves no group's position.
//! A backend that keeps none is refused, saying so.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::backend::{Backend, Settlement, StartFrom, SubscribeOptions};
use crate::message::{Message, headers, now_ms};
use crate::rate::TokenBucket;

/// Messages read per fetch.
const BATCH: usize = 256;

/// How long the history may stay silent at the start (a group can take
/// seconds to join) before there is taken to be nothing.
const FIRST_WAIT: Duration = Duration::from_secs(15);

/// On a replayed message: the id of the message it copies.
pub const REPLAY_OF: &str = "sluice-replay-of";

/// What a replay reads and where it sends it.
pub struct Replay {
    pub route: String,
    /// The route's input backend.
    pub backend: Arc<dyn Backend>,
    /// The route's topics (patterns allowed).
    pub topics: Vec<String>,
    /// The route's redrive topic, if it reads one.
    pub redrive_topic: Option<String>,
}

impl Replay {
    /// Sends the messages stored between `from_ms` and `to_ms` (ms since
    /// the epoch; `to_ms` defaults to now) back through the route, at most
    /// `rate` a second, calling `progress` with the count so far; returns
    /// how many.
    pub async fn run(
        &self,
        from_ms: u64,
        to_ms: Option<u64>,
        rate: Option<f64>,
        mut progress: impl FnMut(u64),
    ) -> Result<u64> {
        let Some(redrive_topic) = &self.redrive_topic else {
            bail!(
                "route `{}` reads no redrive topic, which a replay sends to; set \
                 `redrive = true` on it and restart or reload the host",
                self.route
            );
        };
        if !self.backend.capabilities().history {
            bail!(
                "the `{}` backend keeps no history of route `{}`'s topics (a message is \
                 kept only for the groups that existed when it was published), so there is \
                 nothing to replay",
                self.backend.kind(),
                self.route
            );
        }
        let started = now_ms();
        let to_ms = to_ms.unwrap_or(started).min(started);
        let group = format!("sluice-replay-{}", Message::new("x", "").id);
        let mut options = SubscribeOptions::new(self.topics.clone(), group);
        options.ephemeral = true;
        options.start = StartFrom::Earliest;
        let subscription = self
            .backend
            .subscribe(options)
            .await
            .context("reading the topics' history")?;
        let mut bucket = rate.map(|r| TokenBucket::new(r, (r / 10.0).max(1.0)));
        let mut sent = 0u64;
        let mut seen_any = false;
        let silent_since = std::time::Instant::now();
        // Batches in a row with nothing older than the replay: the history
        // is behind it (live traffic goes on). A few, as partitions of one
        // topic may reach the present at different times.
        let mut only_new = 0;
        let result = async {
            loop {
                let batch = subscription
                    .fetch(BATCH, Duration::from_millis(500))
                    .await?;
                if batch.is_empty() {
                    if seen_any || silent_since.elapsed() >= FIRST_WAIT {
                        return anyhow::Ok(());
                    }
                    continue;
                }
                seen_any = true;
                // What was published after the replay began (its own
                // copies, where the route's patterns take in its redrive
                // topic) is not history.
                let past: Vec<Message> = batch
                    .iter()
                    .map(|d| &d.message)
                    .filter(|m| m.timestamp_ms < started)
                    .filter(|m| m.timestamp_ms >= from_ms && m.timestamp_ms < to_ms)
                    .map(|m| copy(m, redrive_topic))
                    .collect();
                if batch.iter().any(|d| d.message.timestamp_ms < started) {
                    only_new = 0;
                } else {
                    only_new += 1;
                }
                for chunk in past.chunks(BATCH) {
                    if let Some(bucket) = bucket.as_mut() {
                        let mut owed = chunk.len();
                        while owed > 0 {
                            match bucket.take_up_to(owed) {
                                Ok(n) => owed -= n,
                                Err(wait) => tokio::time::sleep(wait).await,
                            }
                        }
                    }
                    self.backend
                        .publish(chunk.to_vec())
                        .await
                        .with_context(|| format!("publishing to `{redrive_topic}`"))?;
                    sent += chunk.len() as u64;
                    progress(sent);
                }
                let acks = batch.iter().map(|d| (d, Settlement::Ack)).collect();
                for result in subscription.settle(acks).await {
                    result.context("moving through the history")?;
                }
                if only_new >= 3 {
                    return anyhow::Ok(());
                }
            }
        }
        .await;
        subscription.close().await?;
        result.map(|()| sent)
    }
}

/// A point in time as people give one: an age (`30m`, `2h`, `7d` ago) or
/// milliseconds since the epoch.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let age = crate::dlq::cli::parse_age(text).map_err(|_| {
        format!("`{text}` is neither an age like 30m, 2h or 7d nor milliseconds since the epoch")
    })?;
    Ok(now_ms().saturating_sub(age.as_millis() as u64))
}

/// `message` as a new message to `topic` that its route handles under the
/// topic it was stored in.
fn copy(message: &Message, topic: &str) -> Message {
    let mut copy = Message::new(topic, message.payload.clone());
    copy.key = message.key.clone();
    copy.headers = message.headers.clone();
    copy.set_header(headers::ORIGINAL_TOPIC, message.topic.clone());
    copy.set_header(REPLAY_OF, message.id.clone());
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_ages_or_epoch_milliseconds() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        let two_hours_ago = parse_time("2h").unwrap();
        assert!(now_ms() - two_hours_ago >= 7_200_000 && now_ms() - two_hours_ago < 7_260_000);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn a_copy_is_a_new_message_that_remembers_where_it_was_stored() {
        let original = Message::new("orders.eu", "p")
            .with_key("k")
            .with_header("h", "1");
        let copy = copy(&original, "r.redrive");
        assert_eq!(copy.topic, "r.redrive");
        assert_ne!(copy.id, original.id);
        assert_eq!(
            (copy.key.as_deref(), copy.payload.as_slice()),
            (Some("k"), &b"p"[..])
        );
        assert_eq!(copy.header("h"), Some("1"));
        assert_eq!(copy.header(headers::ORIGINAL_TOPIC), Some("orders.eu"));
        assert_eq!(copy.header(REPLAY_OF), Some(original.id.as_str()));
    }
}
