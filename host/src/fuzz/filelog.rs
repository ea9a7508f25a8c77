//! The file log's readers as fuzz targets: a single sealed line (record,
//! journal entry, snapshot), and whole files put where the log keeps them
//! (a topic segment, a group journal, a group snapshot) and read the way
//! Sluice reads them: `sluice log check`, which must change nothing; the
//! startup recovery; a group claiming and reading every record; compaction;
//! and a second check, which must then find nothing left to repair.
//!
//! Every input runs twice: as it is, and with each line that is a JSON
//! object sealed again with its correct checksum, since a mutation almost
//! always breaks the checksum and would otherwise never reach the JSON
//! behind it.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use super::{Target, fuzz, scratch_dir};
use crate::backend::SubscribeOptions;
use crate::backend::filelog::delivery::FileReceipt;
use crate::backend::filelog::journal::{GroupDisk, Op, STATE_FILE, journal_name};
use crate::backend::filelog::load::load;
use crate::backend::filelog::maintenance;
use crate::backend::filelog::record::{
    RecordHead, decode_message, encode_message, escape_name, seal, unescape_name, unseal,
};
use crate::backend::filelog::scan::Report;
use crate::backend::filelog::store::Store;
use crate::backend::filelog::{Fsync, Options};
use crate::message::Message;

const DICTIONARY: &[&[u8]] = &[
    b"\"offset\":",
    b"\"at\":",
    b"\"topic\":\"orders\"",
    b"\"id\":",
    b"\"key\":",
    b"\"ts\":",
    b"\"headers\":[[\"a\",\"b\"]]",
    b"\"payload\":",
    b"\"payload_b64\":\"AAE=\"",
    b",\"crc\":\"00000000\"}",
    b"{\"op\":\"claim\",\"topic\":\"orders\",\"claims\":[[0,1]]}",
    b"{\"op\":\"ack\",\"topic\":\"orders\",\"offset\":0}",
    b"{\"op\":\"nack\",\"topic\":\"orders\",\"offset\":0,\"visible_ms\":",
    b"{\"op\":\"start\",\"topic\":\"orders\",\"next\":",
    b"{\"op\":\"patterns\",\"patterns\":[\">\"]}",
    b"\"generation\":",
    b"\"patterns\":[\">\"]",
    b"\"topics\":{\"orders\":{\"next\":",
    b"\"pending\":{\"0\":[1,0]}",
];

pub const RECORD: Target = Target {
    name: "filelog_record",
    dictionary: DICTIONARY,
    max_len: 512,
};

pub const SEGMENT: Target = Target {
    name: "filelog_segment",
    dictionary: DICTIONARY,
    max_len: 2048,
};

pub const JOURNAL: Target = Target {
    name: "filelog_journal",
    dictionary: DICTIONARY,
    max_len: 2048,
};

pub const SNAPSHOT: Target = Target {
    name: "filelog_snapshot",
    dictionary: DICTIONARY,
    max_len: 1024,
};

#[test]
fn filelog_record() {
    fuzz(&RECORD, |bytes| {
        read_line(bytes);
        read_line(&reseal(bytes));
    });
}

#[test]
fn filelog_segment() {
    fuzz(&SEGMENT, |bytes| {
        for segment in [bytes.to_vec(), reseal(bytes)] {
            read_log(&[(segment_path(), &segment[..])]);
        }
    });
}

#[test]
fn filelog_journal() {
    fuzz(&JOURNAL, |bytes| {
        for journal in [bytes.to_vec(), reseal(bytes)] {
            read_log(&[
                (segment_path(), &TOPIC[..]),
                (group_dir().join(journal_name(0)), &journal[..]),
            ]);
        }
    });
}

#[test]
fn filelog_snapshot() {
    fuzz(&SNAPSHOT, |bytes| {
        for snapshot in [bytes.to_vec(), reseal(bytes)] {
            read_log(&[
                (segment_path(), &TOPIC[..]),
                (group_dir().join(STATE_FILE), &snapshot[..]),
            ]);
        }
    });
}

