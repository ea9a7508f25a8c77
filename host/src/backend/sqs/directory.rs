//! How a publisher finds the groups of a topic: every group has a queue
//! named `<prefix><topic part>--<group part>`, so the queues listed with the
//! prefix `<prefix><topic part>--` are the topic's groups; and every group
//! subscribed to a topic pattern has a queue listed with the prefix
//! `<prefix>-`, tagged with its pattern, which gets the messages of every
//! topic the pattern matches. Plain `sqs://` publishers send to both;
//! `sns+sqs://` publishers subscribe the matching pattern queues to their
//! topic's SNS topic (SNS itself has no patterns).
//!
//! A listing is trusted for `discover_ms` and then asked again, so a group
//! created by another process starts receiving within about that time (and
//! SQS itself may take a while to list a new queue); what was published
//! before a publisher saw the group never reaches it. Groups subscribed in
//! this process are known at once: every backend handle on the same
//! account, endpoint and prefix shares one directory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use anyhow::Result;
use aws_sdk_sqs::Client;
use tokio::time::Instant;

use super::names::Names;
use super::queues::{list_group_queues, pattern_of};
use crate::backend::pattern;

/// The group queues of topics, as last listed or registered here.
pub struct Directory {
    sqs: Client,
    names: Names,
    refresh: Duration,
    listings: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Listing>>>>>,
    /// Queues of groups subscribed in this process, by topic.
    local: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Pattern queues as last listed, with their patterns.
    patterns: tokio::sync::Mutex<Option<Listing<PatternQueues>>>,
    /// The pattern of every pattern queue whose tags were read (`None`: the
    /// queue has no pattern tag), so each queue is asked once.
    tagged: Mutex<HashMap<String, Option<String>>>,
    /// Pattern queues of groups subscribed in this process: URL to pattern.
    local_patterns: Mutex<PatternQueues>,
    /// Queues found gone, and when: SQS may list a deleted queue for up to
    /// a minute.
    gone: Mutex<HashMap<String, Instant>>,
}

/// Pattern queues by URL, with their patterns.
type PatternQueues = BTreeMap<String, String>;

/// How long a queue found gone is left out of listings.
const GONE_FOR: Duration = Duration::from_secs(120);

struct Listing<T = BTreeSet<String>> {
    urls: T,
    at: Instant,
}

/// One directory per account, endpoint and prefix in the process.
static SHARED: LazyLock<Mutex<HashMap<String, Weak<Directory>>>> = LazyLock::new(Default::default);

impl Directory {
    /// The process's directory for `scope` (what tells deployments apart:
    /// endpoint, region, credentials' key, prefix).
    pub fn shared(scope: String, sqs: Client, names: Names, refresh: Duration) -> Arc<Directory> {
        let mut shared = SHARED.lock().unwrap();
        shared.retain(|_, directory| directory.strong_count() > 0);
        if let Some(directory) = shared.get(&scope).and_then(Weak::upgrade) {
            return directory;
        }
        let directory = Arc::new(Directory {
            sqs,
            names,
            refresh,
            listings: Mutex::default(),
            local: Mutex::default(),
            patterns: tokio::sync::Mutex::default(),
            tagged: Mutex::default(),
            local_patterns: Mutex::default(),
            gone: Mutex::default(),
        });
        shared.insert(scope, Arc::downgrade(&directory));
        directory
    }

    /// The queue URLs of every group of `topic`.
    pub async fn queues_of(&self, topic: &str) -> Result<Vec<String>> {
        let slot = self
            .listings
            .lock()
            .unwrap()
            .entry(topic.to_string())
            .or_default()
            .clone();
        let mut urls = {
            // One listing at a time per topic; concurrent publishers wait
            // for it rather than list again.
            let mut listing = slot.lock().await;
            let fresh = listing
                .as_ref()
                .is_some_and(|l| l.at.elapsed() < self.refresh);
            if !fresh {
                let prefix = self.names.topic_queue_prefix(topic);
                let urls = list_group_queues(&self.sqs, &prefix).await?;
                *listing = Some(Listing {
                    urls: urls.into_iter().collect(),
                    at: Instant::now(),
                });
            }
            listing.as_ref().map(|l| l.urls.clone()).unwrap_or_default()
        };
        self.drop_gone(&mut urls);
        if let Some(local) = self.local.lock().unwrap().get(topic) {
            urls.extend(local.iter().cloned());
        }
        urls.extend(self.pattern_queues_of(topic).await?);
        Ok(urls.into_iter().collect())
    }

