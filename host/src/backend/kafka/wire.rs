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
//! every redelivery. Keys, header names and header values that are not
//! UTF-8 are read lossily.

use std::ffi::CStr;
use std::ptr;

use rdkafka::Message as _;
use rdkafka::bindings::{rd_kafka_header_get_all, rd_kafka_headers_t};
use rdkafka::message::{BorrowedHeaders, BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

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
    let (id, headers) = record.headers().map(read_headers).unwrap_or_default();
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

/// The message id and the user headers of a record's headers, in order.
/// Names are read as bytes, lossily like values: rdkafka's own accessors
/// panic on a name that is not UTF-8, which any producer may send.
pub fn read_headers(record_headers: &BorrowedHeaders) -> (Option<String>, Vec<(String, String)>) {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    // A `BorrowedHeaders` reference is rdkafka's handle on the native list
    // itself: rdkafka casts one into the other.
    let native = record_headers as *const BorrowedHeaders as *const rd_kafka_headers_t;
    let mut id = None;
    let mut headers = Vec::new();
    for index in 0..record_headers.count() {
        let (mut name, mut value, mut size) = (ptr::null(), ptr::null(), 0);
        // SAFETY: the list is valid while `record_headers` is borrowed,
        // `index` is below its count, and the out-pointers are valid for
        // writes.
        let error =
            unsafe { rd_kafka_header_get_all(native, index, &mut name, &mut value, &mut size) };
        if error != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            break;
        }
        // SAFETY: librdkafka hands out a NUL-terminated name and, unless
        // null, a value of `size` bytes, both owned by the list.
        let name = text(unsafe { CStr::from_ptr(name) }.to_bytes());
        let value = if value.is_null() {
            String::new()
        } else {
            // SAFETY: as above.
            text(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
        };
        if id.is_none() && name == ID {
            id = Some(value);
        } else {
            headers.push((name, value));
        }
    }
    (id, headers)
}
