//! How a plain `sqs://` publisher finds the groups of a topic: every group
//! has a queue named `<prefix><topic part>--<group part>`, so the queues
//! listed with the prefix `<prefix><topic part>--` are the topic's groups.
//!
//! A listing is trusted for `discover_ms` and then asked again, so a group
//! created by another process starts receiving within about that time (and
//! SQS itself may take a while to list a new queue); what was published
//! before a publisher saw the group never reaches it. Groups subscribed in
//! this process are known at once: every backend handle on the same
//! account, endpoint and prefix shares one directory.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use anyhow::Result;
use aws_sdk_sqs::Client;
use tokio::time::Instant;

use super::names::Names;
use super::queues::list_group_queues;

/// The group queues of topics, as last listed or registered here.
pub struct Directory {
    sqs: Client,
    names: Names,
    refresh: Duration,
    listings: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Listing>>>>>,
    /// Queues of groups subscribed in this process, by topic.
    local: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Queues found gone, and when: SQS may list a deleted queue for up to
    /// a minute.
    gone: Mutex<HashMap<String, Instant>>,
}

/// How long a queue found gone is left out of listings.
const GONE_FOR: Duration = Duration::from_secs(120);

struct Listing {
    urls: BTreeSet<String>,
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
        {
            let mut gone = self.gone.lock().unwrap();
            gone.retain(|_, since| since.elapsed() < GONE_FOR);
            urls.retain(|url| !gone.contains_key(url));
        }
        if let Some(local) = self.local.lock().unwrap().get(topic) {
            urls.extend(local.iter().cloned());
        }
        Ok(urls.into_iter().collect())
    }

    /// A group of this process subscribed to `topic` with queue `url`.
    pub fn register(&self, topic: &str, url: &str) {
        self.gone.lock().unwrap().remove(url);
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
        self.gone
            .lock()
            .unwrap()
            .insert(url.to_string(), Instant::now());
    }
}
