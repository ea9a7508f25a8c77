//! How a Sluice message is carried in a Kafka record, and read back.
//!
//! - the record key is the message key (so one key's messages share a
//!   partition), absent when there is none;
//! - the record timestamp (create time) is the first-publish time;
//! - the first header is `sluice-id`, the message id; the user headers follow
//!   as Kafka headers, in order, repeats kept (Kafka headers are an ordered
//!   list, like Sluice's, so nothing needs escaping);
//! - the payload is the record value.
//!
//! A record from another producer has no `sluice-id`: its id is made from
//! its position (`kafka:TOPIC:PARTITION:OFFSET`), which stays the same on
//! every redelivery. Keys and header values that are not UTF-8 are read
//! lossily.

use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};

use crate::message::{Message, now_ms};

/// The header holding the message id.
pub const ID: &str = "sluice-id";

/// The record headers of a message.
pub fn headers(message: &Message) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 1).insert(Header {
        key: ID,
        value: Some(message.id.as_str()),
    });
    for (name, value) in &message.headers {
        headers = headers.insert(Header {
            key: name.as_str(),
            value: Some(value.as_str()),
        });
    }
    headers
}

/// The Sluice message a consumed record carries.
pub fn decode(record: &BorrowedMessage<'_>) -> Message {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut id = None;
    let mut headers = Vec::new();
    if let Some(record_headers) = record.headers() {
        for header in record_headers.iter() {
            let value = header.value.map(text).unwrap_or_default();
            if id.is_none() && header.key == ID {
                id = Some(value);
            } else {
                headers.push((header.key.to_string(), value));
            }
        }
    }
    let id = id.unwrap_or_else(|| {
        format!(
            "kafka:{}:{}:{}",
            record.topic(),
            record.partition(),
            record.offset()
        )
    });
    let timestamp_ms = record
        .timestamp()
        .to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
        .unwrap_or_else(now_ms);
    Message {
        id,
        topic: record.topic().to_string(),
        key: record.key().map(text),
        headers,
        payload: record.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        timestamp_ms,
    }
}
