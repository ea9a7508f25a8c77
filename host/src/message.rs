//! The message as the host sees it, independent of any backend or plugin.

use std::time::{SystemTime, UNIX_EPOCH};

/// A message travelling through Sluice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique id, given once at first publish and kept across redeliveries.
    pub id: String,
    /// Concrete topic (never a pattern).
    pub topic: String,
    /// Partitioning and ordering key.
    pub key: Option<String>,
    /// Ordered name/value pairs; names may repeat.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    /// Milliseconds since the Unix epoch at first publish.
    pub timestamp_ms: u64,
}

impl Message {
    /// A new message with a fresh time-ordered id.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            id: uuid::Uuid::now_v7().to_string(),
            topic: topic.into(),
            key: None,
            headers: Vec::new(),
            payload: payload.into(),
            timestamp_ms: now_ms(),
        }
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// What a backend delivers in place of a stored message it cannot
    /// decode (malformed headers, a broken record): its raw bytes, marked
    /// so the route dead-letters it (cause `undecodable`) unhandled instead
    /// of failing the batch around it.
    pub fn undecodable(
        id: impl Into<String>,
        topic: impl Into<String>,
        raw: Vec<u8>,
        error: impl std::fmt::Display,
    ) -> Self {
        Message {
            id: id.into(),
            topic: topic.into(),
            key: None,
            headers: vec![(headers::UNDECODABLE.into(), format!("{error:#}"))],
            payload: raw,
            timestamp_ms: now_ms(),
        }
    }

    /// Bytes the message takes: topic, key, headers and payload.
    pub fn size(&self) -> usize {
        self.topic.len()
            + self.key.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
            + self.payload.len()
    }

    /// Routes the message has passed through (its `sluice-hops` header).
    pub fn hops(&self) -> u32 {
        self.header(headers::HOPS)
            .and_then(|hops| hops.parse().ok())
            .unwrap_or(0)
    }

    /// Sets a header, replacing every earlier value of that name.
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.to_string(), value.into()));
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Header names the host sets; plugins and operators can rely on them.
/// Every name starting with `sluice-` is the host's: a plugin's output
/// cannot set one (the host drops them).
pub mod headers {
    /// Why a message was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "sluice-dead-letter-reason";
    /// `rejected`, `attempts-exhausted`, `hop-limit`, `too-large` or
    /// `undecodable`.
    pub const DEAD_LETTER_CAUSE: &str = "sluice-dead-letter-cause";
    /// The topic the message was consumed from.
    pub const ORIGINAL_TOPIC: &str = "sluice-original-topic";
    /// The id of the consumed message.
    pub const ORIGINAL_ID: &str = "sluice-original-id";
    /// How many times the message was attempted before it was dead-lettered.
    pub const ATTEMPTS: &str = "sluice-attempts";
    /// The route that dead-lettered the message.
    pub const ROUTE: &str = "sluice-route";
    /// On an output: the plugin version (first 12 hex digits of its
    /// SHA-256) that produced it.
    pub const PLUGIN_VERSION: &str = "sluice-plugin-version";
    /// On an output: the id of the input message it was produced from.
    pub const CAUSATION_ID: &str = "sluice-causation-id";
    /// On an output: routes its chain has passed through (its input's
    /// count plus one).
    pub const HOPS: &str = "sluice-hops";
    /// On a delivery a backend could not decode: why (its payload is the
    /// raw stored bytes).
    pub const UNDECODABLE: &str = "sluice-undecodable";
    /// W3C trace context: read from an input, and set on everything its
    /// delivery publishes, as a child of that delivery (see
    /// `router/trace.rs`).
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C vendor trace state, passed on with `traceparent`.
    pub const TRACESTATE: &str = "tracestate";
}