    /// The queue URLs of every group subscribed to a pattern that matches
    /// `topic`.
    pub async fn pattern_queues_of(&self, topic: &str) -> Result<BTreeSet<String>> {
        let mut urls: BTreeSet<String> = {
            let mut listing = self.patterns.lock().await;
            if listing
                .as_ref()
                .is_none_or(|l| l.at.elapsed() >= self.refresh)
            {
                *listing = Some(Listing {
                    urls: self.list_pattern_queues().await?,
                    at: Instant::now(),
                });
            }
            listing
                .as_ref()
                .map(|l| matching(&l.urls, topic))
                .unwrap_or_default()
        };
        self.drop_gone(&mut urls);
        urls.extend(matching(&self.local_patterns.lock().unwrap(), topic));
        Ok(urls)
    }

    /// Every pattern queue with its pattern, reading the tags of queues not
    /// seen before.
    async fn list_pattern_queues(&self) -> Result<PatternQueues> {
        let prefix = self.names.pattern_queue_prefix();
        let listed = list_group_queues(&self.sqs, &prefix).await?;
        // Queues no longer listed are forgotten, so ephemeral groups coming
        // and going leave nothing behind.
        self.tagged
            .lock()
            .unwrap()
            .retain(|url, _| listed.contains(url));
        let mut queues = PatternQueues::new();
        for url in listed {
            let known = self.tagged.lock().unwrap().get(&url).cloned();
            let pattern = match known {
                Some(pattern) => pattern,
                None => {
                    let pattern = pattern_of(&self.sqs, &url).await?;
                    self.tagged
                        .lock()
                        .unwrap()
                        .insert(url.clone(), pattern.clone());
                    pattern
                }
            };
            if let Some(pattern) = pattern {
                queues.insert(url, pattern);
            }
        }
        Ok(queues)
    }

    /// Leaves out queues found gone lately.
    fn drop_gone(&self, urls: &mut BTreeSet<String>) {
        let mut gone = self.gone.lock().unwrap();
        gone.retain(|_, since| since.elapsed() < GONE_FOR);
        urls.retain(|url| !gone.contains_key(url));
    }

    /// A group of this process subscribed to `topic` (or a topic pattern)
    /// with queue `url`.
    pub fn register(&self, topic: &str, url: &str) {
        self.gone.lock().unwrap().remove(url);
        if pattern::is_pattern(topic) {
            self.local_patterns
                .lock()
                .unwrap()
                .insert(url.to_string(), topic.to_string());
            return;
        }
        self.local
            .lock()
            .unwrap()
            .entry(topic.to_string())
            .or_default()
            .insert(url.to_string());
    }

    /// Queue `url` of `topic` is gone (deleted, or an ephemeral group
    /// closed): stop publishing to it.
    pub fn forget(&self, topic: &str, url: &str) {
        if let Some(local) = self.local.lock().unwrap().get_mut(topic) {
            local.remove(url);
        }
        self.local_patterns.lock().unwrap().remove(url);
        self.gone
            .lock()
            .unwrap()
            .insert(url.to_string(), Instant::now());
    }
}

/// The queues among `queues` whose pattern matches `topic`.
fn matching(queues: &PatternQueues, topic: &str) -> BTreeSet<String> {
    queues
        .iter()
        .filter(|(_, p)| pattern::matches(p, topic))
        .map(|(url, _)| url.clone())
        .collect()
}
