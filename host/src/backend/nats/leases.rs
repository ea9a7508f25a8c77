//! Shard leases: which member of an ordered JetStream group reads which key
//! shard, so that one member at a time holds a shard's messages and can
//! take many of them at once (the shard's consumer lets out up to
//! `max_ack_pending`; the member's ordered lanes keep each key's order).
//!
//! The leases are kept in the JetStream key-value bucket
//! `sluice_shard_leases`, under keys named after the group (a digest of its
//! name and topics):
//!
//! - `<group>.m.<member>`: a member's heartbeat, written every quarter of
//!   the subscription's lease. A member whose heartbeat has not changed for
//!   a whole lease, as this member saw it (its own clock measures only
//!   durations, so clocks need not agree), is taken for dead;
//! - `<group>.s.<consumer>`: who holds a shard (its consumer's name): a
//!   member's id, or empty once it was handed over cleanly. Every change is
//!   a compare-and-set on the key's revision, so two members never both
//!   take a shard.
//!
//! Each shard belongs to the live member that ranks first for it by
//! rendezvous hashing, so members that join or leave move only their share.
//! A member that holds a shard another should have stops reading it, waits
//! until everything it holds of the shard is settled and its pull requests
//! have ended, and then empties the key: the next member starts at once,
//! and gets any message the first one handed back (nacked) before anything
//! later. A shard whose holder died is taken with a fence instead: the new
//! holder reads it only after the dead member's deliveries have all come
//! back (its last pull request's expiry plus `AckWait`), so what the dead
//! member held is redelivered, in stream order, before anything later.
//!
//! A member whose own heartbeat has not been stored for three quarters of a
//! lease stops reading its shards (and keeping their deliveries alive)
//! until it is stored again, since the others may soon take it for dead.
//! Every member of a group should use the same lease.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, StorageType};
use async_nats::jetstream::{self};
use futures::{FutureExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// The bucket every ordered group keeps its shard leases in.
const BUCKET: &str = "sluice_shard_leases";
/// Keys of members that died are left for others to remove; the bucket
/// forgets anything older than this by itself.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How long a new member waits for more of the bucket's history.
const CATCH_UP_SILENCE: Duration = Duration::from_millis(200);

/// What this member does with a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Turn {
    /// Another member's, or no one's.
    NotMine,
    /// Taken from a member that died: read it from this instant, once what
    /// the dead member held has come back.
    Fenced(Instant),
    Reading,
    /// Another member should have it: read no more, and hand it over once
    /// nothing of it is held.
    Releasing,
}

/// A key as this member last saw it.
struct Seen {
    value: String,
    revision: u64,
    /// When this member saw that revision first.
    at: Instant,
}

/// The shard leases of one subscription.
pub(crate) struct ShardLeases {
    store: kv::Store,
    me: String,
    /// `<group>.`
    prefix: String,
    /// Per pull target: its lease key, or `None` for a target every member
    /// reads (an unordered group's, or the unkeyed messages').
    keys: Vec<Option<String>>,
    lease: Duration,
    /// How long a shard taken from a dead member waits.
    fence: Duration,
    /// Per target: whether to pull from it now.
    reading: Vec<AtomicBool>,
    /// Per target: whether this member holds it.
    mine: Vec<AtomicBool>,
    /// Until when this member's own heartbeat lets it read.
    alive_until: Mutex<Instant>,
    started: Instant,
    state: tokio::sync::Mutex<State>,
}

struct State {
    turns: Vec<Turn>,
    watch: Option<kv::Watch>,
    seen: HashMap<String, Seen>,
}

