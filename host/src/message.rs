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

/// A message as one JSON object, the shape `sluice tail --json` prints
/// and `sluice publish --lines --json` reads back: `id`, `topic`, `key`,
/// `headers` (`[name, value]` pairs, in order), `timestamp_ms`, and the
/// payload as `payload` when it is UTF-8, else as `payload_base64`, so
/// that any message survives the round trip byte for byte.
pub mod json {
    use anyhow::{Context, Result, bail};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde_json::{Value, json};

    use super::Message;

    /// `message` as a JSON object, with `extra` fields added (e.g. the
    /// delivery's attempt).
    pub fn write(message: &Message, extra: &[(&str, Value)]) -> Value {
        let mut value = json!({
            "id": message.id,
            "topic": message.topic,
            "key": message.key,
            "headers": message.headers,
            "timestamp_ms": message.timestamp_ms,
        });
        let object = value.as_object_mut().expect("an object");
        match std::str::from_utf8(&message.payload) {
            Ok(text) => object.insert("payload".into(), text.into()),
            Err(_) => object.insert(
                "payload_base64".into(),
                BASE64.encode(&message.payload).into(),
            ),
        };
        for (name, field) in extra {
            object.insert((*name).into(), field.clone());
        }
        value
    }

    /// A new message to `topic` with the key, headers and payload of a
    /// line [`write`] made; its id, topic, time and anything else are
    /// ignored (a publish is a new message).
    pub fn read(line: &str, topic: &str) -> Result<Message> {
        let value: Value = serde_json::from_str(line).context("not a JSON object")?;
        let Value::Object(object) = value else {
            bail!("not a JSON object");
        };
        let payload = match (object.get("payload"), object.get("payload_base64")) {
            (Some(Value::String(text)), None) => text.clone().into_bytes(),
            (None, Some(Value::String(encoded))) => BASE64
                .decode(encoded)
                .context("`payload_base64` is not base64")?,
            (None, None) => bail!("no `payload` or `payload_base64`"),
            (Some(_), Some(_)) => bail!("both `payload` and `payload_base64`"),
            _ => bail!("`payload` and `payload_base64` must be strings"),
        };
        let mut message = Message::new(topic, payload);
        message.key = match object.get("key") {
            None | Some(Value::Null) => None,
            Some(Value::String(key)) => Some(key.clone()),
            Some(_) => bail!("`key` must be a string or null"),
        };
        if let Some(headers) = object.get("headers") {
            message.headers = serde_json::from_value(headers.clone())
                .context("`headers` must be a list of [name, value] pairs of strings")?;
        }
        Ok(message)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn any_message_survives_the_round_trip() {
            for payload in [b"plain text".to_vec(), vec![0, 159, 146, 150, 255, b'\n']] {
                let mut original = Message::new("from", payload)
                    .with_key("k")
                    .with_header("a", "1")
                    .with_header("a", "2 \"quoted\"\n");
                original.headers.push(("empty".into(), String::new()));
                let line = write(&original, &[("attempt", 3.into())]).to_string();
                assert!(!line.contains('\n'), "one line: {line}");
                let copy = read(&line, "to").unwrap();
                assert_eq!(copy.payload, original.payload);
                assert_eq!(copy.key, original.key);
                assert_eq!(copy.headers, original.headers);
                assert_eq!(copy.topic, "to");
                assert_ne!(copy.id, original.id);
            }
        }

        #[test]
        fn a_line_that_is_not_a_message_says_why() {
            for (line, why) in [
                ("[1]", "not a JSON object"),
                ("{}", "no `payload`"),
                (r#"{"payload_base64": "%%"}"#, "not base64"),
                (r#"{"payload": "x", "headers": [["a"]]}"#, "`headers`"),
                (r#"{"payload": "x", "key": 5}"#, "`key`"),
            ] {
                let error = format!("{:#}", read(line, "t").unwrap_err());
                assert!(error.contains(why), "{line}: {error}");
            }
        }
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
    /// On a redriven message: a JSON list of its earlier dead-lettering
    /// (cause, reason, attempts, route, original id, when), oldest first.
    pub const REDRIVE_HISTORY: &str = "sluice-redrive-history";
    /// On an output: the plugin version (first 12 hex digits of its
    /// SHA-256) that produced it.
    pub const PLUGIN_VERSION: &str = "sluice-plugin-version";
    /// On an output: the id of the input message it was produced from.
    pub const CAUSATION_ID: &str = "sluice-causation-id";
    /// On an output: routes its chain has passed through (its input's
    /// count plus one).
    pub const HOPS: &str = "sluice-hops";
    /// Where a request's reply goes: a topic of the requester's (on NATS
    /// core, also a native request's reply subject).
    pub const REPLY_TO: &str = "sluice-reply-to";
    /// Ties a reply to its request; the host copies it from a request onto
    /// the reply.
    pub const CORRELATION_ID: &str = "sluice-correlation-id";
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
