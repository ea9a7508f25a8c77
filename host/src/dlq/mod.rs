//! Dead letters after the fact: what a route's dead-letter topic holds
//! (`list`, `show`) and dropping them (`purge`).
//!
//! Every operation reads the topic as the group the host keeps dead letters
//! for ([`DEAD_LETTER_GROUP`]), so a dead letter purged is gone from it and
//! from nothing else. Reading to look leaves every dead letter
//! in place: they are held under a long lease and released at the end.
//!

pub mod cli;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::{Backend, Delivery, Settlement, SubscribeOptions, Subscription};
use crate::message::{Message, headers, now_ms};
pub use crate::router::DEAD_LETTER_GROUP;

/// How long dead letters read only to look at stay held.
const LOOK_LEASE: Duration = Duration::from_secs(300);

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
        let subscription = self.subscribe(LOOK_LEASE).await?;
        let mut held: Vec<Delivery> = Vec::new();
        let mut seen = HashSet::new();
        let result = async {
            loop {
                let batch = subscription
                    .fetch(BATCH, Duration::from_millis(500))
                    .await?;
                if batch.is_empty() {
                    return anyhow::Ok(());
                }
                held.extend(batch);
            }
        }
        .await;
        release(subscription.as_ref(), &held).await;
        subscription.close().await?;
        result?;
        let mut letters: Vec<Message> = held
            .into_iter()
            .map(|d| d.message)
            .filter(|m| seen.insert(m.id.clone()) && filter.matches(m))
            .collect();
        letters.sort_by_key(|m| m.timestamp_ms);
        Ok(letters)
    }

    /// Drops the dead letters `filter` takes; returns how many.
    pub async fn purge(&self, filter: &Filter, mut progress: impl FnMut(u64)) -> Result<u64> {
        self.take(filter, &mut progress).await
    }

    /// Acks the dead letters `filter` takes; the others are released at
    /// the end.
    async fn take(&self, filter: &Filter, progress: &mut impl FnMut(u64)) -> Result<u64> {
        let subscription = self.subscribe(LOOK_LEASE).await?;
        let mut skipped = Vec::new();
        let mut done = 0u64;
        let result = async {
            loop {
                let batch = subscription
                    .fetch(BATCH, Duration::from_millis(500))
                    .await?;
                if batch.is_empty() {
                    return anyhow::Ok(());
                }
                let (taken, others): (Vec<Delivery>, Vec<Delivery>) =
                    batch.into_iter().partition(|d| filter.matches(&d.message));
                skipped.extend(others);
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
