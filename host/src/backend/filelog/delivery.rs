//! The consumer side of the store: joining a group, claiming deliveries
//! (redeliveries first, then new records), reading them outside the lock,
//! and settling them (ack, nack, a member leaving).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::time::Instant;

use super::file::{LogFile, append_synced};
use super::group::{Cursor, Group, Holder, Pending};
use super::journal::{Journal, Op};
use super::record::{decode_message, escape_name};
use super::store::{SNAPSHOT_AFTER, State, Store};
use super::topic::Entry;
use crate::backend::{Delivery, Receipt, StartFrom, SubscribeOptions, closed_error, pattern};
use crate::message::now_ms;

/// A receipt: which record, and which claim of it.
pub struct FileReceipt {
    pub topic: Arc<str>,
    pub offset: u64,
    pub claim: u64,
}

/// A delivery decided under the lock, read from its file after it.
pub struct Claimed {
    pub topic: Arc<str>,
    pub offset: u64,
    pub attempt: u32,
    pub claim: u64,
    pub file: Arc<LogFile>,
    pub entry: Entry,
}

impl Store {
    /// Joins (creating if needed) the group; returns its key and the new
    /// member's id.
    pub fn subscribe(&self, options: &SubscribeOptions) -> Result<(String, u64)> {
        self.check_usable()?;
        for topic in &options.topics {
            pattern::validate(topic).map_err(anyhow::Error::msg)?;
        }
        let key = options.group_key();
        let (written, id) = {
            let mut state = self.lock_state();
            let State {
                topics,
                groups,
                next_sub,
                ..
            } = &mut *state;
            if !groups.contains_key(&key) {
                let journal = if options.ephemeral {
                    None
                } else {
                    let dir = self.root.join("groups").join(escape_name(&key));
                    Some(Journal::open(&dir, 0, self.options.fsync).with_context(|| {
                        format!(
                            "file log {}: cannot create group `{key}`",
                            self.root.display()
                        )
                    })?)
                };
                let mut group = Group::new(key.clone(), journal);
                group.durable = !options.ephemeral;
                groups.insert(key.clone(), group);
            }
            let group = groups.get_mut(&key).expect("just ensured");
            let added: Vec<String> = options
                .topics
                .iter()
                .filter(|p| !group.patterns.contains(p))
                .cloned()
                .collect();
            let mut ops = Vec::new();
            if !added.is_empty() {
                group.patterns.extend(added.iter().cloned());
                ops.push(Op::Patterns {
                    patterns: added.clone(),
                });
            }
            for (name, topic) in topics.iter() {
                if group.cursors.contains_key(name)
                    || !added.iter().any(|p| pattern::matches(p, name))
                {
                    continue;
                }
                // A topic without a recorded start is read from its lowest
                // offset after a restart, so only `latest` needs recording.
                let next = match options.start {
                    StartFrom::Earliest => topic.low(),
                    StartFrom::Latest => topic.next,
                };
                group.cursors.insert(name.clone(), Cursor::at(next));
                if next > topic.low() {
                    ops.push(Op::Start {
                        topic: name.to_string(),
                        next,
                    });
                }
            }
            let written = group.record(&ops, SNAPSHOT_AFTER).map_err(|e| {
                self.write_failed(&format!("writing the journal of group `{key}`"), e)
            })?;
            group.members += 1;
            *next_sub += 1;
            (written, *next_sub)
        };
        self.commit(&written.into_iter().collect::<Vec<_>>())?;
        Ok((key, id))
    }

