//! How a Sluice message travels as an SQS (or SNS) message.
//!
//! The body is the payload as it is when it is text SQS accepts (UTF-8
//! without control characters other than tab, CR and LF), so other tools
//! read it as written; otherwise (binary or empty payloads) it is base64.
//! Everything else rides in one message attribute, `sluice`, a JSON object:
//! `id`, `ts` (ms since the epoch), `topic` (a queue of a topic pattern
//! holds several), `key` (if any), `headers` (list of
//! `[name, value]` pairs, names may repeat) and `body` (`"base64"` or
//! `"empty"` when the body is not the payload itself). One attribute leaves
//! nine of SQS's ten for other tools, and passes through SNS raw delivery.
//!
//! A message without the attribute (sent by another tool) is still read:
//! its id is the SQS message id, its timestamp SQS's `SentTimestamp`, its
//! topic the queue's (its pattern, on a pattern queue), its other string
//! attributes become headers, and its body the payload.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use aws_sdk_sqs::types::{
    Message as SqsMessage, MessageAttributeValue, MessageSystemAttributeName,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::message::Message;

/// The message attribute that carries the message's id, key and headers.
pub const META_ATTRIBUTE: &str = "sluice";
/// What SQS and SNS accept per message, and per batch request in total.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

#[derive(Serialize, Deserialize)]
struct Meta {
    id: String,
    ts: u64,
    /// Absent in messages of Sluice before patterns: their queue's topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<BodyEncoding>,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum BodyEncoding {
    Base64,
    Empty,
}

/// A message ready to send: its body and the `sluice` attribute.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub body: String,
    /// JSON; sent as a `Binary` attribute when it holds characters SQS
    /// refuses in a `String` one.
    pub meta: String,
    pub meta_is_binary: bool,
}

impl Encoded {
    /// What SQS counts against its size limit: body, attribute name, type
    /// and value.
    pub fn size(&self) -> usize {
        self.body.len() + META_ATTRIBUTE.len() + "Binary".len() + self.meta.len()
    }

    pub fn sqs_attribute(&self) -> MessageAttributeValue {
        let builder = MessageAttributeValue::builder();
        let builder = if self.meta_is_binary {
            builder
                .data_type("Binary")
                .binary_value(aws_sdk_sqs::primitives::Blob::new(self.meta.as_bytes()))
        } else {
            builder.data_type("String").string_value(&self.meta)
        };
        builder.build().expect("data type is set")
    }

    pub fn sns_attribute(&self) -> aws_sdk_sns::types::MessageAttributeValue {
        let builder = aws_sdk_sns::types::MessageAttributeValue::builder();
        let builder = if self.meta_is_binary {
            builder
                .data_type("Binary")
                .binary_value(aws_sdk_sns::primitives::Blob::new(self.meta.as_bytes()))
        } else {
            builder.data_type("String").string_value(&self.meta)
        };
        builder.build().expect("data type is set")
    }
}

/// Encodes a message; fails if it is larger than SQS accepts.
pub fn encode(message: &Message) -> Result<Encoded> {
    let (body, encoding) = match std::str::from_utf8(&message.payload) {
        Ok("") => ("-".to_string(), Some(BodyEncoding::Empty)),
        Ok(text) if text.chars().all(sqs_accepts) => (text.to_string(), None),
        _ => (BASE64.encode(&message.payload), Some(BodyEncoding::Base64)),
    };
    let meta = Meta {
        id: message.id.clone(),
        ts: message.timestamp_ms,
        topic: Some(message.topic.clone()),
        key: message.key.clone(),
        headers: message.headers.clone(),
        body: encoding,
    };
    let meta = serde_json::to_string(&meta)?;
    let encoded = Encoded {
        meta_is_binary: !meta.chars().all(sqs_accepts),
        body,
        meta,
    };
    if encoded.size() > MAX_MESSAGE_BYTES {
        bail!(
            "message {} on topic `{}` takes {} bytes as an SQS message (payload {} bytes{}), more than SQS's {MAX_MESSAGE_BYTES}",
            message.id,
            message.topic,
            encoded.size(),
            message.payload.len(),
            if encoding == Some(BodyEncoding::Base64) {
                ", base64 as it is not text"
            } else {
                ""
            }
        );
    }
    Ok(encoded)
}

