//! How a Sluice message is carried in NATS headers, and read back.
//!
//! - `Nats-Msg-Id`: the message id (JetStream deduplicates on it, so a
//!   publish retried after a lost acknowledgement is stored once);
//! - `sluice-key`: the key, absent when there is none;
//! - `sluice-ts`: the first-publish time in Unix milliseconds;
//! - user headers as NATS headers, as they are;
//! - `sluice-order`: the user headers' names in their order, because NATS
//!   headers are a map and Sluice headers are an ordered list with repeats.
//!   A header NATS cannot carry faithfully (a name that is not printable
//!   ASCII or has `:`, a value with a line break or outer spaces, which NATS
//!   trims, or a name that NATS or Sluice reserves) travels inside this list
//!   instead, percent-encoded.
//!
//! Messages from other NATS clients have none of these: they get the
//! fallback id and time the caller passes, and their headers sorted by name.

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{Context, Result};
use async_nats::{HeaderMap, HeaderName, HeaderValue};

use crate::message::Message;

pub const ID: &str = "Nats-Msg-Id";
pub const KEY: &str = "sluice-key";
pub const TIMESTAMP: &str = "sluice-ts";
pub const ORDER: &str = "sluice-order";
/// On a message delivered by NATS core: the subject a request expects its
/// answer on. Publish the answer to this topic.
pub use crate::message::headers::REPLY_TO;

fn reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower == KEY || lower == TIMESTAMP || lower == ORDER
}

fn carried_as_is(name: &str, value: &str) -> bool {
    !name.is_empty()
        && !reserved(name)
        && HeaderName::from_str(name).is_ok()
        && !value.contains(['\r', '\n'])
        && value.trim() == value
}

/// The NATS headers of a message.
pub fn encode(message: &Message) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(ID, HeaderValue::from_str(&message.id).unwrap_or_default());
    if let Some(key) = &message.key {
        map.insert(KEY, encode_value(key));
    }
    map.insert(TIMESTAMP, message.timestamp_ms.to_string().as_str());
    if message.headers.is_empty() {
        return map;
    }
    let mut order = Vec::with_capacity(message.headers.len());
    for (name, value) in &message.headers {
        if carried_as_is(name, value) {
            map.append(name.as_str(), value.as_str());
            order.push(escape(name));
        } else {
            order.push(format!("={}={}", escape(name), escape(value)));
        }
    }
    map.insert(ORDER, order.join(",").as_str());
    map
}

/// A key may hold anything; it is escaped only when NATS could not carry it.
fn encode_value(value: &str) -> HeaderValue {
    if !value.contains(['\r', '\n', '%']) && value.trim() == value {
        HeaderValue::from(value)
    } else {
        HeaderValue::from(format!("%{}", escape(value)))
    }
}

fn decode_value(value: &str) -> Result<String> {
    match value.strip_prefix('%') {
        Some(escaped) => unescape(escaped),
        None => Ok(value.to_string()),
    }
}

/// What a received NATS message says about itself.
pub struct Decoded {
    pub id: Option<String>,
    pub key: Option<String>,
    pub timestamp_ms: Option<u64>,
    pub headers: Vec<(String, String)>,
}

/// Reads the Sluice fields and the user headers of a received message.
pub fn decode(map: Option<&HeaderMap>) -> Result<Decoded> {
    let Some(map) = map else {
        return Ok(Decoded {
            id: None,
            key: None,
            timestamp_ms: None,
            headers: Vec::new(),
        });
    };
    let get = |name: &str| map.get(name).map(|v| v.as_str().to_string());
    let key = get(KEY).map(|k| decode_value(&k)).transpose()?;
    let timestamp_ms = get(TIMESTAMP).and_then(|t| t.parse().ok());
    let headers = match get(ORDER) {
        Some(order) => ordered(map, &order)?,
        // Published by Sluice with no user headers.
        None if timestamp_ms.is_some() => Vec::new(),
        None => foreign(map),
    };
    Ok(Decoded {
        id: get(ID),
        key,
        timestamp_ms,
        headers,
    })
}