impl ShardLeases {
    /// Leases for the targets whose `leased` is true; `pull_lifetime` is
    /// the longest a pull request may deliver after it was sent.
    pub async fn start(
        js: &jetstream::Context,
        group_key: &str,
        consumers: Vec<(String, bool)>,
        lease: Duration,
        pull_lifetime: Duration,
    ) -> Result<Self> {
        let store = bucket(js).await?;
        let digest = Sha256::digest(group_key.as_bytes());
        let prefix = format!("{}.", hex::encode(&digest[..8]));
        let me = format!("{:016x}", rand::random::<u64>());
        let keys: Vec<Option<String>> = consumers
            .iter()
            .map(|(consumer, leased)| leased.then(|| format!("{prefix}s.{consumer}")))
            .collect();
        let reading = keys.iter().map(|k| AtomicBool::new(k.is_none())).collect();
        let mine = keys.iter().map(|_| AtomicBool::new(false)).collect();
        let turns = vec![Turn::NotMine; keys.len()];
        let leases = ShardLeases {
            store,
            me,
            prefix,
            keys,
            lease,
            // What the dead member's last pull request delivered comes back
            // an `AckWait` after it; the server looks for expired
            // deliveries on a timer, so allow it a moment more.
            fence: lease + pull_lifetime + Duration::from_millis(500),
            reading,
            mine,
            alive_until: Mutex::new(Instant::now()),
            started: Instant::now(),
            state: tokio::sync::Mutex::new(State {
                turns,
                watch: None,
                seen: HashMap::new(),
            }),
        };
        leases.catch_up().await?;
        // Nothing is held yet, so any shard can be handed over.
        leases.tick(|_| true).await;
        Ok(leases)
    }

    /// Reads what the bucket holds for the group before the first
    /// decision, so a new member does not take what others hold for free.
    async fn catch_up(&self) -> Result<()> {
        let mut watch = self
            .store
            .watch_with_history(format!("{}>", self.prefix))
            .await
            .context("cannot watch the shard leases of an ordered JetStream group")?;
        let mut state = self.state.lock().await;
        // An empty history sends nothing at all, so silence ends it too.
        while let Ok(Some(entry)) = tokio::time::timeout(CATCH_UP_SILENCE, watch.next()).await {
            let entry = entry.context("reading the shard leases of an ordered group")?;
            let done = entry.seen_current;
            record(&mut state, entry);
            if done {
                break;
            }
        }
        state.watch = Some(watch);
        Ok(())
    }

    /// Whether to pull from target `index` now.
    pub fn reading(&self, index: usize) -> bool {
        match self.keys.get(index) {
            Some(Some(_)) => self.reading[index].load(Ordering::SeqCst) && self.alive(),
            _ => true,
        }
    }

    /// Whether this member may keep target `index`'s deliveries alive: it
    /// holds the shard, and the others cannot have taken it for dead.
    pub fn holds(&self, index: usize) -> bool {
        match self.keys.get(index) {
            Some(Some(_)) => self.mine[index].load(Ordering::SeqCst) && self.alive(),
            _ => true,
        }
    }

    fn alive(&self) -> bool {
        Instant::now() < *self.alive_until.lock().unwrap()
    }

    /// How often [`ShardLeases::tick`] should run.
    pub fn period(&self) -> Duration {
        (self.lease / 4).clamp(Duration::from_millis(20), Duration::from_secs(5))
    }

    /// Writes this member's heartbeat, looks at what the others did, and
    /// takes, keeps or hands over shards. `quiet(index)` says whether
    /// nothing of target `index` is held or still being delivered.
    pub async fn tick(&self, quiet: impl Fn(usize) -> bool) {
        let sent = Instant::now();
        let heartbeat = format!("{}m.{}", self.prefix, self.me);
        match self.store.put(&heartbeat, Vec::new().into()).await {
            Ok(_) => *self.alive_until.lock().unwrap() = sent + self.lease * 3 / 4,
            Err(e) => tracing::debug!("shard lease heartbeat: {e}"),
        }
        let mut state = self.state.lock().await;
        self.observe(&mut state).await;
        let now = Instant::now();
        let members = self.live_members(&mut state, now).await;
        for index in 0..self.keys.len() {
            if let Some(key) = &self.keys[index] {
                let turn = self.decide(&mut state, key, index, &members, &quiet).await;
                state.turns[index] = turn;
                self.reading[index].store(turn == Turn::Reading, Ordering::SeqCst);
                self.mine[index].store(turn != Turn::NotMine, Ordering::SeqCst);
            }
        }
    }

    /// Takes in what changed in the bucket since the last look.
    async fn observe(&self, state: &mut State) {
        if state.watch.is_none() {
            match self
                .store
                .watch_with_history(format!("{}>", self.prefix))
                .await
            {
                Ok(watch) => state.watch = Some(watch),
                Err(e) => {
                    tracing::debug!("watching shard leases: {e}");
                    return;
                }
            }
        }
        while let Some(watch) = state.watch.as_mut() {
            let entry = match watch.next().now_or_never() {
                None => break,
                Some(Some(Ok(entry))) => entry,
                Some(ended) => {
                    if let Some(Err(e)) = ended {
                        tracing::debug!("watching shard leases: {e}");
                    }
                    state.watch = None;
                    break;
                }
            };
            record(state, entry);
        }
    }

