//! What the members of a group in this process last noted about each
//! partition (the same as their commit metadata, see [`Prior`]), so the
//! next member to get a partition in this process counts attempts on and
//! skips settled messages even where the broker drops commit metadata
//! (tansu 0.6 stores the offset only).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::ledger::Prior;

type Key = (String, String, i32);

fn notes() -> &'static Mutex<HashMap<Key, Prior>> {
    static NOTES: OnceLock<Mutex<HashMap<Key, Prior>>> = OnceLock::new();
    NOTES.get_or_init(Default::default)
}

/// Records what a member of `group` noted about a partition.
pub fn record(group: &str, topic: &str, partition: i32, prior: Prior) {
    notes()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((group.to_string(), topic.to_string(), partition), prior);
}

/// What members of `group` in this process noted about a partition.
pub fn recall(group: &str, topic: &str, partition: i32) -> Prior {
    notes()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(group.to_string(), topic.to_string(), partition))
        .cloned()
        .unwrap_or_default()
}

/// Forgets a group (an ephemeral one, when it closes).
pub fn forget(group: &str) {
    notes()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(g, _, _), _| g != group);
}
