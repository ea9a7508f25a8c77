//! A consumer group in memory: per topic, how far it has read and which
//! delivered messages are still unacknowledged (with their attempts, holder
//! and when they become visible again); plus the queue of redeliveries and
//! the timers of leases and nack delays.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::time::Instant;

use super::journal::{CursorDisk, GroupDisk, Journal, Op};
use super::topic::Topic;
use crate::backend::pattern;
use crate::message::now_ms;

/// Which claim of which subscription holds a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub sub: u64,
    pub claim: u64,
}

/// A delivered, unacknowledged message.
#[derive(Debug, Clone)]
pub struct Pending {
    pub attempts: u32,
    /// Invisible until then (lease or nack delay); `None` means ready.
    pub until: Option<Instant>,
    pub holder: Option<Holder>,
    /// Wall-clock form of a nack delay, for the snapshot.
    pub visible_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Cursor {
    /// Every offset below has been delivered at least once.
    pub next: u64,
    pub pending: BTreeMap<u64, Pending>,
}

impl Cursor {
    pub fn at(next: u64) -> Self {
        Cursor {
            next,
            pending: BTreeMap::new(),
        }
    }

    /// The first offset not acknowledged yet.
    pub fn position(&self) -> u64 {
        self.pending.keys().next().copied().unwrap_or(self.next)
    }

    pub fn is_acked(&self, offset: u64) -> bool {
        offset < self.next && !self.pending.contains_key(&offset)
    }
}

pub struct Group {
    /// The backend-wide group key (name and topics).
    pub key: String,
    pub patterns: Vec<String>,
    pub members: usize,
    pub cursors: BTreeMap<Arc<str>, Cursor>,
    /// Redeliveries, taken before new messages, lowest offset first.
    pub ready: BTreeSet<(Arc<str>, u64)>,
    /// Leases and nack delays; entries are checked against `pending` when
    /// they fire, so a stale one is simply skipped.
    pub timers: BTreeSet<(Instant, Arc<str>, u64)>,
    /// Kept across restarts; an ephemeral group never touches the disk.
    pub durable: bool,
    /// `None` for an ephemeral group, and when the log is only inspected.
    pub journal: Option<Journal>,
    /// Which topic a fetch starts with, so no topic starves the others.
    pub turn: usize,
}

impl Group {
    pub fn new(key: String, journal: Option<Journal>) -> Self {
        Group {
            key,
            patterns: Vec::new(),
            members: 0,
            cursors: BTreeMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            durable: journal.is_some(),
            journal,
            turn: 0,
        }
    }

    /// Records of its topics never delivered to it: those past each
    /// cursor (its unacknowledged deliveries are below it).
    pub fn unread(&self, topics: &BTreeMap<Arc<str>, Topic>) -> u64 {
        self.cursors
            .iter()
            .filter_map(|(name, cursor)| Some(topics.get(name)?.records_from(cursor.next) as u64))
            .sum()
    }

    pub fn wants(&self, topic: &str) -> bool {
        self.patterns.iter().any(|p| pattern::matches(p, topic))
    }

    /// Rebuilds a group from its durable state against the topics as
    /// loaded. Unacknowledged messages become ready again (their holders
    /// died with the last process), or wait out a nack delay.
    pub fn restore(
        key: String,
        disk: GroupDisk,
        topics: &BTreeMap<Arc<str>, Topic>,
        journal: Option<Journal>,
    ) -> Group {
        let mut group = Group::new(key, journal);
        group.patterns = disk.patterns;
        let (now, wall) = (Instant::now(), now_ms());
        let mut saved = disk.topics;
        for (name, topic) in topics {
            if !group.wants(name) {
                continue;
            }
            let CursorDisk { next, pending } = saved.remove(&**name).unwrap_or_default();
            let low = topic.low();
            let mut cursor = Cursor::at(next.max(low));
            for (offset, (attempts, visible_ms)) in pending.range(low..) {
                let until = (*visible_ms > wall)
                    .then(|| now + std::time::Duration::from_millis(visible_ms - wall));
                match until {
                    Some(at) => {
                        group.timers.insert((at, name.clone(), *offset));
                    }
                    None => {
                        group.ready.insert((name.clone(), *offset));
                    }
                }
                cursor.pending.insert(
                    *offset,
                    Pending {
                        attempts: *attempts,
                        until,
                        holder: None,
                        visible_ms: *visible_ms,
                    },
                );
            }
            group.cursors.insert(name.clone(), cursor);
        }
        group
    }

