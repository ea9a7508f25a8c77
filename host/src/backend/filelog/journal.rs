//! A consumer group's durable state: an append-only journal of what
//! happened (claims, acks, delayed nacks), folded now and then into a
//! snapshot.
//!
//! Files in `groups/<group>/`: `state.json` (one sealed line: the snapshot,
//! with its `generation` G) and `journal-<G>.ndjson` (sealed ops since that
//! snapshot). Replaying the journal over the snapshot rebuilds the group. A
//! new snapshot is written as generation G + 1 in this order:
//! create the empty next journal; write `state.json` through a temporary
//! file, fsync, rename, fsync the directory; only then switch appends to the
//! new journal and delete the old one. A crash at any point leaves either
//! the old snapshot with its journal, or the new snapshot with its (empty)
//! journal; the other journal is stale and removed at startup.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::file::{LogFile, replace_atomically, sync_dir};
use super::options::Fsync;
use super::record::seal_value;
use super::scan::{Report, clean_leftovers, repair, scan};

pub const STATE_FILE: &str = "state.json";

/// One journal entry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// The group subscribes to these topics or patterns (too).
    Patterns {
        patterns: Vec<String>,
    },
    /// The group starts reading `topic` at `next` (a `latest` start).
    Start {
        topic: String,
        next: u64,
    },
    /// Deliveries handed out: (offset, attempt).
    Claim {
        topic: String,
        claims: Vec<(u64, u32)>,
    },
    Ack {
        topic: String,
        offset: u64,
    },
    /// Nacked with a delay: not to be redelivered before `visible_ms`.
    Nack {
        topic: String,
        offset: u64,
        visible_ms: u64,
    },
}

/// What a snapshot holds and what replaying a journal rebuilds.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct GroupDisk {
    #[serde(default)]
    pub generation: u64,
    pub patterns: Vec<String>,
    pub topics: BTreeMap<String, CursorDisk>,
}

/// A group's place in one topic.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct CursorDisk {
    /// Every offset below was delivered at least once.
    pub next: u64,
    /// Delivered and not acknowledged: offset → (attempts, visible_ms).
    #[serde(default)]
    pub pending: BTreeMap<u64, (u32, u64)>,
}

impl GroupDisk {
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Patterns { patterns } => {
                for pattern in patterns {
                    if !self.patterns.contains(&pattern) {
                        self.patterns.push(pattern);
                    }
                }
            }
            Op::Start { topic, next } => {
                let cursor = self.topics.entry(topic).or_default();
                cursor.next = cursor.next.max(next);
            }
            Op::Claim { topic, claims } => {
                let cursor = self.topics.entry(topic).or_default();
                for (offset, attempt) in claims {
                    let entry = cursor.pending.entry(offset).or_insert((0, 0));
                    *entry = (entry.0.max(attempt), 0);
                    cursor.next = cursor.next.max(offset.saturating_add(1));
                }
            }
            Op::Ack { topic, offset } => {
                if let Some(cursor) = self.topics.get_mut(&topic) {
                    cursor.pending.remove(&offset);
                }
            }
            Op::Nack {
                topic,
                offset,
                visible_ms,
            } => {
                if let Some(entry) = self
                    .topics
                    .get_mut(&topic)
                    .and_then(|c| c.pending.get_mut(&offset))
                {
                    entry.1 = visible_ms;
                }
            }
        }
    }
}

pub fn journal_name(generation: u64) -> String {
    format!("journal-{generation:020}.ndjson")
}

fn parse_journal_name(name: &str) -> Option<u64> {
    name.strip_prefix("journal-")?
        .strip_suffix(".ndjson")?
        .parse()
        .ok()
        // Its next snapshot could not be numbered.
        .filter(|generation| *generation < u64::MAX)
}

/// The open journal of a durable group.
pub struct Journal {
    dir: PathBuf,
    generation: u64,
    file: Arc<LogFile>,
}

