//! The line format every file of the log uses (segments, group journals,
//! group snapshots): one JSON object per line, sealed by a CRC32 member
//! appended last, plus the message record itself and the mapping from topic
//! and group names to directory names.
//!
//! A sealed line is `{…,"crc":"xxxxxxxx"}\n`, where `xxxxxxxx` is the CRC32
//! (IEEE, lowercase hex) of the exact bytes of the object *without* that
//! member, i.e. of `{…}`. Checking needs no re-serialisation: strip the
//! fixed-size suffix, put the `}` back, hash. A line torn anywhere, or any
//! flipped byte, fails the check or the JSON parse.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::message::Message;

/// `,"crc":"` + 8 hex digits + `"}`.
const SUFFIX_LEN: usize = 18;
const SUFFIX_HEAD: &str = ",\"crc\":\"";

/// Turns a serialised JSON object into a sealed line, newline included.
pub fn seal(mut json: String) -> String {
    debug_assert!(json.starts_with('{') && json.ends_with('}') && json.len() > 2);
    let crc = crc32fast::hash(json.as_bytes());
    json.pop();
    // Writing to a String cannot fail.
    let _ = writeln!(json, "{SUFFIX_HEAD}{crc:08x}\"}}");
    json
}

/// Serialises and seals a value that serialises to a non-empty JSON object.
pub fn seal_value<T: Serialize>(value: &T) -> String {
    seal(serde_json::to_string(value).expect("log records serialise"))
}

/// Checks a line (without its newline) and returns it as text ready for a
/// JSON parser (the `crc` member is ignored by the record types).
pub fn unseal(line: &[u8]) -> std::result::Result<&str, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not valid UTF-8".to_string())?;
    if text.len() < SUFFIX_LEN + 2 || !text.is_char_boundary(text.len() - SUFFIX_LEN) {
        return Err("no checksum at the end of the line".into());
    }
    let (body, suffix) = text.split_at(text.len() - SUFFIX_LEN);
    let hex = suffix
        .strip_prefix(SUFFIX_HEAD)
        .and_then(|rest| rest.strip_suffix("\"}"))
        .filter(|hex| hex.len() == 8)
        .ok_or_else(|| "no checksum at the end of the line".to_string())?;
    let stored =
        u32::from_str_radix(hex, 16).map_err(|_| format!("checksum `{hex}` is not hex"))?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(body.as_bytes());
    hasher.update(b"}");
    let computed = hasher.finalize();
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    Ok(text)
}

/// A message as written to a segment.
#[derive(Serialize)]
struct RecordOut<'a> {
    offset: u64,
    /// When it was appended here (ms since the epoch); retention uses it.
    at: u64,
    topic: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    /// The message's own timestamp, kept as published.
    ts: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    headers: &'a [(String, String)],
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
}

/// A message as read back from a segment.
#[derive(Deserialize)]
struct RecordIn {
    offset: u64,
    topic: String,
    id: String,
    #[serde(default)]
    key: Option<String>,
    ts: u64,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
}

/// The fields the startup scan and compaction need, without the payload.
#[derive(Deserialize)]
pub struct RecordHead {
    pub offset: u64,
    pub at: u64,
    pub topic: String,
}

/// The sealed line of a message at `offset`, appended at `at`.
pub fn encode_message(offset: u64, at: u64, message: &Message) -> String {
    let (payload, payload_b64) = match std::str::from_utf8(&message.payload) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(BASE64.encode(&message.payload))),
    };
    seal_value(&RecordOut {
        offset,
        at,
        topic: &message.topic,
        id: &message.id,
        key: message.key.as_deref(),
        ts: message.timestamp_ms,
        headers: &message.headers,
        payload,
        payload_b64,
    })
}

/// Checks and decodes a segment line (newline optional); returns the
/// record's offset and the message.
pub fn decode_message(line: &[u8]) -> Result<(u64, Message)> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let text = unseal(line).map_err(anyhow::Error::msg)?;
    let record: RecordIn = serde_json::from_str(text)?;
    let payload = match (record.payload, record.payload_b64) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => BASE64.decode(encoded)?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => bail!("record has both payload and payload_b64"),
    };
    Ok((
        record.offset,
        Message {
            id: record.id,
            topic: record.topic,
            key: record.key,
            headers: record.headers,
            payload,
            timestamp_ms: record.ts,
        },
    ))
}

/// A topic or group name as a single, safe directory name: bytes outside
/// `[A-Za-z0-9._-]` become `%XX`, and so does a leading `.` (no hidden
/// files, no `.` or `..`).
pub fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, byte) in name.bytes().enumerate() {
        let keep =
            byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' || (byte == b'.' && i > 0);
        if keep {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The name a directory stands for, if it is one [`escape_name`] makes.
pub fn unescape_name(escaped: &str) -> Option<String> {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = escaped.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let name = String::from_utf8(out).ok()?;
    (escape_name(&name) == escaped).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_lines_round_trip_and_detect_damage() {
        let message = Message::new("orders.eu", "hello")
            .with_key("k")
            .with_header("a", "b");
        let line = encode_message(7, 1, &message);
        assert!(line.ends_with("\"}\n"));
        let (offset, back) = decode_message(line.as_bytes()).unwrap();
        assert_eq!(offset, 7);
        assert_eq!(back, message);

        let mut damaged = line.clone().into_bytes();
        let at = damaged.iter().position(|b| *b == b'h').unwrap();
        damaged[at] = b'j';
        let error = decode_message(&damaged).unwrap_err().to_string();
        assert!(error.contains("checksum mismatch"), "{error}");
        assert!(decode_message(&line.as_bytes()[..line.len() / 2]).is_err());
    }

    #[test]
    fn binary_payloads_use_base64() {
        let message = Message::new("t", vec![0xff, 0x00, 0xfe]);
        let line = encode_message(0, 0, &message);
        assert!(line.contains("payload_b64"));
        assert_eq!(decode_message(line.as_bytes()).unwrap().1, message);
    }

    #[test]
    fn names_escape_reversibly() {
        for name in ["orders.eu", "a/b", "..", ".hidden", "zoë", "g[t1,t2]", "%"] {
            let escaped = escape_name(name);
            assert!(
                escaped
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b))
            );
            assert!(!escaped.starts_with('.'));
            assert_eq!(unescape_name(&escaped).as_deref(), Some(name));
        }
        assert_eq!(escape_name("orders.eu"), "orders.eu");
        assert_eq!(unescape_name("a%2f"), None, "not canonical");
    }
}