    /// Positions kept for topics that are not there (any more): the offsets
    /// such a topic may start at when it is created again.
    pub fn floors(disk: &GroupDisk, topics: &BTreeMap<Arc<str>, Topic>) -> Vec<(String, u64)> {
        disk.topics
            .iter()
            .filter(|(name, _)| !topics.contains_key(name.as_str()))
            .map(|(name, cursor)| (name.clone(), cursor.next))
            .collect()
    }

    /// The durable form, for a snapshot.
    pub fn to_disk(&self) -> GroupDisk {
        GroupDisk {
            generation: 0,
            patterns: self.patterns.clone(),
            topics: self
                .cursors
                .iter()
                .map(|(name, cursor)| {
                    let pending = cursor
                        .pending
                        .iter()
                        .map(|(offset, p)| (*offset, (p.attempts, p.visible_ms)))
                        .collect();
                    (
                        name.to_string(),
                        CursorDisk {
                            next: cursor.next,
                            pending,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Moves leases and delays that ran out to the ready queue.
    pub fn promote(&mut self, now: Instant) {
        while let Some(first) = self.timers.first() {
            if first.0 > now {
                break;
            }
            let (at, topic, offset) = self.timers.pop_first().expect("not empty");
            let Some(pending) = self
                .cursors
                .get_mut(&topic)
                .and_then(|c| c.pending.get_mut(&offset))
            else {
                continue;
            };
            if pending.until == Some(at) {
                pending.until = None;
                pending.holder = None;
                self.ready.insert((topic, offset));
            }
        }
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _, _)| *at)
    }

    /// Hands a held delivery back: ready at once, or after `delay_until`.
    pub fn release(&mut self, topic: &Arc<str>, offset: u64, delay_until: Option<(Instant, u64)>) {
        let Some(pending) = self
            .cursors
            .get_mut(topic)
            .and_then(|c| c.pending.get_mut(&offset))
        else {
            return;
        };
        if let Some(at) = pending.until.take() {
            self.timers.remove(&(at, topic.clone(), offset));
        }
        pending.holder = None;
        match delay_until {
            Some((at, wall)) => {
                pending.until = Some(at);
                pending.visible_ms = wall;
                self.timers.insert((at, topic.clone(), offset));
            }
            None => {
                pending.visible_ms = 0;
                self.ready.insert((topic.clone(), offset));
            }
        }
    }

    /// Forgets a pending delivery (acknowledged, or its record is gone).
    pub fn settle(&mut self, topic: &Arc<str>, offset: u64) -> Option<Pending> {
        let pending = self.cursors.get_mut(topic)?.pending.remove(&offset)?;
        if let Some(at) = pending.until {
            self.timers.remove(&(at, topic.clone(), offset));
        }
        self.ready.remove(&(topic.clone(), offset));
        Some(pending)
    }

    /// Appends ops to the journal of a durable group; returns the sync
    /// ticket. Folds the journal into a snapshot once it grows large.
    pub fn record(
        &mut self,
        ops: &[Op],
        snapshot_after: u64,
    ) -> std::io::Result<Option<(Arc<super::file::LogFile>, u64)>> {
        if ops.is_empty() || self.journal.is_none() {
            return Ok(None);
        }
        let written = self.journal.as_ref().expect("durable").append(ops)?;
        if self.journal.as_ref().expect("durable").bytes() > snapshot_after {
            self.snapshot()?;
        }
        Ok(Some(written))
    }

    /// Writes a snapshot and starts an empty journal.
    pub fn snapshot(&mut self) -> std::io::Result<()> {
        let mut disk = self.to_disk();
        if let Some(journal) = self.journal.as_mut() {
            journal.rotate(&mut disk)?;
        }
        Ok(())
    }
}