/// A line through every reader of the line format.
fn read_line(bytes: &[u8]) {
    if let Ok((offset, message)) = decode_message(bytes) {
        let line = encode_message(offset, 0, &message);
        let again = decode_message(line.as_bytes()).expect("a record Sluice writes reads back");
        assert_eq!(again, (offset, message), "a record changed on its way back");
    }
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if let Ok(text) = unseal(line) {
        let _ = serde_json::from_str::<RecordHead>(text);
        if let Ok(op) = serde_json::from_str::<Op>(text) {
            GroupDisk::default().apply(op);
        }
        let _ = serde_json::from_str::<GroupDisk>(text);
    }
    let name = String::from_utf8_lossy(bytes);
    if let Some(unescaped) = unescape_name(&name) {
        assert_eq!(
            escape_name(&unescaped),
            name,
            "a directory name is not canonical"
        );
    }
    assert_eq!(unescape_name(&escape_name(&name)).as_deref(), Some(&*name));
}

/// The segment the targets write a topic's records to.
fn segment_path() -> PathBuf {
    Path::new("topics/orders").join(format!("{:020}.ndjson", 0))
}

fn group_options() -> SubscribeOptions {
    SubscribeOptions::new(vec![">".to_string()], "fuzz")
}

/// The directory of the group [`group_options`] joins; the journal and
/// snapshot seeds were written by that group.
fn group_dir() -> PathBuf {
    Path::new("groups").join(escape_name(&group_options().group_key()))
}

/// A healthy segment beside the fuzzed group files, so a group's cursors
/// and pending deliveries meet records.
static TOPIC: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut segment = String::new();
    for offset in 0..4u64 {
        let message = Message::new("orders", format!("order {offset}")).with_key("k");
        segment.push_str(&encode_message(offset, 1_767_225_600_000, &message));
    }
    segment.into_bytes()
});

/// Lays out a log directory and reads it every way Sluice does.
fn read_log(files: &[(PathBuf, &[u8])]) {
    let dir = scratch_dir();
    let root = dir.path();
    for (path, bytes) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("in a directory")).expect("scratch space");
        std::fs::write(&path, bytes).expect("scratch space");
    }
    let before = contents(root);
    let mut report = Report::new(root, false);
    let _ = load(root, Fsync::Never, &mut report);
    assert!(
        contents(root) == before,
        "checking the log changed its files"
    );
    let options = Options {
        fsync: Fsync::Never,
        ..Options::default()
    };
    let Ok((store, _)) = Store::open(root, options) else {
        return;
    };
    consume(&store);
    let _ = maintenance::compact(&store);
    drop(store);
    let mut again = Report::new(root, false);
    if load(root, Fsync::Never, &mut again).is_ok() {
        let left: Vec<String> = again.findings.iter().map(ToString::to_string).collect();
        assert!(
            left.is_empty(),
            "the log still has problems after recovery: {}",
            left.join("; ")
        );
    }
}

/// Joins the group, claims and reads what it can, and settles some of it
/// (acks, nacks with a delay) so compaction finds work.
fn consume(store: &Store) {
    let Ok((key, member)) = store.subscribe(&group_options()) else {
        return;
    };
    let Ok((claimed, _)) = store.claim(&key, member, Duration::from_secs(30), 10_000) else {
        return;
    };
    for (i, delivery) in store.read(&key, claimed).iter().enumerate() {
        let receipt = delivery
            .receipt
            .get::<FileReceipt>()
            .expect("a file log receipt");
        let _ = match i % 3 {
            0 => store.ack(&key, receipt),
            1 => store.nack(&key, receipt, Duration::from_secs(60)),
            _ => Ok(()),
        };
    }
}

/// Every file under `root` with its bytes, in order.
fn contents(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort();
    out
}

/// The input with each line that is a JSON object sealed with its correct
/// checksum, replacing the one it had.
fn reseal(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 64);
    for piece in bytes.split_inclusive(|b| *b == b'\n') {
        let (line, newline) = match piece.strip_suffix(b"\n") {
            Some(line) => (line, true),
            None => (piece, false),
        };
        match resealed(line) {
            Some(sealed) => out.extend_from_slice(sealed.trim_end_matches('\n').as_bytes()),
            None => out.extend_from_slice(line),
        }
        if newline {
            out.push(b'\n');
        }
    }
    out
}

fn resealed(line: &[u8]) -> Option<String> {
    const SUFFIX_LEN: usize = 18;
    let text = std::str::from_utf8(line).ok()?;
    let body = match text.len().checked_sub(SUFFIX_LEN) {
        Some(cut) if text.is_char_boundary(cut) && text[cut..].starts_with(",\"crc\":\"") => {
            format!("{}}}", &text[..cut])
        }
        _ => text.to_string(),
    };
    (body.len() > 2 && body.starts_with('{') && body.ends_with('}')).then(|| seal(body))
}