/// Like [`decode`], but a malformed `sluice-order` (someone else's header of
/// that name) costs only the order: the message is still delivered.
pub fn decode_lossy(map: Option<&HeaderMap>) -> Decoded {
    decode(map).unwrap_or_else(|e| {
        tracing::warn!(
            "NATS message with unreadable Sluice headers ({e:#}); taking them as they are"
        );
        let map = map.expect("decoding only fails on headers");
        Decoded {
            id: map.get(ID).map(|v| v.as_str().to_string()),
            key: map.get(KEY).map(|v| v.as_str().to_string()),
            timestamp_ms: map.get(TIMESTAMP).and_then(|t| t.as_str().parse().ok()),
            headers: foreign(map),
        }
    })
}

fn ordered(map: &HeaderMap, order: &str) -> Result<Vec<(String, String)>> {
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut headers = Vec::new();
    for entry in order.split(',').filter(|e| !e.is_empty()) {
        if let Some(inline) = entry.strip_prefix('=') {
            let (name, value) = inline
                .split_once('=')
                .with_context(|| format!("malformed `{ORDER}` entry `{entry}`"))?;
            headers.push((unescape(name)?, unescape(value)?));
            continue;
        }
        let name = unescape(entry)?;
        // Looking up a name NATS cannot carry panics in async-nats; such an
        // entry was not written by Sluice.
        let header = HeaderName::from_str(&name)
            .ok()
            .with_context(|| format!("`{ORDER}` lists `{name}`, which is no header name"))?;
        let index = next.entry(name.clone()).or_default();
        let value = map
            .get_all(header)
            .nth(*index)
            .with_context(|| format!("header `{name}` is listed in `{ORDER}` but missing"))?;
        *index += 1;
        headers.push((name, value.as_str().to_string()));
    }
    Ok(headers)
}

/// Headers of a message from another NATS client: every header but ours,
/// sorted by name so the order at least does not change between reads.
fn foreign(map: &HeaderMap) -> Vec<(String, String)> {
    let mut names: Vec<&HeaderName> = map.iter().map(|(name, _)| name).collect();
    names.sort_by_key(|name| AsRef::<str>::as_ref(*name).to_string());
    let mut headers = Vec::new();
    for name in names {
        let name: &str = name.as_ref();
        if name == ID || name == KEY || name == TIMESTAMP {
            continue;
        }
        for value in map.get_all(name) {
            headers.push((name.to_string(), value.as_str().to_string()));
        }
    }
    headers
}

/// Percent-encodes all but ASCII letters, digits and `-_.~`.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn unescape(text: &str) -> Result<String> {
    super::percent_decode(text).context("escaped header")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: &Message) -> Decoded {
        decode(Some(&encode(message))).unwrap()
    }

    #[test]
    fn keeps_order_repeats_and_awkward_headers() {
        let message = Message::new("t", "x")
            .with_key("k 1%")
            .with_header("n", "1")
            .with_header("unicode", "zoë ✓")
            .with_header("n", "repeated")
            .with_header("spaced ", " value ")
            .with_header("Nats-Rollup", "all")
            .with_header("line", "a\r\nb")
            .with_header("名前", "v")
            .with_header("empty", "");
        let decoded = round_trip(&message);
        assert_eq!(decoded.headers, message.headers);
        assert_eq!(decoded.key, message.key);
        assert_eq!(decoded.id.as_deref(), Some(message.id.as_str()));
        assert_eq!(decoded.timestamp_ms, Some(message.timestamp_ms));
        let encoded = encode(&message);
        assert!(
            encoded.get("Nats-Rollup").is_none(),
            "reserved names are not sent as is"
        );
    }

    #[test]
    fn no_headers_and_foreign_messages() {
        let plain = Message::new("t", "x");
        assert!(round_trip(&plain).headers.is_empty());
        assert_eq!(round_trip(&plain).key, None);
        let mut map = HeaderMap::new();
        map.insert("b", "2");
        map.insert("a", "1");
        let decoded = decode(Some(&map)).unwrap();
        assert_eq!(
            decoded.headers,
            [
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string())
            ]
        );
        assert_eq!(decoded.id, None);
    }
}