    /// The members whose heartbeat changed within a lease, this one
    /// always among them; removes the keys of members long dead.
    async fn live_members(&self, state: &mut State, now: Instant) -> Vec<String> {
        let heartbeats = format!("{}m.", self.prefix);
        let mut live = vec![self.me.clone()];
        let mut dead = Vec::new();
        for (key, seen) in &state.seen {
            let Some(member) = key.strip_prefix(&heartbeats) else {
                continue;
            };
            let quiet_for = now.duration_since(seen.at);
            if quiet_for < self.lease {
                if member != self.me {
                    live.push(member.to_string());
                }
            } else if quiet_for > self.lease * 4 {
                dead.push((key.clone(), seen.revision));
            }
        }
        for (key, revision) in dead {
            // Whoever of the members removes it first; the others' calls fail.
            let _ = self
                .store
                .delete_expect_revision(&key, Some(revision))
                .await;
            state.seen.remove(&key);
        }
        live
    }

    /// What this member does with the shard under `key` from now on.
    async fn decide(
        &self,
        state: &mut State,
        key: &str,
        index: usize,
        members: &[String],
        quiet: &impl Fn(usize) -> bool,
    ) -> Turn {
        let turn = state.turns[index];
        let now = Instant::now();
        let mine = turn != Turn::NotMine;
        let ranked_first = members
            .iter()
            .max_by_key(|member| rank(member, key))
            .is_some_and(|first| *first == self.me);
        let (holder, revision) = match state.seen.get(key) {
            Some(seen) => (
                (!seen.value.is_empty()).then(|| seen.value.clone()),
                Some(seen.revision),
            ),
            None => (None, None),
        };
        match holder {
            Some(holder) if holder == self.me => match turn {
                // A fence is kept even for another member: it must not
                // read before the dead member's deliveries are back.
                Turn::Fenced(until) if now < until => turn,
                _ if ranked_first => Turn::Reading,
                _ if !quiet(index) => Turn::Releasing,
                _ => match self.write(state, key, "", revision).await {
                    Ok(()) => Turn::NotMine,
                    Err(e) => {
                        tracing::debug!(shard = key, "handing over a shard: {e:#}");
                        Turn::Releasing
                    }
                },
            },
            Some(holder) => {
                if mine {
                    tracing::warn!(
                        shard = key,
                        "another member of the ordered group took a key shard this member held (it saw this member as dead); this member reads it no more"
                    );
                    return Turn::NotMine;
                }
                // Until this member has watched the bucket for a lease, a
                // holder it has not seen a heartbeat of may be alive.
                let watched_long_enough = now.duration_since(self.started) >= self.lease;
                if !ranked_first || members.contains(&holder) || !watched_long_enough {
                    return Turn::NotMine;
                }
                match self.write(state, key, &self.me, revision).await {
                    Ok(()) => {
                        tracing::info!(shard = key, dead = %holder, "took over a key shard from a member that stopped answering; reading it once what that member held has come back");
                        Turn::Fenced(now + self.fence)
                    }
                    Err(_) => Turn::NotMine,
                }
            }
            None if mine || ranked_first => {
                // Free: handed over cleanly, never taken, or (if this
                // member held it) lost with the server's store.
                match self.write(state, key, &self.me, revision).await {
                    Ok(()) if mine => turn,
                    Ok(()) => Turn::Reading,
                    Err(_) => Turn::NotMine,
                }
            }
            None => Turn::NotMine,
        }
    }

    /// Sets `key` to `value` if it is still at `revision` (or missing, for
    /// `None`), and remembers the new revision.
    async fn write(
        &self,
        state: &mut State,
        key: &str,
        value: &str,
        revision: Option<u64>,
    ) -> Result<()> {
        let bytes = value.to_string().into();
        let written = match revision {
            Some(revision) => self.store.update(key, bytes, revision).await?,
            None => self.store.create(key, bytes).await?,
        };
        remember(
            state,
            key.to_string(),
            value.to_string(),
            written,
            Instant::now(),
        );
        Ok(())
    }

