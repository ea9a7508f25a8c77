//! Dead letters after the fact: what a route's dead-letter topic holds
//! (`list`, `show`), sending them back through the route that failed them
//! (`redrive`), and dropping them (`purge`).
//!
//! Every operation reads the topic as the group the host keeps dead letters
//! for ([`DEAD_LETTER_GROUP`]), so a dead letter redriven or purged is gone
//! from it and from nothing else. Reading to look leaves every dead letter
//! in place: they are held under a long lease and released at the end.
//! Each operation takes only the dead letters that were there when it
//! began (by their time), so a redrive whose messages fail again, and come
//! back as new dead letters, ends instead of going round.
//!
//! A redriven message goes to the route's redrive topic (`<route>.redrive`),
//! which only that route's group reads (with `redrive = true`), so the
//! other groups of the original topic do not see it again. It is a new
//! message: key, headers and payload kept, attempts from 1, the
//! dead-letter headers moved into [`headers::REDRIVE_HISTORY`]; the route
//! hands it to its plugin under its original topic. Each batch is published,
//! then its dead letters acked: at least once, never lost.
//!

pub mod cli;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::{Backend, Delivery, Settlement, SubscribeOptions, Subscription};
use crate::message::{Message, headers, now_ms};
use crate::rate::TokenBucket;
pub use crate::router::DEAD_LETTER_GROUP;

/// How long dead letters read only to look at stay held; one that comes
/// back while the reading goes on is not counted twice.
const LOOK_LEASE: Duration = Duration::from_secs(60);

/// How long a batch being redriven or purged stays held: what a run killed
/// part way held comes back after this.
pub const TAKE_LEASE: Duration = Duration::from_secs(10);

/// Dead letters read per fetch.
const BATCH: usize = 256;

/// Which dead letters an operation takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these causes (`rejected`, `attempts-exhausted`, …); any if empty.
    pub causes: Vec<String>,
    /// Only these message ids (the dead letter's or the original's); any if
    /// empty.
    pub ids: Vec<String>,
    /// Only dead letters at least this old.
    pub older_than: Option<Duration>,
    /// Only dead letters at most this old.
    pub newer_than: Option<Duration>,
}

impl Filter {
    pub fn matches(&self, letter: &Message) -> bool {
        let age = Duration::from_millis(now_ms().saturating_sub(letter.timestamp_ms));
        let cause = letter.header(headers::DEAD_LETTER_CAUSE).unwrap_or("");
        let original = letter.header(headers::ORIGINAL_ID).unwrap_or("");
        (self.causes.is_empty() || self.causes.iter().any(|c| c == cause))
            && (self.ids.is_empty() || self.ids.iter().any(|id| *id == letter.id || id == original))
            && self.older_than.is_none_or(|limit| age >= limit)
            && self.newer_than.is_none_or(|limit| age <= limit)
    }
}

/// What a dead-letter topic holds, in brief.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    /// Dead letters by cause.
    pub causes: BTreeMap<String, u64>,
    /// Times the oldest and newest were dead-lettered, ms since the epoch.
    pub oldest_ms: Option<u64>,
    pub newest_ms: Option<u64>,
}

impl Summary {
    pub fn of(letters: &[Message]) -> Self {
        let mut summary = Summary::default();
        for letter in letters {
            summary.count += 1;
            let cause = letter
                .header(headers::DEAD_LETTER_CAUSE)
                .unwrap_or("unknown");
            *summary.causes.entry(cause.to_string()).or_default() += 1;
            let at = letter.timestamp_ms;
            summary.oldest_ms = Some(summary.oldest_ms.map_or(at, |o| o.min(at)));
            summary.newest_ms = Some(summary.newest_ms.map_or(at, |n| n.max(at)));
        }
        summary
    }
}

/// One route's dead letters, and where they are kept.
#[derive(Clone)]
pub struct DeadLetters {
    pub route: String,
    /// The backend the dead letters are on.
    pub backend: Arc<dyn Backend>,
    pub topic: String,
    /// Where a redrive sends them: the route's input backend and its
    /// redrive topic, if the route reads one.
    pub redrive: Option<(Arc<dyn Backend>, String)>,
}

impl DeadLetters {
    async fn subscribe(&self, lease: Duration) -> Result<Box<dyn Subscription>> {
        let mut options = SubscribeOptions::new(vec![self.topic.clone()], DEAD_LETTER_GROUP);
        options.lease = lease;
        self.backend
            .subscribe(options)
            .await
            .with_context(|| format!("reading `{}`", self.topic))
    }

