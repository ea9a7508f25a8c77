//! The JetStream backend's URL parameters: where topics are kept and how
//! streams and consumers are set up (the table is in [`super::jetstream`]).

use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};

use super::{COMMON_PARAMS, ServerUrl, shards};
use crate::backend::pattern;
use crate::backend::url::BackendUrl;

pub(crate) const SCHEME: &str = "jetstream";

/// Where topics are kept and how streams and consumers are set up.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub stream: Option<String>,
    pub subjects: Option<Vec<String>>,
    pub prefix: String,
    retention: Option<RetentionPolicy>,
    storage: Option<StorageType>,
    replicas: Option<usize>,
    max_age: Option<Duration>,
    max_bytes: Option<i64>,
    max_msgs: Option<i64>,
    duplicate_window: Option<Duration>,
    pub max_ack_pending: i64,
    pub progress: bool,
    /// Key shards per topic (`shards=N`), see [`super::shards`].
    pub shards: Option<u32>,
}

impl Settings {
    pub const PARAMS: &[&str] = &[
        "stream",
        "subjects",
        "stream_prefix",
        "retention",
        "storage",
        "replicas",
        "max_age_ms",
        "max_bytes",
        "max_msgs",
        "duplicate_window_ms",
        "max_ack_pending",
        "progress",
        "shards",
    ];

    /// Takes the connection's parameters into `server`, and the rest.
    pub fn parse(server: &mut ServerUrl, mut url: BackendUrl) -> Result<Self> {
        server.take_common(&mut url)?;
        let settings = Settings {
            stream: url.take_with("stream", stream_name)?,
            subjects: url.take_with("subjects", subjects)?,
            prefix: url
                .take_with("stream_prefix", stream_name)?
                .unwrap_or_else(|| "SLUICE".to_string()),
            retention: url.take_choice(
                "retention",
                &[
                    ("limits", RetentionPolicy::Limits),
                    ("workqueue", RetentionPolicy::WorkQueue),
                    ("interest", RetentionPolicy::Interest),
                ],
            )?,
            storage: url.take_choice(
                "storage",
                &[("file", StorageType::File), ("memory", StorageType::Memory)],
            )?,
            replicas: url.take("replicas", "a number")?,
            max_age: url.take_ms("max_age_ms")?,
            max_bytes: url.take("max_bytes", "a number")?,
            max_msgs: url.take("max_msgs", "a number")?,
            duplicate_window: url.take_ms("duplicate_window_ms")?,
            max_ack_pending: url.take("max_ack_pending", "a number")?.unwrap_or(1000),
            progress: url.take_bool("progress")?.unwrap_or(true),
            shards: url.take_with("shards", shard_count)?,
        };
        url.finish(&[Self::PARAMS, COMMON_PARAMS].concat())?;
        if settings.subjects.is_some() && settings.stream.is_none() {
            return Err(url.error("subjects needs stream (the stream to give them to)"));
        }
        Ok(settings)
    }

    /// The subject a stream captures for `pattern`: with shards, every
    /// shard of it.
    pub fn stored_subject(&self, pattern: &str) -> String {
        match self.shards {
            Some(_) => shards::filter(pattern, None).unwrap_or_else(|_| pattern.to_string()),
            None => pattern.to_string(),
        }
    }

    /// Applies the URL's stream parameters over `config`.
    pub fn apply(&self, config: &mut StreamConfig) {
        if let Some(subjects) = &self.subjects {
            config.subjects = subjects
                .iter()
                .map(|subject| self.stored_subject(subject))
                .collect();
        }
        if let Some(retention) = self.retention {
            config.retention = retention;
        }
        if let Some(storage) = self.storage {
            config.storage = storage;
        }
        if let Some(replicas) = self.replicas {
            config.num_replicas = replicas;
        }
        if let Some(max_age) = self.max_age {
            config.max_age = max_age;
        }
        if let Some(max_bytes) = self.max_bytes {
            config.max_bytes = max_bytes;
        }
        if let Some(max_msgs) = self.max_msgs {
            config.max_messages = max_msgs;
        }
        if let Some(window) = self.duplicate_window {
            config.duplicate_window = window;
        }
    }
}

/// A stream name (`stream`, `stream_prefix`).
fn stream_name(value: &str) -> Result<String, String> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c == '/' || c == '\\')
    {
        return Err(
            "is not a valid stream name (no dots, wildcards, spaces or slashes)".to_string(),
        );
    }
    Ok(value.to_string())
}

/// A shard count (`shards`).
fn shard_count(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if (1..=shards::MAX).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {}", shards::MAX)),
    }
}

/// A stream's subjects, comma-separated.
fn subjects(value: &str) -> Result<Vec<String>, String> {
    let subjects: Vec<String> = value
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if subjects.is_empty() {
        return Err("names no subject".to_string());
    }
    for subject in &subjects {
        pattern::validate(subject).map_err(|e| format!("is not valid: {e}"))?;
    }
    Ok(subjects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nats::split_url;

    fn settings(query: &str) -> Result<Settings> {
        let (mut server, pairs) =
            split_url(&format!("jetstream://127.0.0.1:4222?{query}"), SCHEME)?;
        Settings::parse(&mut server, pairs)
    }

    #[test]
    fn parameters_parse_with_clear_errors() {
        let s =
            settings("stream=ORDERS&subjects=orders.>,jobs&retention=workqueue&max_age_ms=1000")
                .unwrap();
        assert_eq!(s.stream.as_deref(), Some("ORDERS"));
        assert_eq!(s.subjects.unwrap(), ["orders.>", "jobs"]);
        assert_eq!(s.retention, Some(RetentionPolicy::WorkQueue));
        assert_eq!(s.max_age, Some(Duration::from_secs(1)));
        let err = |q: &str| settings(q).unwrap_err().to_string();
        assert!(err("retention=forever").contains("retention"));
        assert!(err("stream=a.b").contains("stream"));
        assert!(err("subjects=x").contains("needs stream"));
        assert!(err("max_msgs=lots").contains("max_msgs"));
        assert!(err("colour=red").contains("unknown parameter `colour`"));
        assert!(err("shards=0").contains("shards"));
        assert!(err("shards=5000").contains("1 to 1024"));
        let sharded = settings("stream=ORDERS&subjects=orders.>,jobs&shards=8").unwrap();
        let mut config = StreamConfig::default();
        sharded.apply(&mut config);
        assert_eq!(config.subjects, ["orders.*.>", "jobs.*"]);
    }
}
