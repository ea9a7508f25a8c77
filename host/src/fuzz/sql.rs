//! A stored SQLite or PostgreSQL row as a fuzz target: its `headers`
//! column holds whatever was written there (by Sluice, another tool, or a
//! damaged page), and must become the message's headers or an undecodable
//! message that the route dead-letters, never a failed fetch or a panic.

use super::{Target, fuzz};
use crate::backend::sqlite::stored_message;
use crate::message::headers::UNDECODABLE;

pub const TARGET: Target = Target {
    name: "sql_row",
    dictionary: &[
        b"[",
        b"]",
        b"[\"a\",\"b\"]",
        b"\"\\u0000\"",
        b"\"\\ud800\"",
        b"{}",
    ],
    max_len: 256,
};

#[test]
fn sql_row() {
    fuzz(&TARGET, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let message = stored_message(
            i64::MAX,
            "m-1".into(),
            "orders".into(),
            Some("k".into()),
            &text,
            bytes.to_vec(),
            -1,
        );
        match serde_json::from_str::<Vec<(String, String)>>(&text) {
            Ok(headers) => assert_eq!(message.headers, headers),
            Err(_) => assert!(
                message.header(UNDECODABLE).is_some(),
                "bad headers were not marked undecodable"
            ),
        }
    });
}