impl Journal {
    /// Opens (creating if needed) the journal of a generation in `dir`.
    pub fn open(dir: &Path, generation: u64, fsync: Fsync) -> io::Result<Journal> {
        let fresh = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let path = dir.join(journal_name(generation));
        let file = match LogFile::open(&path, true) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let file = LogFile::create(&path)?;
                if fsync != Fsync::Never {
                    sync_dir(dir)?;
                }
                file
            }
            Err(e) => return Err(e),
        };
        if fresh && fsync != Fsync::Never {
            sync_dir(dir.parent().unwrap_or(Path::new(".")))?;
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            generation,
            file: Arc::new(file),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn bytes(&self) -> u64 {
        self.file.len()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends ops with one write; returns the file and its sync ticket.
    pub fn append(&self, ops: &[Op]) -> io::Result<(Arc<LogFile>, u64)> {
        let mut text = String::new();
        for op in ops {
            text.push_str(&seal_value(op));
        }
        let ticket = self.file.append(text.as_bytes())?;
        Ok((self.file.clone(), ticket))
    }

    /// Writes `disk` as the next generation's snapshot and starts its
    /// journal (see the module doc for why this order is crash-safe).
    pub fn rotate(&mut self, disk: &mut GroupDisk) -> io::Result<()> {
        let generation = self.generation + 1;
        let path = self.dir.join(journal_name(generation));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = LogFile::create(&path)?;
        disk.generation = generation;
        // The directory fsync inside also makes the new journal's entry durable.
        replace_atomically(&self.dir.join(STATE_FILE), seal_value(disk).as_bytes())?;
        let old = std::mem::replace(&mut self.file, Arc::new(file));
        self.generation = generation;
        if let Err(e) = std::fs::remove_file(old.path()) {
            tracing::warn!(file = %old.path().display(), "file log: cannot remove an old journal: {e}");
        }
        Ok(())
    }
}

/// Loads a group directory: the snapshot, then its journal. A missing or
/// damaged snapshot means every journal present is replayed in order.
/// Returns the state and whether a fresh snapshot should be written.
pub fn load_group(dir: &Path, report: &mut Report) -> io::Result<(GroupDisk, bool)> {
    clean_leftovers(dir, report)?;
    let state_path = dir.join(STATE_FILE);
    let mut disk = GroupDisk::default();
    let mut replay_all = true;
    if state_path.exists() {
        let scanned = scan(&state_path, |text| {
            let snapshot = serde_json::from_str::<GroupDisk>(text)
                .map_err(|e| format!("not a valid snapshot: {e}"))?;
            // The next snapshot takes the next generation.
            if snapshot.generation == u64::MAX {
                return Err(format!("generation {} out of range", snapshot.generation));
            }
            Ok(snapshot)
        })?;
        match (&scanned.good[..], scanned.is_clean()) {
            ([(_, snapshot)], true) => {
                disk = snapshot.clone();
                replay_all = false;
            }
            _ => {
                let problem = match scanned.bad.first().or(scanned.torn.as_ref()) {
                    Some(bad) => format!("damaged group snapshot: {}", bad.reason),
                    None => "group snapshot does not hold exactly one record".into(),
                };
                report.add(
                    &state_path,
                    None,
                    problem,
                    "quarantined; the group was rebuilt from its journals (messages since its \
                     last good position may be delivered again)",
                    "`recover` quarantines it and rebuilds the group from its journals",
                );
                if report.fix {
                    let bytes = std::fs::read(&state_path)?;
                    let target = report
                        .root
                        .join("quarantine")
                        .join(report.relative(&state_path));
                    super::file::append_synced(&target, &bytes)?;
                    std::fs::remove_file(&state_path)?;
                }
            }
        }
    }
    let mut journals: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let generation = parse_journal_name(e.file_name().to_str()?)?;
            Some((generation, e.path()))
        })
        .collect();
    journals.sort();
    let newest = journals.last().map(|(g, _)| *g);
    for (generation, path) in journals {
        if !replay_all && generation != disk.generation {
            report.add(
                &path,
                None,
                "journal left over from an interrupted snapshot".into(),
                "removed",
                "`recover` removes it",
            );
            if report.fix {
                std::fs::remove_file(&path)?;
            }
            continue;
        }
        let mut scanned = scan(&path, parse_op)?;
        if repair(&path, &scanned, report)? {
            scanned = scan(&path, parse_op)?;
        }
        for (_, op) in scanned.good {
            disk.apply(op);
        }
    }
    if replay_all {
        disk.generation = newest.unwrap_or(0);
    }
    // Several journals replayed means the usual one-journal layout must be
    // restored by a snapshot.
    Ok((disk, replay_all && newest.is_some_and(|n| n > 0)))
}

fn parse_op(text: &str) -> Result<Op, String> {
    serde_json::from_str(text).map_err(|e| format!("not a valid journal entry: {e}"))
}