    /// Claims up to `max` deliveries for member `sub`: redeliveries first,
    /// then new records, topic by topic in turn. Also returns when the
    /// group's next lease or delay runs out.
    pub fn claim(
        &self,
        key: &str,
        sub: u64,
        lease: Duration,
        max: usize,
    ) -> Result<(Vec<Claimed>, Option<Instant>)> {
        self.check_usable()?;
        let (claimed, due, written) = {
            let mut state = self.lock_state();
            let State {
                topics,
                groups,
                next_claim,
                ..
            } = &mut *state;
            let group = groups.get_mut(key).ok_or_else(|| closed_error(key))?;
            let now = Instant::now();
            let until = now + lease;
            group.promote(now);
            let mut claimed = Vec::new();
            let mut claims: BTreeMap<Arc<str>, Vec<(u64, u32)>> = BTreeMap::new();
            let mut ops = Vec::new();

            while claimed.len() < max {
                let Some((name, offset)) = group.ready.pop_first() else {
                    break;
                };
                let located = topics.get(&name).and_then(|t| t.locate(offset));
                let Some(cursor) = group.cursors.get_mut(&name) else {
                    continue;
                };
                let Some(pending) = cursor.pending.get_mut(&offset) else {
                    continue;
                };
                if pending.holder.is_some() || pending.until.is_some() {
                    continue;
                }
                let Some((file, entry)) = located else {
                    tracing::warn!(
                        log = %self.root.display(), group = %key, topic = %name, offset,
                        "file log: an unacknowledged record is no longer in the log (deleted by \
                         retention or quarantined); it cannot be redelivered"
                    );
                    cursor.pending.remove(&offset);
                    ops.push(Op::Ack {
                        topic: name.to_string(),
                        offset,
                    });
                    continue;
                };
                *next_claim += 1;
                // Restored from a journal, which may say anything.
                pending.attempts = pending.attempts.saturating_add(1);
                pending.holder = Some(Holder {
                    sub,
                    claim: *next_claim,
                });
                pending.until = Some(until);
                pending.visible_ms = 0;
                group.timers.insert((until, name.clone(), offset));
                claims
                    .entry(name.clone())
                    .or_default()
                    .push((offset, pending.attempts));
                claimed.push(Claimed {
                    topic: name,
                    offset,
                    attempt: pending.attempts,
                    claim: *next_claim,
                    file,
                    entry,
                });
            }

            let names: Vec<Arc<str>> = group.cursors.keys().cloned().collect();
            if !names.is_empty() {
                let start = group.turn % names.len();
                group.turn = group.turn.wrapping_add(1);
                for name in names[start..].iter().chain(&names[..start]) {
                    if claimed.len() >= max {
                        break;
                    }
                    let (Some(topic), Some(cursor)) =
                        (topics.get(name), group.cursors.get_mut(name))
                    else {
                        continue;
                    };
                    let from = cursor.next.max(topic.low());
                    for (file, entry) in topic.read_from(from, max - claimed.len()) {
                        *next_claim += 1;
                        let holder = Holder {
                            sub,
                            claim: *next_claim,
                        };
                        cursor.pending.insert(
                            entry.offset,
                            Pending {
                                attempts: 1,
                                until: Some(until),
                                holder: Some(holder),
                                visible_ms: 0,
                            },
                        );
                        cursor.next = entry.offset + 1;
                        group.timers.insert((until, name.clone(), entry.offset));
                        claims
                            .entry(name.clone())
                            .or_default()
                            .push((entry.offset, 1));
                        claimed.push(Claimed {
                            topic: name.clone(),
                            offset: entry.offset,
                            attempt: 1,
                            claim: holder.claim,
                            file,
                            entry,
                        });
                    }
                }
            }
            for (name, list) in claims {
                ops.push(Op::Claim {
                    topic: name.to_string(),
                    claims: list,
                });
            }
            let written = group.record(&ops, SNAPSHOT_AFTER).map_err(|e| {
                self.write_failed(&format!("writing the journal of group `{key}`"), e)
            })?;
            (claimed, group.next_due(), written)
        };
        self.commit(&written.into_iter().collect::<Vec<_>>())?;
        Ok((claimed, due))
    }