/// Characters SQS accepts in a body or string attribute.
fn sqs_accepts(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// What a received SQS message holds.
pub struct Received {
    pub message: Message,
    /// `ApproximateReceiveCount`: 1 on first delivery.
    pub attempt: u32,
    pub receipt_handle: String,
}

/// Decodes a message received from the queue of `topic` (or pattern).
pub fn decode(raw: SqsMessage, topic: &str) -> Result<Received> {
    let receipt_handle = raw
        .receipt_handle
        .clone()
        .context("SQS returned a message without a receipt handle")?;
    let system = raw.attributes.unwrap_or_default();
    let system_number = |name: MessageSystemAttributeName| -> Option<u64> {
        system.get(&name).and_then(|v| v.parse().ok())
    };
    let attempt = system_number(MessageSystemAttributeName::ApproximateReceiveCount)
        .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX).max(1));
    let sent_ms = system_number(MessageSystemAttributeName::SentTimestamp).unwrap_or(0);
    let body = raw.body.unwrap_or_default();
    let mut attributes: HashMap<String, MessageAttributeValue> =
        raw.message_attributes.unwrap_or_default();
    let message = match attributes.remove(META_ATTRIBUTE) {
        Some(value) => {
            let json: &[u8] = match (value.string_value(), value.binary_value()) {
                (Some(text), _) => text.as_bytes(),
                (None, Some(blob)) => blob.as_ref(),
                (None, None) => bail!("the `{META_ATTRIBUTE}` attribute has no value"),
            };
            let meta: Meta = serde_json::from_slice(json)
                .with_context(|| format!("the `{META_ATTRIBUTE}` attribute is not Sluice's"))?;
            let payload = match meta.body {
                None => body.into_bytes(),
                Some(BodyEncoding::Empty) => Vec::new(),
                Some(BodyEncoding::Base64) => BASE64
                    .decode(body.as_bytes())
                    .context("a base64 body does not decode")?,
            };
            Message {
                id: meta.id,
                topic: meta.topic.unwrap_or_else(|| topic.to_string()),
                key: meta.key,
                headers: meta.headers,
                payload,
                timestamp_ms: meta.ts,
            }
        }
        None => {
            let mut headers: Vec<(String, String)> = attributes
                .into_iter()
                .filter_map(|(name, value)| Some((name, value.string_value?.clone())))
                .collect();
            headers.sort();
            Message {
                id: raw.message_id.unwrap_or_default(),
                topic: topic.to_string(),
                key: None,
                headers,
                payload: body.into_bytes(),
                timestamp_ms: sent_ms,
            }
        }
    };
    Ok(Received {
        message,
        attempt,
        receipt_handle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_received(message: &Message) -> SqsMessage {
        let encoded = encode(message).unwrap();
        SqsMessage::builder()
            .receipt_handle("r")
            .message_id("sqs-id")
            .body(encoded.body.clone())
            .message_attributes(META_ATTRIBUTE, encoded.sqs_attribute())
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "3")
            .build()
    }

    #[test]
    fn round_trips_text_binary_and_empty_payloads() {
        for payload in [
            b"plain text, zo\xc3\xab \xe2\x9c\x93".to_vec(),
            vec![0u8, 1, 255, 10],
            Vec::new(),
            b"bell\x07".to_vec(),
        ] {
            let message = Message::new("orders.eu", payload)
                .with_key("k")
                .with_header("a", "1")
                .with_header("a", "\u{FFFF} is refused by SQS");
            let received = decode(as_received(&message), "orders.eu").unwrap();
            assert_eq!(received.message, message);
            assert_eq!(received.attempt, 3);
            assert_eq!(received.receipt_handle, "r");
        }
        // A pattern queue's messages say their own topic.
        let message = Message::new("orders.us", "x");
        let received = decode(as_received(&message), "orders.*").unwrap();
        assert_eq!(received.message.topic, "orders.us");

        let text = encode(&Message::new("t", "hello")).unwrap();
        assert_eq!(text.body, "hello");
        assert!(!text.meta_is_binary);
    }

    #[test]
    fn foreign_messages_are_read_too() {
        let raw = SqsMessage::builder()
            .receipt_handle("r")
            .message_id("sqs-id")
            .body("hi")
            .message_attributes(
                "colour",
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value("red")
                    .build()
                    .unwrap(),
            )
            .attributes(MessageSystemAttributeName::SentTimestamp, "1700000000000")
            .build();
        let received = decode(raw, "t").unwrap();
        assert_eq!(received.message.id, "sqs-id");
        assert_eq!(received.message.payload, b"hi");
        assert_eq!(received.message.headers, [("colour".into(), "red".into())]);
        assert_eq!(received.message.timestamp_ms, 1_700_000_000_000);
        assert_eq!(received.attempt, 1);
    }

    #[test]
    fn oversized_messages_are_refused_by_name() {
        let big = Message::new("t", vec![0u8; 200 * 1024]);
        let err = encode(&big).unwrap_err().to_string();
        assert!(err.contains(&big.id) && err.contains("base64"), "{err}");
    }
}
