//! A received SQS message as a fuzz target: its body, the `sluice`
//! attribute (JSON, string or binary), SQS's own attributes and another
//! tool's string attributes. A message decodes or is refused with an error;
//! one that decodes must come back unchanged through `encode` and
//! `decode`.
//!
//! An input is NUL-separated fields: the body; the `sluice` attribute,
//! whose first byte says how it is sent (`S` string, `B` binary, `N` with
//! no value; anything else leaves it out); the receive count; the sent
//! timestamp; then names and values of other string attributes.

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    Message as SqsMessage, MessageAttributeValue, MessageSystemAttributeName,
};

use super::{Target, fields, fuzz};
use crate::backend::sqs::codec::{META_ATTRIBUTE, decode, encode};

pub const TARGET: Target = Target {
    name: "sqs_message",
    dictionary: &[
        b"S{\"id\":\"m-1\",\"ts\":1767225600000}",
        b"\"key\":",
        b"\"headers\":[[\"a\",\"b\"]]",
        b"\"body\":\"base64\"",
        b"\"body\":\"empty\"",
        b"\"ts\":",
        b"\"id\":",
        b"AAE=",
        b"====",
    ],
    max_len: 512,
};

#[test]
fn sqs_message() {
    fuzz(&TARGET, |bytes| {
        let Ok(received) = decode(received(bytes), "orders") else {
            return;
        };
        let Ok(encoded) = encode(&received.message) else {
            return;
        };
        let again = SqsMessage::builder()
            .receipt_handle("r")
            .message_id("sqs-id")
            .body(encoded.body.clone())
            .message_attributes(META_ATTRIBUTE, encoded.sqs_attribute())
            .build();
        let again = decode(again, "orders").expect("Sluice reads what it sends");
        assert_eq!(
            again.message, received.message,
            "a message changed on the way"
        );
    });
}

/// The message an input describes, as the SDK hands it over.
fn received(bytes: &[u8]) -> SqsMessage {
    let text = |field: &[u8]| String::from_utf8_lossy(field).into_owned();
    let mut parts = fields(bytes).into_iter();
    let mut message = SqsMessage::builder()
        .receipt_handle("r")
        .message_id("sqs-id")
        .body(text(parts.next().unwrap_or_default()));
    let meta = match parts.next().unwrap_or_default().split_first() {
        Some((b'S', json)) => Some(
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(text(json)),
        ),
        Some((b'B', json)) => Some(
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new(json)),
        ),
        Some((b'N', _)) => Some(MessageAttributeValue::builder().data_type("String")),
        _ => None,
    };
    if let Some(meta) = meta {
        message = message.message_attributes(META_ATTRIBUTE, meta.build().expect("typed"));
    }
    if let Some(count) = parts.next() {
        message = message.attributes(
            MessageSystemAttributeName::ApproximateReceiveCount,
            text(count),
        );
    }
    if let Some(sent) = parts.next() {
        message = message.attributes(MessageSystemAttributeName::SentTimestamp, text(sent));
    }
    while let Some(name) = parts.next() {
        let value = MessageAttributeValue::builder()
            .data_type("String")
            .string_value(text(parts.next().unwrap_or_default()))
            .build()
            .expect("typed");
        message = message.message_attributes(text(name), value);
    }
    message.build()
}