    /// Every dead letter waiting now that `filter` takes, oldest first,
    /// leaving all of them in place.
    pub async fn peek(&self, filter: &Filter) -> Result<Vec<Message>> {
        let started = now_ms();
        let subscription = self.subscribe(LOOK_LEASE).await?;
        let mut held: Vec<Delivery> = Vec::new();
        let mut seen = HashSet::new();
        let mut fresh = HashSet::new();
        let result = async {
            loop {
                let batch = subscription
                    .fetch(BATCH, Duration::from_millis(500))
                    .await?;
                // Done once nothing older than this reading is new to it.
                let done = !batch
                    .iter()
                    .filter(|d| d.message.timestamp_ms < started)
                    .any(|d| fresh.insert(d.message.id.clone()));
                held.extend(batch);
                if done {
                    return anyhow::Ok(());
                }
            }
        }
        .await;
        release(subscription.as_ref(), &held).await;
        subscription.close().await?;
        result?;
        let mut letters: Vec<Message> = held
            .into_iter()
            .map(|d| d.message)
            .filter(|m| m.timestamp_ms < started && seen.insert(m.id.clone()) && filter.matches(m))
            .collect();
        letters.sort_by_key(|m| m.timestamp_ms);
        Ok(letters)
    }

    /// Sends the dead letters `filter` takes back through the route, at
    /// most `rate` a second, calling `progress` with the count so far;
    /// returns how many.
    pub async fn redrive(
        &self,
        filter: &Filter,
        rate: Option<f64>,
        mut progress: impl FnMut(u64),
    ) -> Result<u64> {
        let Some((source, topic)) = &self.redrive else {
            anyhow::bail!(
                "route `{}` reads no redrive topic; set `redrive = true` on it (it then also \
                 reads `{}.redrive`) and restart or reload the host",
                self.route,
                self.route
            );
        };
        let mut bucket = rate.map(|r| TokenBucket::new(r, (r / 10.0).max(1.0)));
        self.take(filter, &mut bucket, &mut progress, |letters| async move {
            let redriven = letters.iter().map(|l| redriven(l, topic)).collect();
            source
                .publish(redriven)
                .await
                .with_context(|| format!("publishing to `{topic}`"))
        })
        .await
    }

    /// Drops the dead letters `filter` takes; returns how many.
    pub async fn purge(&self, filter: &Filter, mut progress: impl FnMut(u64)) -> Result<u64> {
        self.take(filter, &mut None, &mut progress, |_| async { Ok(()) })
            .await
    }

    /// Takes the dead letters `filter` takes out of the topic, `bucket`
    /// allowing, handing each batch to `each` before acking it; the others
    /// are released at the end.
    async fn take<F, Fut>(
        &self,
        filter: &Filter,
        bucket: &mut Option<TokenBucket>,
        progress: &mut impl FnMut(u64),
        each: F,
    ) -> Result<u64>
    where
        F: Fn(Vec<Message>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let started = now_ms();
        let subscription = self.subscribe(TAKE_LEASE).await?;
        let mut skipped = Vec::new();
        let mut done = 0u64;
        let result = async {
            loop {
                let want = match bucket.as_mut() {
                    Some(bucket) => loop {
                        match bucket.take_up_to(BATCH) {
                            Ok(n) => break n,
                            Err(wait) => tokio::time::sleep(wait).await,
                        }
                    },
                    None => BATCH,
                };
                let batch = subscription.fetch(want, Duration::from_millis(500)).await?;
                if let Some(bucket) = bucket.as_mut() {
                    bucket.give_back(want - batch.len().min(want));
                }
                // Dead letters newer than this run (one it redrove, failed
                // again) are left for the next.
                if !batch.iter().any(|d| d.message.timestamp_ms < started) {
                    skipped.extend(batch);
                    return anyhow::Ok(());
                }
                let (taken, others): (Vec<Delivery>, Vec<Delivery>) = batch
                    .into_iter()
                    .partition(|d| d.message.timestamp_ms < started && filter.matches(&d.message));
                skipped.extend(others);
                if taken.is_empty() {
                    continue;
                }
                each(taken.iter().map(|d| d.message.clone()).collect()).await?;
                let acks = taken.iter().map(|d| (d, Settlement::Ack)).collect();
                for result in subscription.settle(acks).await {
                    result.context("acking a dead letter")?;
                }
                done += taken.len() as u64;
                progress(done);
            }
        }
        .await;
        release(subscription.as_ref(), &skipped).await;
        subscription.close().await?;
        result.map(|()| done)
    }
}