    /// Hands every shard this member holds over, for a closing
    /// subscription that has settled or handed back everything it held.
    pub async fn release_all(&self) {
        let mut state = self.state.lock().await;
        for index in 0..self.keys.len() {
            self.reading[index].store(false, Ordering::SeqCst);
            self.mine[index].store(false, Ordering::SeqCst);
            let Some(key) = &self.keys[index] else {
                continue;
            };
            if state.turns[index] == Turn::NotMine {
                continue;
            }
            state.turns[index] = Turn::NotMine;
            let revision = state.seen.get(key).map(|seen| seen.revision);
            if let Err(e) = self.write(&mut state, key, "", revision).await {
                tracing::debug!(shard = key, "handing over a shard on close: {e:#}");
            }
        }
        let heartbeat = format!("{}m.{}", self.prefix, self.me);
        if let Err(e) = self.store.delete(&heartbeat).await {
            tracing::debug!("removing this member's heartbeat: {e}");
        }
    }
}

/// Takes in one change the watch saw.
fn record(state: &mut State, entry: kv::Entry) {
    match entry.operation {
        Operation::Put => {
            let value = String::from_utf8_lossy(&entry.value).into_owned();
            remember(state, entry.key, value, entry.revision, Instant::now());
        }
        Operation::Delete | Operation::Purge => {
            state.seen.remove(&entry.key);
        }
    }
}

/// Records a key's new revision; a revision already seen keeps the time
/// it was first seen, so a heartbeat that stopped is noticed.
fn remember(state: &mut State, key: String, value: String, revision: u64, now: Instant) {
    match state.seen.get_mut(&key) {
        Some(seen) if seen.revision >= revision => {}
        Some(seen) => {
            *seen = Seen {
                value,
                revision,
                at: now,
            }
        }
        None => {
            state.seen.insert(
                key,
                Seen {
                    value,
                    revision,
                    at: now,
                },
            );
        }
    }
}

/// A member's rank for a shard (highest random weight): each shard goes
/// to the live member ranking first, so a member joining or leaving moves
/// only its own share.
fn rank(member: &str, key: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(member.as_bytes())
        .chain_update(b"/")
        .chain_update(key.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("eight bytes"))
}

/// Opens the lease bucket, making it if it is missing. It is made here
/// rather than by the client, whose own call asks the server for account
/// details NATS 2.9 does not send.
async fn bucket(js: &jetstream::Context) -> Result<kv::Store> {
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Ok(store);
    }
    let config = StreamConfig {
        name: format!("KV_{BUCKET}"),
        description: Some("Sluice: which member of an ordered group reads which key shard".into()),
        subjects: vec![format!("$KV.{BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: FORGET_AFTER,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        tracing::debug!("creating the shard lease bucket: {e}");
    }
    js.get_key_value(BUCKET)
        .await
        .context("cannot open the JetStream key-value bucket of shard leases")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_spread_over_members_and_a_leaving_member_moves_only_its_own() {
        let members = ["a", "b", "c"].map(String::from);
        let first = |members: &[String], shard: &str| {
            members
                .iter()
                .max_by_key(|m| rank(m, shard))
                .unwrap()
                .clone()
        };
        let shards: Vec<String> = (0..64).map(|i| format!("g.s.c{i}")).collect();
        let before: Vec<String> = shards.iter().map(|s| first(&members, s)).collect();
        for member in &members {
            let share = before.iter().filter(|m| *m == member).count();
            assert!(
                (10..=32).contains(&share),
                "{member} ranks first for {share}"
            );
        }
        let after: Vec<String> = shards.iter().map(|s| first(&members[..2], s)).collect();
        for (was, is) in before.iter().zip(&after) {
            if was != "c" {
                assert_eq!(was, is);
            }
        }
    }

    #[test]
    fn a_revision_seen_again_keeps_when_it_was_first_seen() {
        let mut state = State {
            turns: Vec::new(),
            watch: None,
            seen: HashMap::new(),
        };
        let start = Instant::now();
        remember(&mut state, "k".into(), "a".into(), 3, start);
        remember(
            &mut state,
            "k".into(),
            "a".into(),
            3,
            start + Duration::from_secs(1),
        );
        assert_eq!(state.seen["k"].at, start);
        remember(
            &mut state,
            "k".into(),
            "b".into(),
            4,
            start + Duration::from_secs(2),
        );
        assert_eq!(state.seen["k"].at, start + Duration::from_secs(2));
        assert_eq!(state.seen["k"].value, "b");
    }
}