    /// Reads claimed records from their files. A record that no longer
    /// passes its checksum is quarantined and skipped, never delivered.
    pub fn read(&self, key: &str, claimed: Vec<Claimed>) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(claimed.len());
        for item in claimed {
            let raw = item
                .file
                .read_at(item.entry.pos as u64, item.entry.len as usize);
            let decoded = match &raw {
                Ok(bytes) => decode_message(bytes).and_then(|(offset, message)| {
                    if offset == item.offset {
                        Ok(message)
                    } else {
                        Err(anyhow!("holds offset {offset}, expected {}", item.offset))
                    }
                }),
                Err(e) => Err(anyhow!("cannot read it: {e}")),
            };
            match decoded {
                Ok(message) => deliveries.push(Delivery {
                    message,
                    attempt: item.attempt,
                    receipt: Receipt::new(FileReceipt {
                        topic: item.topic,
                        offset: item.offset,
                        claim: item.claim,
                    }),
                }),
                Err(e) => self.discard_unreadable(key, &item, raw.ok(), &format!("{e:#}")),
            }
        }
        deliveries
    }

    /// A record damaged after the startup check (bit rot, or the file was
    /// changed underneath): saved to quarantine, dropped from the index so
    /// no group reads it, and settled for this group.
    fn discard_unreadable(&self, key: &str, item: &Claimed, raw: Option<Vec<u8>>, reason: &str) {
        let file = item.file.path();
        tracing::error!(
            log = %self.root.display(), file = %file.display(), topic = %item.topic,
            offset = item.offset, "file log: record failed its check when read ({reason}); \
            quarantined and skipped — run `sluice log check` when the process is stopped"
        );
        if let Some(raw) = raw {
            let relative = file.strip_prefix(&self.root).unwrap_or(file);
            let entry = serde_json::json!({
                "file": relative.display().to_string(),
                "byte": item.entry.pos,
                "offset": item.offset,
                "reason": format!("failed its check when read: {reason}"),
                "quarantined_ms": now_ms(),
                "raw": String::from_utf8_lossy(&raw),
            });
            let target = self.root.join("quarantine").join(relative);
            if let Err(e) = append_synced(&target, format!("{entry}\n").as_bytes()) {
                tracing::error!("file log: cannot write {}: {e}", target.display());
            }
        }
        let mut state = self.lock_state();
        if let Some(topic) = state.topics.get_mut(&item.topic) {
            for segment in &mut topic.segments {
                segment.entries.retain(|e| e.offset != item.offset);
            }
        }
        if let Some(group) = state.groups.get_mut(key) {
            group.settle(&item.topic, item.offset);
            if let Err(e) = group.record(
                &[Op::Ack {
                    topic: item.topic.to_string(),
                    offset: item.offset,
                }],
                SNAPSHOT_AFTER,
            ) {
                let _ = self.write_failed(&format!("writing the journal of group `{key}`"), e);
            }
        }
    }

    /// Acknowledges a delivery. Acking one whose lease ran out still counts
    /// (the work was done); acking twice is a no-op.
    pub fn ack(&self, key: &str, receipt: &FileReceipt) -> Result<()> {
        self.settle(key, &[(receipt, None)])
    }

    /// Makes a delivery visible again after `delay`, if this claim still
    /// holds it (a stale nack, after the lease ran out, changes nothing).
    pub fn nack(&self, key: &str, receipt: &FileReceipt, delay: Duration) -> Result<()> {
        self.settle(key, &[(receipt, Some(delay))])
    }

    /// Acks (`None`) and nacks (`Some(delay)`) a batch of one group's
    /// deliveries under one lock, with one journal append and one commit.
    pub fn settle(&self, key: &str, batch: &[(&FileReceipt, Option<Duration>)]) -> Result<()> {
        self.check_usable()?;
        let mut released = false;
        let written = {
            let mut state = self.lock_state();
            let Some(group) = state.groups.get_mut(key) else {
                return Ok(());
            };
            let mut ops = Vec::with_capacity(batch.len());
            for (receipt, delay) in batch {
                let Some(delay) = delay else {
                    if group.settle(&receipt.topic, receipt.offset).is_some() {
                        ops.push(Op::Ack {
                            topic: receipt.topic.to_string(),
                            offset: receipt.offset,
                        });
                    }
                    continue;
                };
                let holds = group
                    .cursors
                    .get(&receipt.topic)
                    .and_then(|c| c.pending.get(&receipt.offset))
                    .and_then(|p| p.holder)
                    .is_some_and(|h| h.claim == receipt.claim);
                if !holds {
                    continue;
                }
                released = true;
                if delay.is_zero() {
                    group.release(&receipt.topic, receipt.offset, None);
                } else {
                    let visible_ms = now_ms() + delay.as_millis() as u64;
                    let at = Instant::now() + *delay;
                    group.release(&receipt.topic, receipt.offset, Some((at, visible_ms)));
                    ops.push(Op::Nack {
                        topic: receipt.topic.to_string(),
                        offset: receipt.offset,
                        visible_ms,
                    });
                }
            }
            group.record(&ops, SNAPSHOT_AFTER).map_err(|e| {
                self.write_failed(&format!("writing the journal of group `{key}`"), e)
            })?
        };
        self.commit(&written.into_iter().collect::<Vec<_>>())?;
        if released {
            self.changed.notify_waiters();
        }
        Ok(())
    }

    /// A member leaves: what it holds goes back to the group; an ephemeral
    /// group goes away with its last member.
    pub fn leave(&self, key: &str, held: Vec<(Arc<str>, u64, u64)>) {
        let mut state = self.lock_state();
        let Some(group) = state.groups.get_mut(key) else {
            return;
        };
        for (topic, offset, claim) in held {
            let holds = group
                .cursors
                .get(&topic)
                .and_then(|c| c.pending.get(&offset))
                .and_then(|p| p.holder)
                .is_some_and(|h| h.claim == claim);
            if holds {
                group.release(&topic, offset, None);
            }
        }
        group.members = group.members.saturating_sub(1);
        if !group.durable && group.members == 0 {
            state.groups.remove(key);
        }
        drop(state);
        self.changed.notify_waiters();
    }
}
