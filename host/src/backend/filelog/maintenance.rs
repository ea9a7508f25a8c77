//! Upkeep of an open log: the background thread (interval fsync, retention
//! once a second), retention itself, and compaction.
//!
//! Retention drops whole closed segments from the front of a topic when
//! every durable group that reads the topic has acknowledged all of them,
//! or when they are past `retention_ms` / beyond `retention_bytes`. The
//! limits win: a segment past them goes even if a group has not
//! acknowledged it (a warning names the group and how many it lost).
//! Topics no durable group reads keep everything up to the limits, so a
//! group created later can still read them.
//!
//! Compaction rewrites closed segments without the records every durable
//! reader has acknowledged or that are past `retention_ms`: new file,
//! fsync, rename over the old one, directory fsync. A crash midway leaves
//! the old segment and a `.tmp` file, which the startup check removes.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::file::{LogFile, sync_dir, tmp_path};
use super::group::{Cursor, Group};
use super::options::Fsync;
use super::record::{RecordHead, unseal};
use super::store::{State, Store};
use super::topic::{Entry, Topic};
use crate::message::now_ms;

const RETENTION_EVERY: Duration = Duration::from_secs(1);

/// Test hook: `SLUICE_FILELOG_FAILPOINT=compact-before-rename` aborts the
/// process after a compacted segment is written and synced but before it
/// replaces the old one, to prove such a crash loses nothing.
const FAILPOINT: &str = "SLUICE_FILELOG_FAILPOINT";

