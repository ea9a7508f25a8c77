//! What the Redis backends read from the server as fuzz targets: the
//! binary envelope of pub/sub messages and retry entries, and the fields of
//! a topic stream's entry (which any tool may write).
//!
//! An entry input is NUL-separated fields: the entry id, the stream key,
//! then field names and values. A name starting with `+` makes its value a
//! simple string, with `:` an integer, with `_` a nil, as a server may
//! answer them; other values are bulk strings.

use std::collections::HashMap;

use ::redis::Value;
use ::redis::streams::StreamId;

use super::{Target, fields, fuzz};
use crate::backend::redis::envelope;
use crate::backend::redis::reader::{decode_entry, decode_retry};
use crate::backend::redis::streams::Keys;

pub const ENVELOPE: Target = Target {
    name: "redis_envelope",
    dictionary: &[
        b"SLv1",
        b"\0\0\0\0",
        b"\0\0\0\x01",
        b"\x7f\xff\xff\xff",
        b"\xff\xff\xff\xff",
    ],
    max_len: 256,
};

pub const ENTRY: Target = Target {
    name: "redis_entry",
    dictionary: &[
        b"1767225600000-0",
        b"sluice:orders",
        b"sluice:.retry:g",
        b"id\0",
        b"key\0",
        b"headers\0",
        b"payload\0",
        b"ts\0",
        b"m\0",
        b"+ts\0",
        b":ts\0",
        b"_key\0",
        b"[[\"a\",\"b\"]]",
        b"SLv1",
    ],
    max_len: 256,
};

#[test]
fn redis_envelope() {
    fuzz(&ENVELOPE, |bytes| {
        // Decoding is strict (no trailing bytes), so what decodes is exactly
        // what encoding the message again gives.
        if let Ok((message, attempts)) = envelope::decode(bytes) {
            assert_eq!(
                envelope::encode(&message, attempts),
                bytes,
                "an envelope decoded to something else"
            );
        }
    });
}

#[test]
fn redis_entry() {
    fuzz(&ENTRY, |bytes| {
        let mut parts = fields(bytes).into_iter();
        let id = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let stream = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let mut map = HashMap::new();
        while let Some(name) = parts.next() {
            let value = parts.next().unwrap_or_default();
            let (name, value) = match name.split_first() {
                Some((b'+', name)) => (name, Value::SimpleString(lossy(value))),
                Some((b':', name)) => (name, Value::Int(lossy(value).parse().unwrap_or(-1))),
                Some((b'_', name)) => (name, Value::Nil),
                _ => (name, Value::BulkString(value.to_vec())),
            };
            map.insert(lossy(name), value);
        }
        let entry = StreamId {
            id,
            map,
            ..StreamId::default()
        };
        let keys = Keys::new("sluice:");
        decode_entry(&keys, &stream, &mut entry.clone());
        decode_retry(&keys, &mut entry.clone());
    });
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
