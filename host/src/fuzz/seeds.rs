//! Writes the generated part of the seed corpus: files the file log itself
//! wrote (a segment, a journal, a snapshot) and envelopes, entries and
//! headers encoded by each backend's own code, so the seeds stay what
//! Sluice really reads. The config and URL seeds are written by hand.
//!
//! Run it after a format changes, and commit what it writes:
//! `cargo test -p sluice --features sluice/full --lib fuzz::seeds -- --ignored`.

use super::{corpus_dir, join_fields};
use crate::message::Message;

/// Messages of the kinds the readers meet: text and binary payloads, empty
/// ones, keys, repeated and awkward headers.
fn messages() -> Vec<Message> {
    vec![
        Message::new("orders", r#"{"order":42,"total":"19.99"}"#)
            .with_key("customer-7")
            .with_header("trace", "t-1")
            .with_header("trace", "t-2"),
        Message::new("orders", vec![0xff, 0x00, 0x10, 0x80]).with_header("content-type", "bytes"),
        Message::new("orders", ""),
        Message::new("orders", "zoë ✓")
            .with_key("k 1%")
            .with_header("spaced ", " value ")
            .with_header("line", "a\r\nb")
            .with_header("名前", "v"),
    ]
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).expect("the corpus directory");
    std::fs::write(dir.join(name), bytes).expect("a seed file");
}

#[test]
#[ignore = "rewrites the generated seed corpus"]
fn write_seed_corpus() {
    filelog();
    redis();
    nats();
    sqs();
    sql();
    kafka();
}

fn filelog() {
    use std::time::Duration;

    use crate::backend::SubscribeOptions;
    use crate::backend::filelog::delivery::FileReceipt;
    use crate::backend::filelog::maintenance;
    use crate::backend::filelog::store::Store;
    use crate::backend::filelog::{Fsync, Options};

    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path();
    let options = Options {
        fsync: Fsync::Never,
        ..Options::default()
    };
    let (store, _) = Store::open(root, options).expect("a new log");
    let group = SubscribeOptions::new(vec![">".to_string()], "fuzz");
    let (key, member) = store.subscribe(&group).expect("a group");
    store.publish(messages()).expect("published");
    let (claimed, _) = store
        .claim(&key, member, Duration::from_secs(30), 3)
        .expect("claimed");
    let deliveries = store.read(&key, claimed);
    let receipt = |i: usize| deliveries[i].receipt.get::<FileReceipt>().expect("ours");
    store.ack(&key, receipt(0)).expect("acked");
    store
        .nack(&key, receipt(1), Duration::from_secs(60))
        .expect("nacked");

    let segment = root.join("topics/orders").join(format!("{:020}.ndjson", 0));
    let segment = std::fs::read(segment).expect("the segment");
    let group_dir = root
        .join("groups")
        .join(crate::backend::filelog::record::escape_name(&key));
    let journal =
        std::fs::read(group_dir.join("journal-00000000000000000000.ndjson")).expect("the journal");
    write("filelog_segment", "orders.ndjson", &segment);
    write("filelog_journal", "claims-acks-nacks.ndjson", &journal);
    let lines: Vec<&[u8]> = segment.split_inclusive(|b| *b == b'\n').collect();
    write("filelog_record", "text-payload.line", lines[0]);
    write("filelog_record", "binary-payload.line", lines[1]);
    write(
        "filelog_record",
        "journal-claim.line",
        journal
            .split_inclusive(|b| *b == b'\n')
            .nth(1)
            .expect("a claim"),
    );

    maintenance::compact(&store).expect("compacted");
    let snapshot = std::fs::read(group_dir.join("state.json")).expect("the snapshot");
    write("filelog_snapshot", "state.json", &snapshot);
    write("filelog_record", "snapshot.line", &snapshot);
}

fn redis() {
    use crate::backend::redis::envelope;
    use crate::backend::redis::streams::entry_fields;

    for (i, message) in messages().iter().enumerate() {
        write(
            "redis_envelope",
            &format!("message-{i}"),
            &envelope::encode(message, i as u32),
        );
        if message.payload.contains(&0) {
            continue;
        }
        let fields = entry_fields(message).expect("a topic");
        let mut parts: Vec<&[u8]> = vec![b"1767225600000-0", b"sluice:orders"];
        for (name, value) in &fields {
            parts.extend([name.as_bytes(), &value[..]]);
        }
        write("redis_entry", &format!("entry-{i}"), &join_fields(parts));
    }
    write(
        "redis_entry",
        "foreign-entry",
        &join_fields([
            &b"1767225600000-1"[..],
            b"sluice:orders",
            b"+ts",
            b"17",
            b"payload",
            b"hi",
        ]),
    );
}

fn nats() {
    use crate::backend::nats::headers::encode;

    for (i, message) in messages().iter().enumerate() {
        write(
            "nats_headers",
            &format!("wire-{i}"),
            &super::nats::render(&encode(message)),
        );
        let mut parts = vec![message.key.as_deref().unwrap_or("").as_bytes()];
        for (name, value) in &message.headers {
            parts.extend([name.as_bytes(), value.as_bytes()]);
        }
        write("nats_headers", &format!("message-{i}"), &join_fields(parts));
    }
    write(
        "nats_headers",
        "foreign",
        b"NATS/1.0\r\nb: 2\r\na: 1\r\nsluice-order: a,=x=y\r\n\r\n",
    );
}

fn sqs() {
    use crate::backend::sqs::codec::encode;

    for (i, message) in messages().iter().enumerate() {
        let encoded = encode(message).expect("fits SQS");
        let kind = if encoded.meta_is_binary { "B" } else { "S" };
        let meta = format!("{kind}{}", encoded.meta);
        write(
            "sqs_message",
            &format!("message-{i}"),
            &join_fields([
                encoded.body.as_bytes(),
                meta.as_bytes(),
                b"1",
                b"1767225600000",
            ]),
        );
    }
    write(
        "sqs_message",
        "foreign",
        &join_fields([
            &b"hello"[..],
            b"-",
            b"2",
            b"1767225600000",
            b"colour",
            b"red",
        ]),
    );
}

fn sql() {
    for (i, message) in messages().iter().enumerate() {
        let headers = serde_json::to_string(&message.headers).expect("JSON");
        write("sql_row", &format!("headers-{i}"), headers.as_bytes());
    }
}

fn kafka() {
    use crate::backend::kafka::wire::ID;

    for (i, message) in messages().iter().enumerate() {
        let mut parts = vec![ID.as_bytes(), message.id.as_bytes()];
        for (name, value) in &message.headers {
            parts.extend([name.as_bytes(), value.as_bytes()]);
        }
        write("kafka_headers", &format!("record-{i}"), &join_fields(parts));
    }
    write("kafka_commit_metadata", "attempts", b"v1;3;2:2;");
    write(
        "kafka_commit_metadata",
        "attempts-and-settled",
        b"v1;7;1:3,5:2;0-2,4,6-7",
    );
}
