//! Loading a log directory into memory: every topic (the startup check of
//! its segments) and every group (snapshot plus journal), reconciled so no
//! offset a group has seen is ever handed out again.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use super::group::Group;
use super::journal::{Journal, load_group};
use super::options::Fsync;
use super::record::unescape_name;
use super::scan::Report;
use super::store::State;
use super::topic::Topic;

/// Reads a log directory into memory. With `report.fix` every problem is
/// repaired as it is found; otherwise nothing is written.
pub fn load(root: &Path, fsync: Fsync, report: &mut Report) -> io::Result<State> {
    let (topics_dir, groups_dir) = (root.join("topics"), root.join("groups"));
    if report.fix {
        std::fs::create_dir_all(&topics_dir)?;
        std::fs::create_dir_all(&groups_dir)?;
    }
    let mut topics = BTreeMap::new();
    for (name, path) in named_dirs(&topics_dir)? {
        let topic = Topic::load(&path, &name, report)?;
        topics.insert(topic.name.clone(), topic);
    }
    let mut disks = Vec::new();
    for (key, path) in named_dirs(&groups_dir)? {
        let (disk, needs_snapshot) = load_group(&path, report)?;
        disks.push((key, path, disk, needs_snapshot));
    }
    // A group that read past the end of a topic means records were lost (a
    // power failure without fsync=always, or a quarantined tail). Offsets go
    // on from where the group was, so it never mistakes a new message for
    // one it has seen.
    let mut floors: HashMap<String, u64> = HashMap::new();
    for (key, _, disk, _) in &disks {
        for (name, cursor) in &disk.topics {
            match topics.get_mut(name.as_str()) {
                Some(topic) if cursor.next > topic.next => {
                    tracing::warn!(
                        log = %root.display(), group = %key, topic = %name,
                        "file log: the group had read up to offset {} but the log ends at {}; \
                         records were lost (power failure without fsync=always, or a quarantined \
                         tail); new records continue at offset {}",
                        cursor.next, topic.next, cursor.next
                    );
                    topic.next = cursor.next;
                    topic.visible = cursor.next;
                }
                Some(_) => {}
                None => {
                    let floor = floors.entry(name.clone()).or_default();
                    *floor = (*floor).max(cursor.next);
                }
            }
        }
    }
    let mut groups = HashMap::new();
    for (key, path, disk, needs_snapshot) in disks {
        let journal = if report.fix {
            Some(Journal::open(&path, disk.generation, fsync)?)
        } else {
            None
        };
        let mut group = Group::restore(key.clone(), disk, &topics, journal);
        group.durable = true;
        if needs_snapshot {
            group.snapshot()?;
        }
        groups.insert(key, group);
    }
    Ok(State {
        topics,
        groups,
        floors,
        next_sub: 0,
        next_claim: 0,
    })
}

/// Subdirectories of `dir` whose names decode to topic or group names.
fn named_dirs(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    if !dir.exists() {
        return Ok(found);
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let file_name = entry.file_name();
        match file_name.to_str().and_then(unescape_name) {
            Some(name) => found.push((name, entry.path())),
            None => tracing::warn!(
                dir = %entry.path().display(),
                "file log: ignoring a directory whose name is not an escaped topic or group name"
            ),
        }
    }
    found.sort();
    Ok(found)
}
