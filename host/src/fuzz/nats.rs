//! NATS headers as a fuzz target. An input is first a header block as it
//! travels (`NATS/1.0`, then `Name: value` lines), read the way the client
//! reads it before Sluice sees it; Sluice's decoding must then answer
//! (`decode`) or fall back (`decode_lossy`) without a panic, whatever
//! another publisher put in `sluice-order` or `sluice-key`.
//!
//! The same input is then read as a message (NUL-separated: the key, then
//! header names and values), which must come back unchanged through
//! `encode`, the wire and `decode`, whatever its names and values hold.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName};

use super::{Target, fields, fuzz};
use crate::backend::nats::headers::{decode, decode_lossy, encode};
use crate::message::Message;

pub const TARGET: Target = Target {
    name: "nats_headers",
    dictionary: &[
        b"NATS/1.0\r\n",
        b"NATS/1.0 503\r\n",
        b"Nats-Msg-Id: ",
        b"sluice-key: ",
        b"sluice-ts: ",
        b"sluice-order: ",
        b": ",
        b"=",
        b"%",
        b"%3A",
        b"%0D%0A",
        b"%C3%A9",
        b"%FF",
        b"\r\n ",
        b"\r\n\r\n",
    ],
    max_len: 512,
};

#[test]
fn nats_headers() {
    fuzz(&TARGET, |bytes| {
        if let Some(map) = wire_map(bytes) {
            let strict = decode(Some(&map));
            let lossy = decode_lossy(Some(&map));
            if let Ok(strict) = strict {
                assert_eq!(strict.headers, lossy.headers);
            }
        }
        round_trip(bytes);
    });
}

/// A message made of the input through encoding, the wire and decoding.
fn round_trip(bytes: &[u8]) {
    let mut parts = fields(bytes)
        .into_iter()
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let mut message = Message::new("orders", "");
    message.id = "fuzz-1".to_string();
    message.timestamp_ms = 1_767_225_600_000;
    message.key = parts.next().filter(|key| !key.is_empty());
    while let Some(name) = parts.next() {
        message
            .headers
            .push((name, parts.next().unwrap_or_default()));
    }
    let sent = render(&encode(&message));
    let map = wire_map(&sent).expect("the client reads what it sends");
    let decoded = decode(Some(&map)).expect("Sluice reads what it sends");
    assert_eq!(decoded.id.as_deref(), Some("fuzz-1"));
    assert_eq!(decoded.timestamp_ms, Some(message.timestamp_ms));
    assert_eq!(decoded.key, message.key, "the key changed on the way");
    assert_eq!(
        decoded.headers, message.headers,
        "headers changed on the way"
    );
}

/// A header block as the client writes it.
pub(super) fn render(map: &HeaderMap) -> Vec<u8> {
    let mut out = b"NATS/1.0\r\n".to_vec();
    for (name, values) in map.iter() {
        for value in values {
            out.extend_from_slice(AsRef::<str>::as_ref(name).as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A header block as the client (async-nats 0.51) reads it: what it
/// refuses never reaches Sluice.
fn wire_map(block: &[u8]) -> Option<HeaderMap> {
    let mut lines = std::str::from_utf8(block).ok()?.lines().peekable();
    lines.next()?.strip_prefix("NATS/1.0")?;
    let mut map = HeaderMap::new();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':')?;
        let name = HeaderName::from_str(name).ok()?;
        let mut value = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        value.truncate(value.trim_end().len());
        if value.contains('\r') {
            // The client panics on this itself (async-nats 0.51 asserts a
            // header value has no CR), so no such message reaches Sluice.
            return None;
        }
        map.append(name, value.as_str());
    }
    Some(map)
}