/// Starts the thread that keeps an open store tidy; it ends by itself
/// within a tick once the store is dropped.
pub fn spawn(store: &Arc<Store>) {
    let weak = Arc::downgrade(store);
    let tick = match store.options.fsync {
        Fsync::Interval => store.options.fsync_interval.min(RETENTION_EVERY),
        _ => RETENTION_EVERY,
    };
    let spawned = thread::Builder::new()
        .name("sluice-filelog".into())
        .spawn(move || {
            let mut last_retention = Instant::now();
            loop {
                thread::sleep(tick);
                let Some(store) = weak.upgrade() else {
                    return;
                };
                if store.options.fsync == Fsync::Interval {
                    store.sync_dirty();
                }
                if last_retention.elapsed() >= RETENTION_EVERY {
                    last_retention = Instant::now();
                    let mut state = store.lock_state();
                    if let Err(e) = enforce_retention(&store, &mut state, now_ms()) {
                        tracing::warn!(log = %store.root.display(), "file log retention: {e:#}");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "file log: cannot start the maintenance thread ({e}); no interval fsync or retention"
        );
    }
}

/// What retention or compaction removed from one topic.
#[derive(Debug, Default, Clone)]
pub struct Removed {
    pub topic: String,
    pub segments: usize,
    pub records: usize,
}

/// The lowest position of the durable groups that read `topic`; `None`
/// when none does.
fn consumed_below(groups: &std::collections::HashMap<String, Group>, topic: &str) -> Option<u64> {
    groups
        .values()
        .filter(|g| g.durable)
        .filter_map(|g| g.cursors.get(topic).map(Cursor::position))
        .min()
}

fn cutoff(store: &Store, now: u64) -> Option<u64> {
    store
        .options
        .retention
        .map(|r| now.saturating_sub(r.as_millis() as u64))
}

/// Drops old segments (see the module doc for which).
pub fn enforce_retention(store: &Store, state: &mut State, now: u64) -> Result<Vec<Removed>> {
    let options = &store.options;
    let cutoff = cutoff(store, now);
    let State { topics, groups, .. } = state;
    let mut removed = Vec::new();
    for (name, topic) in topics.iter_mut() {
        let consumed = consumed_below(groups, name);
        // An expired active segment is closed so that it can go too.
        if let (Some(cutoff), Some(active)) = (cutoff, topic.segments.last())
            && active.last_at.is_some_and(|at| at < cutoff)
        {
            topic
                .roll(options.fsync)
                .map_err(|e| store.fail(&format!("rolling topic `{name}`"), &e))?;
        }
        let mut total = topic.bytes();
        let mut done = Removed {
            topic: name.to_string(),
            ..Removed::default()
        };
        while topic.segments.len() > 1 {
            let segment = &topic.segments[0];
            let acknowledged = match segment.last_offset() {
                None => true,
                Some(last) => consumed.is_some_and(|c| last < c),
            };
            let expired = cutoff.is_some_and(|c| segment.last_at.is_some_and(|at| at < c));
            let oversize = options.retention_bytes.is_some_and(|b| total > b);
            if !(acknowledged || expired || oversize) {
                break;
            }
            let segment = topic.segments.remove(0);
            if !acknowledged {
                warn_unacknowledged(store, groups, name, &segment.entries, expired);
            }
            total -= segment.bytes();
            done.segments += 1;
            done.records += segment.entries.len();
            if let Err(e) = std::fs::remove_file(segment.file.path()) {
                tracing::warn!(file = %segment.file.path().display(), "file log: cannot delete a segment: {e}");
            }
            forget_below(groups, name, topic.low());
        }
        if done.segments > 0 {
            tracing::debug!(
                topic = %name, segments = done.segments, records = done.records,
                "file log retention dropped old segments"
            );
            removed.push(done);
        }
    }
    Ok(removed)
}

fn warn_unacknowledged(
    store: &Store,
    groups: &std::collections::HashMap<String, Group>,
    topic: &str,
    entries: &[Entry],
    expired: bool,
) {
    for group in groups.values().filter(|g| g.durable) {
        let Some(cursor) = group.cursors.get(topic) else {
            continue;
        };
        let lost = entries
            .iter()
            .filter(|e| !cursor.is_acked(e.offset))
            .count();
        if lost > 0 {
            tracing::warn!(
                log = %store.root.display(), topic, group = %group.key, lost,
                "file log retention ({}) dropped records the group had not acknowledged",
                if expired { "retention_ms" } else { "retention_bytes" }
            );
        }
    }
}

/// Groups forget deliveries of records that are gone, and skip past them.
fn forget_below(groups: &mut std::collections::HashMap<String, Group>, topic: &Arc<str>, low: u64) {
    for group in groups.values_mut() {
        let Some(cursor) = group.cursors.get_mut(topic) else {
            continue;
        };
        cursor.next = cursor.next.max(low);
        let gone: Vec<u64> = cursor.pending.range(..low).map(|(o, _)| *o).collect();
        for offset in gone {
            group.settle(topic, offset);
        }
    }
}

/// What `compact` did.
#[derive(Debug, Default)]
pub struct Compaction {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub retention: Vec<Removed>,
    pub rewritten: Vec<Removed>,
}

/// Applies retention, rewrites segments without dead records, and folds
/// every group journal into a snapshot.
pub fn compact(store: &Store) -> Result<Compaction> {
    store.check_usable()?;
    let mut state = store.lock_state();
    let bytes_before = disk_usage(&store.root);
    let now = now_ms();
    let retention = enforce_retention(store, &mut state, now)?;
    let cutoff = cutoff(store, now);
    let mut rewritten = Vec::new();
    {
        let State { topics, groups, .. } = &mut *state;
        for (name, topic) in topics.iter_mut() {
            let readers: Vec<&Cursor> = groups
                .values()
                .filter(|g| g.durable)
                .filter_map(|g| g.cursors.get(name))
                .collect();
            let acked =
                |offset: u64| !readers.is_empty() && readers.iter().all(|c| c.is_acked(offset));
            let done = compact_topic(store, topic, &acked, cutoff)?;
            if done.records > 0 {
                rewritten.push(done);
            }
        }
    }
    store.snapshot_groups(&mut state)?;
    Ok(Compaction {
        bytes_before,
        bytes_after: disk_usage(&store.root),
        retention,
        rewritten,
    })
}

fn compact_topic(
    store: &Store,
    topic: &mut Topic,
    acked: &dyn Fn(u64) -> bool,
    cutoff: Option<u64>,
) -> Result<Removed> {
    let name = topic.name.to_string();
    let mut done = Removed {
        topic: name.clone(),
        ..Removed::default()
    };
    // The active segment is closed first if any of it can go; the new
    // (empty) one keeps the offset counter in its name.
    if let Some(active) = topic.segments.last() {
        let expired = cutoff.is_some_and(|c| active.first_at.is_some_and(|at| at < c));
        if expired || active.entries.iter().any(|e| acked(e.offset)) {
            topic
                .roll(store.options.fsync)
                .map_err(|e| store.fail(&format!("rolling topic `{name}`"), &e))?;
        }
    }
    let mut index = 0;
    while index + 1 < topic.segments.len() {
        let segment = &mut topic.segments[index];
        let path = segment.file.path().to_path_buf();
        let bytes = std::fs::read(&path)?;
        let mut kept = Vec::with_capacity(bytes.len());
        let mut entries = Vec::with_capacity(segment.entries.len());
        let (mut first_at, mut last_at) = (None, None);
        for entry in &segment.entries {
            let line = &bytes[entry.pos as usize..(entry.pos + entry.len) as usize];
            let at = unseal(&line[..line.len() - 1])
                .ok()
                .and_then(|text| serde_json::from_str::<RecordHead>(text).ok())
                .map_or(u64::MAX, |head| head.at);
            if acked(entry.offset) || cutoff.is_some_and(|c| at < c) {
                continue;
            }
            entries.push(Entry {
                offset: entry.offset,
                pos: kept.len() as u32,
                len: entry.len,
            });
            first_at = Some(first_at.map_or(at, |f: u64| f.min(at)));
            last_at = Some(last_at.map_or(at, |l: u64| l.max(at)));
            kept.extend_from_slice(line);
        }
        let dropped = segment.entries.len() - entries.len();
        if dropped == 0 {
            index += 1;
            continue;
        }
        done.records += dropped;
        if entries.is_empty() {
            topic.segments.remove(index);
            std::fs::remove_file(&path)?;
            done.segments += 1;
            continue;
        }
        replace_segment(&path, &kept)?;
        segment.file = Arc::new(LogFile::open(&path, false)?);
        segment.entries = entries;
        segment.first_at = first_at;
        segment.last_at = last_at;
        index += 1;
    }
    Ok(done)
}

/// Writes the compacted segment next to the old one, syncs it, and renames
/// it into place.
fn replace_segment(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, contents)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    if std::env::var(FAILPOINT).as_deref() == Ok("compact-before-rename") {
        eprintln!("{FAILPOINT}: aborting before renaming {}", tmp.display());
        std::process::abort();
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Bytes held by the topic and group files.
pub fn disk_usage(root: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .filter_map(|e| e.ok())
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map_or(0, |m| m.len()),
                Err(_) => 0,
            })
            .sum()
    }
    walk(&root.join("topics")) + walk(&root.join("groups"))
}
