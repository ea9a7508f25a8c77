//! What the Kafka backend reads from the broker, as fuzz targets.
//!
//! Record headers: another producer may send any bytes as a header's name
//! or value, or no value at all; Sluice must read them lossily, never
//! panic. Headers Sluice writes must read back as the message's id and
//! headers, unchanged. An input is NUL-separated header names and values;
//! a value whose first byte is 0xFF stands for a header without a value.
//!
//! Commit metadata: the attempt counts and settled ranges an earlier owner
//! of a partition left with its commit, which any client of the group may
//! have written instead. The next owner's books must take whatever it says
//! and go on delivering, settling and committing.

use rdkafka::bindings::{rd_kafka_header_add, rd_kafka_headers_t};
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};
use rdkafka::types::RDKafkaRespErr;

use super::{Target, fields, fuzz};
use crate::backend::kafka::ledger::{Ledger, Prior};
use crate::backend::kafka::wire::{ID, headers, read_headers};
use crate::message::Message;

pub const TARGET: Target = Target {
    name: "kafka_headers",
    dictionary: &[b"sluice-id\0", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\0"],
    max_len: 256,
};

#[test]
fn kafka_headers() {
    fuzz(&TARGET, |bytes| {
        let parts = fields(bytes);
        let pairs: Vec<(&[u8], Option<&[u8]>)> = parts
            .chunks(2)
            .map(|pair| {
                let value = pair.get(1).copied().unwrap_or_default();
                (pair[0], (value.first() != Some(&0xff)).then_some(value))
            })
            .collect();
        let (id, read) = read_headers(raw_headers(&pairs).as_borrowed());
        let ids = pairs
            .iter()
            .filter(|(name, _)| *name == ID.as_bytes())
            .count();
        assert_eq!(read.len() + usize::from(id.is_some()), pairs.len());
        assert_eq!(id.is_some(), ids > 0);

        let mut message = Message::new("orders", "");
        for (name, value) in &pairs {
            let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
            message
                .headers
                .push((text(name), value.map(text).unwrap_or_default()));
        }
        let (id, read) = read_headers(headers(&message).as_borrowed());
        assert_eq!(id.as_deref(), Some(message.id.as_str()));
        assert_eq!(read, message.headers, "headers changed on the way");
    });
}

pub const METADATA: Target = Target {
    name: "kafka_commit_metadata",
    dictionary: &[
        b"v1;",
        b";",
        b":",
        b",",
        b"-",
        b"2147483647",
        b"-2147483648",
    ],
    max_len: 256,
};

#[test]
fn kafka_commit_metadata() {
    fuzz(&METADATA, |bytes| {
        let prior = Prior::parse(&String::from_utf8_lossy(bytes));
        if prior.attempts.len() <= 32 && prior.settled.len() <= 32 {
            assert_eq!(Prior::parse(&prior.encode()), prior, "metadata changed");
        }
        // The next owner of the partition, receiving the first offsets and
        // settling them every way.
        let mut ledger = Ledger::new(1, Some(0), prior);
        for offset in 0..8 {
            ledger.receive(offset, Message::new("orders", ""), || 0);
        }
        for offset in 0..8 {
            let Some((_, attempt)) = ledger.hand_out(offset, 1) else {
                continue;
            };
            if offset % 2 == 0 {
                ledger.ack(offset);
            } else if ledger.nack(offset, attempt) {
                let _ = ledger.superseded(offset, attempt);
                ledger.hand_out(offset, 2);
            }
        }
        ledger.release(2);
        if let Some(commit) = ledger.due_commit() {
            ledger.committed(commit);
        }
    });
}

/// Headers as another producer may send them: names and values of any
/// bytes, which rdkafka's own API (taking `&str` names) cannot build.
fn raw_headers(pairs: &[(&[u8], Option<&[u8]>)]) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(pairs.len());
    // A `BorrowedHeaders` reference is rdkafka's handle on the native list
    // itself; this is how rdkafka turns one into the other.
    let native = owned.as_borrowed() as *const BorrowedHeaders as *mut rd_kafka_headers_t;
    for (name, value) in pairs {
        let (value, size) = match value {
            Some(value) => (value.as_ptr().cast(), value.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is the writable list `owned` holds; name and
        // value are valid for the sizes given, and librdkafka copies both.
        let error = unsafe {
            rd_kafka_header_add(
                native,
                name.as_ptr().cast(),
                name.len() as isize,
                value,
                size,
            )
        };
        assert_eq!(error, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    owned
}
