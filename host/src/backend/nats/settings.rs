//! The JetStream backend's URL parameters: where topics are kept and how
//! streams and consumers are set up (the table is in [`super::jetstream`]).

use std::time::Duration;

use anyhow::{Result, bail};
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};

use super::{COMMON_PARAMS, ServerUrl, parse_bool, parse_num};
use crate::backend::pattern;

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
}

impl Settings {
    pub fn parse(server: &mut ServerUrl, pairs: Vec<(String, String)>) -> Result<Self> {
        let mut settings = Settings {
            stream: None,
            subjects: None,
            prefix: "SLUICE".to_string(),
            retention: None,
            storage: None,
            replicas: None,
            max_age: None,
            max_bytes: None,
            max_msgs: None,
            duplicate_window: None,
            max_ack_pending: 1000,
            progress: true,
        };
        let ms = |key: &str, value: &str| -> Result<Duration> {
            Ok(Duration::from_millis(parse_num(SCHEME, key, value)?))
        };
        for (key, value) in pairs {
            if server.take_common(SCHEME, &key, &value)? {
                continue;
            }
            match key.as_str() {
                "stream" => settings.stream = Some(checked_name(&key, &value)?),
                "subjects" => {
                    let subjects: Vec<String> = value
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect();
                    for subject in &subjects {
                        pattern::validate(subject)
                            .map_err(|e| anyhow::anyhow!("{SCHEME} URL: subjects: {e}"))?;
                    }
                    if subjects.is_empty() {
                        bail!("{SCHEME} URL: subjects is empty");
                    }
                    settings.subjects = Some(subjects);
                }
                "stream_prefix" => settings.prefix = checked_name(&key, &value)?,
                "retention" => {
                    settings.retention = Some(match value.as_str() {
                        "limits" => RetentionPolicy::Limits,
                        "workqueue" => RetentionPolicy::WorkQueue,
                        "interest" => RetentionPolicy::Interest,
                        _ => bail!(
                            "{SCHEME} URL: retention must be limits, workqueue or interest, not `{value}`"
                        ),
                    })
                }
                "storage" => {
                    settings.storage = Some(match value.as_str() {
                        "file" => StorageType::File,
                        "memory" => StorageType::Memory,
                        _ => bail!("{SCHEME} URL: storage must be file or memory, not `{value}`"),
                    })
                }
                "replicas" => settings.replicas = Some(parse_num(SCHEME, &key, &value)?),
                "max_age_ms" => settings.max_age = Some(ms(&key, &value)?),
                "max_bytes" => settings.max_bytes = Some(parse_num(SCHEME, &key, &value)?),
                "max_msgs" => settings.max_msgs = Some(parse_num(SCHEME, &key, &value)?),
                "duplicate_window_ms" => settings.duplicate_window = Some(ms(&key, &value)?),
                "max_ack_pending" => settings.max_ack_pending = parse_num(SCHEME, &key, &value)?,
                "progress" => settings.progress = parse_bool(SCHEME, &key, &value)?,
                _ => bail!(
                    "{SCHEME} URL: unknown parameter `{key}` (known: stream, subjects, stream_prefix, \
                     retention, storage, replicas, max_age_ms, max_bytes, max_msgs, \
                     duplicate_window_ms, max_ack_pending, progress, {COMMON_PARAMS})"
                ),
            }
        }
        if settings.subjects.is_some() && settings.stream.is_none() {
            bail!("{SCHEME} URL: subjects needs stream (the stream to give them to)");
        }
        Ok(settings)
    }

    /// Applies the URL's stream parameters over `config`.
    pub fn apply(&self, config: &mut StreamConfig) {
        if let Some(subjects) = &self.subjects {
            config.subjects = subjects.clone();
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

fn checked_name(key: &str, value: &str) -> Result<String> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c == '/' || c == '\\')
    {
        bail!(
            "{SCHEME} URL: {key} `{value}` is not a valid stream name (no dots, wildcards, spaces or slashes)"
        );
    }
    Ok(value.to_string())
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
    }
}