/// Lets dead letters held only to look at go back at once.
async fn release(subscription: &dyn Subscription, held: &[Delivery]) {
    let nacks = held
        .iter()
        .map(|d| (d, Settlement::Nack(Duration::ZERO)))
        .collect();
    for result in subscription.settle(nacks).await {
        if let Err(e) = result {
            // Not lost: it comes back when its lease ends.
            tracing::debug!("releasing a dead letter: {e}");
        }
    }
}

/// The headers the router sets on a dead letter, which a redrive moves into
/// the history (the original topic stays: the route restores it).
const DEAD_LETTER_HEADERS: [&str; 5] = [
    headers::DEAD_LETTER_CAUSE,
    headers::DEAD_LETTER_REASON,
    headers::ATTEMPTS,
    headers::ROUTE,
    headers::ORIGINAL_ID,
];

/// `letter` as a new message to `topic`: key, headers and payload kept,
/// its dead-letter headers appended to the redrive history.
pub fn redriven(letter: &Message, topic: &str) -> Message {
    let mut history: Vec<serde_json::Value> = letter
        .header(headers::REDRIVE_HISTORY)
        .and_then(|h| serde_json::from_str(h).ok())
        .unwrap_or_default();
    history.push(serde_json::json!({
        "cause": letter.header(headers::DEAD_LETTER_CAUSE),
        "reason": letter.header(headers::DEAD_LETTER_REASON),
        "attempts": letter.header(headers::ATTEMPTS),
        "route": letter.header(headers::ROUTE),
        "id": letter.header(headers::ORIGINAL_ID),
        "dead_lettered_ms": letter.timestamp_ms,
        "redriven_ms": now_ms(),
    }));
    let mut message = Message::new(topic, letter.payload.clone());
    message.key = letter.key.clone();
    message.headers = letter
        .headers
        .iter()
        .filter(|(name, _)| {
            !DEAD_LETTER_HEADERS.contains(&name.as_str()) && name != headers::REDRIVE_HISTORY
        })
        .cloned()
        .collect();
    message.set_header(
        headers::REDRIVE_HISTORY,
        serde_json::Value::Array(history).to_string(),
    );
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(cause: &str) -> Message {
        Message::new("r.dead-letter", "payload")
            .with_key("k")
            .with_header("custom", "1")
            .with_header(headers::DEAD_LETTER_CAUSE, cause)
            .with_header(headers::DEAD_LETTER_REASON, "why")
            .with_header(headers::ORIGINAL_TOPIC, "orders")
            .with_header(headers::ORIGINAL_ID, "original")
            .with_header(headers::ATTEMPTS, "5")
            .with_header(headers::ROUTE, "r")
    }

    #[test]
    fn a_redriven_message_keeps_its_content_and_moves_the_why_into_history() {
        let first = redriven(&letter("rejected"), "r.redrive");
        assert_eq!(first.topic, "r.redrive");
        assert_eq!(first.payload, b"payload");
        assert_eq!(first.key.as_deref(), Some("k"));
        assert_eq!(first.header("custom"), Some("1"));
        assert_eq!(first.header(headers::ORIGINAL_TOPIC), Some("orders"));
        for gone in DEAD_LETTER_HEADERS {
            assert_eq!(first.header(gone), None, "{gone}");
        }
        // Dead-lettered again and redriven again: the history grows.
        let mut again = first.clone();
        again.set_header(headers::DEAD_LETTER_CAUSE, "attempts-exhausted");
        let second = redriven(&again, "r.redrive");
        let history: Vec<serde_json::Value> =
            serde_json::from_str(second.header(headers::REDRIVE_HISTORY).unwrap()).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0]["cause"], "rejected");
        assert_eq!(history[0]["id"], "original");
        assert_eq!(history[1]["cause"], "attempts-exhausted");
    }

    #[test]
    fn filters_take_what_they_name() {
        let rejected = letter("rejected");
        let exhausted = letter("attempts-exhausted");
        let by_cause = Filter {
            causes: vec!["rejected".into()],
            ..Filter::default()
        };
        assert!(by_cause.matches(&rejected) && !by_cause.matches(&exhausted));
        let by_id = Filter {
            ids: vec!["original".into()],
            ..Filter::default()
        };
        assert!(by_id.matches(&rejected));
        let old = Filter {
            older_than: Some(Duration::from_secs(60)),
            ..Filter::default()
        };
        assert!(!old.matches(&rejected));
        let recent = Filter {
            newer_than: Some(Duration::from_secs(60)),
            ..Filter::default()
        };
        assert!(recent.matches(&rejected));
        let summary = Summary::of(&[rejected, exhausted]);
        assert_eq!(summary.count, 2);
        assert_eq!(summary.causes["rejected"], 1);
        assert!(summary.oldest_ms <= summary.newest_ms);
    }
}
