//! The books one member keeps on one assigned partition: every offset it
//! has received and not yet committed past, whether each is buffered, out
//! with the application, waiting out a nack delay, or done, and how often
//! each has been delivered.
//!
//! The offset to commit is the lowest one not done (or one past the last
//! received when all are done), so concurrent handling never commits past
//! an unfinished message. Attempt counts travel in the commit's metadata
//! (see [`Prior`]) so that the member that gets the partition next, after a
//! rebalance or a crash, counts on from them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::landing::{Arrival, Landing};
use crate::message::Message;

/// Attempts and settled ranges listed in commit metadata, at most each;
/// Kafka limits metadata to 4096 bytes by default
/// (`offset.metadata.max.bytes`). Past them, deliveries count from 2 and
/// settled messages are delivered again.
const LISTED: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Received, not yet handed out.
    Buffered,
    /// Handed out, not settled.
    Out,
    /// Nacked: handed out again once its delay is over.
    Waiting,
    Done,
}

#[derive(Debug)]
struct Entry {
    /// Dropped once done.
    message: Option<Message>,
    /// Deliveries so far, by this member and before it.
    attempts: u32,
    stage: Stage,
    /// The subscription it was last handed to.
    holder: u64,
    /// Out of the line: an ordered group's message behind an unsettled
    /// one of its key (see [`Ledger::shelve`]).
    shelved: bool,
}

/// What an earlier owner of the partition left in its last commit's
/// metadata: `v1;THROUGH;OFFSET:ATTEMPTS,…;FIRST-LAST,…`. Every offset up
/// to THROUGH was delivered at least once; the first list has the offsets
/// delivered more often, the second the ranges past the committed offset
/// already settled (so the next owner skips them). Everything an earlier
/// owner left unfinished is at or past the committed offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prior {
    pub delivered_through: Option<i64>,
    pub attempts: BTreeMap<i64, u32>,
    /// Settled ranges, inclusive, in order.
    pub settled: Vec<(i64, i64)>,
}

impl Prior {
    /// Reads commit metadata; anything else (another client's, or none)
    /// means no deliveries are known.
    pub fn parse(metadata: &str) -> Prior {
        let mut parts = metadata.split(';');
        if parts.next() != Some("v1") {
            return Prior::default();
        }
        let delivered_through = parts.next().and_then(|t| t.parse().ok());
        let attempts = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|pair| {
                let (offset, attempts) = pair.split_once(':')?;
                Some((offset.parse().ok()?, attempts.parse().ok()?))
            })
            .collect();
        let settled = parts
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                Some((first.parse().ok()?, last.parse().ok()?))
            })
            .collect();
        Prior {
            delivered_through,
            attempts,
            settled,
        }
    }

    /// Both accounts together: the more deliveries, the more settled.
    pub fn merge(mut self, other: Prior) -> Prior {
        self.delivered_through = self.delivered_through.max(other.delivered_through);
        for (offset, attempts) in other.attempts {
            let mine = self.attempts.entry(offset).or_default();
            *mine = (*mine).max(attempts);
        }
        self.settled.extend(other.settled);
        self.settled.sort_unstable();
        self.settled.dedup();
        self
    }

    pub fn encode(&self) -> String {
        let through = self
            .delivered_through
            .map(|t| t.to_string())
            .unwrap_or_default();
        let listed: Vec<String> = self
            .attempts
            .iter()
            .take(LISTED)
            .map(|(offset, attempts)| format!("{offset}:{attempts}"))
            .collect();
        let settled: Vec<String> = self
            .settled
            .iter()
            .take(LISTED)
            .map(|(first, last)| match first == last {
                true => first.to_string(),
                false => format!("{first}-{last}"),
            })
            .collect();
        format!("v1;{through};{};{}", listed.join(","), settled.join(","))
    }

    fn is_settled(&self, offset: i64) -> bool {
        self.settled
            .iter()
            .any(|(first, last)| (*first..=*last).contains(&offset))
    }

    /// Deliveries of `offset` before this member's.
    fn attempts(&self, offset: i64) -> u32 {
        match self.attempts.get(&offset) {
            Some(attempts) => *attempts,
            None if self.delivered_through.is_some_and(|t| offset <= t) => 1,
            None => 0,
        }
    }
}

/// The books on one partition, for one assignment of it (its `epoch`).
#[derive(Debug)]
pub struct Ledger {
    pub epoch: u64,
    entries: BTreeMap<i64, Entry>,
    /// One past the last offset received; where this member started when
    /// nothing is received yet, if known.
    next_offset: Option<i64>,
    delivered_through: Option<i64>,
    prior: Prior,
    /// The last commit sent: offset and metadata.
    committed: Option<(i64, String)>,
    /// A committed start not yet confirmed by what arrived (see
    /// [`super::landing`]).
    pub landing: Option<Landing>,
    /// The unsettled offsets of each key, kept as messages arrive and
    /// settle so that an ordered group finds a key's oldest one without a
    /// scan of the partition.
    unsettled_by_key: HashMap<Box<str>, BTreeSet<i64>>,
    /// Entries shelved.
    shelved: usize,
}

/// What [`Ledger::ack`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Nothing: the offset was settled already, or never received.
    Already,
    /// Settled it. `unshelved` is the key's next message if it was shelved:
    /// it goes back in line.
    Now { unshelved: Option<i64> },
}

/// What became of a received record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Filed, to be handed out.
    Filed,
    /// Not to be handed out: received before, settled under an earlier
    /// owner, or before the start.
    Ignored,
    /// It shows fetching skipped the start: fetch from this offset instead.
    FetchFrom(i64),
}

impl Ledger {
    /// `start` is the offset fetching starts at, when known.
    pub fn new(epoch: u64, start: Option<i64>, prior: Prior) -> Self {
        Ledger {
            epoch,
            entries: BTreeMap::new(),
            next_offset: start,
            delivered_through: None,
            prior,
            committed: None,
            landing: None,
            unsettled_by_key: HashMap::new(),
            shelved: 0,
        }
    }

    /// A ledger whose start, a committed offset, is confirmed before any
    /// record past it is taken (see [`super::landing`]).
    pub fn confirming(epoch: u64, start: i64, prior: Prior) -> Self {
        Ledger {
            landing: Some(Landing::new(start)),
            ..Ledger::new(epoch, Some(start), prior)
        }
    }

    /// Records a received message, unless it is not to be handed out:
    /// received already (the consumer re-fetched it), settled under an
    /// earlier owner, or past an unconfirmed start; `log_start` tells where
    /// the partition's log begins, asked only in that last case.
    pub fn receive(
        &mut self,
        offset: i64,
        message: Message,
        log_start: impl FnOnce() -> i64,
    ) -> Received {
        if let Some(landing) = &mut self.landing {
            match landing.arrived(offset, log_start()) {
                Arrival::FetchFrom(from) => return Received::FetchFrom(from),
                Arrival::Landed | Arrival::Gap => self.landing = None,
            }
        }
        if self.next_offset.is_some_and(|next| offset < next) {
            return Received::Ignored;
        }
        self.next_offset = Some(offset + 1);
        let settled = self.prior.is_settled(offset);
        if let Some(key) = &message.key {
            match self.unsettled_by_key.get_mut(key.as_str()) {
                Some(offsets) => {
                    offsets.insert(offset);
                }
                None => {
                    self.unsettled_by_key
                        .insert(key.as_str().into(), BTreeSet::from([offset]));
                }
            }
        }
        self.entries.insert(
            offset,
            Entry {
                message: Some(message),
                attempts: self.prior.attempts(offset),
                stage: Stage::Buffered,
                holder: 0,
                shelved: false,
            },
        );
        if settled {
            self.ack(offset);
            return Received::Ignored;
        }
        Received::Filed
    }

    /// Hands out a buffered or nacked message to the subscription `holder`:
    /// the message and its attempt number (1 on first delivery).
    pub fn hand_out(&mut self, offset: i64, holder: u64) -> Option<(Message, u32)> {
        let entry = self.entries.get_mut(&offset)?;
        if !matches!(entry.stage, Stage::Buffered | Stage::Waiting) {
            return None;
        }
        let message = entry.message.clone()?;
        entry.stage = Stage::Out;
        entry.holder = holder;
        // Counts from commit metadata are anyone's to write.
        entry.attempts = entry.attempts.saturating_add(1);
        self.delivered_through = self.delivered_through.max(Some(offset));
        Some((message, entry.attempts))
    }

    /// Whether the message at `offset` has an older unsettled one of its
    /// key in the partition: an ordered group hands it out only after that
    /// one is settled.
    pub fn behind_its_key(&self, offset: i64) -> bool {
        let key = self
            .entries
            .get(&offset)
            .and_then(|entry| entry.message.as_ref()?.key.as_deref());
        key.and_then(|key| self.unsettled_by_key.get(key)?.first())
            .is_some_and(|&first| first < offset)
    }

    /// Takes a message out of the line until the older unsettled message
    /// of its key is settled; [`Ledger::ack`] of that one says when.
    pub fn shelve(&mut self, offset: i64) {
        if let Some(entry) = self.entries.get_mut(&offset)
            && !entry.shelved
        {
            entry.shelved = true;
            self.shelved += 1;
        }
    }

    /// Messages shelved.
    pub fn shelved(&self) -> usize {
        self.shelved
    }

    /// Unshelves every shelved message: its offset, to go back in line.
    pub fn unshelve_all(&mut self) -> Vec<i64> {
        self.shelved = 0;
        self.entries
            .iter_mut()
            .filter(|(_, entry)| entry.shelved)
            .map(|(offset, entry)| {
                entry.shelved = false;
                *offset
            })
            .collect()
    }

    /// Settles a message for good.
    pub fn ack(&mut self, offset: i64) -> Acked {
        let Some(entry) = self.entries.get_mut(&offset) else {
            return Acked::Already;
        };
        if entry.stage == Stage::Done {
            return Acked::Already;
        }
        entry.stage = Stage::Done;
        if entry.shelved {
            entry.shelved = false;
            self.shelved -= 1;
        }
        let key = entry.message.take().and_then(|message| message.key);
        let unshelved = key.and_then(|key| self.next_of_key(&key, offset));
        while let Some(first) = self.entries.first_entry() {
            if first.get().stage != Stage::Done {
                break;
            }
            first.remove();
        }
        Acked::Now { unshelved }
    }

    /// Forgets settled `offset` among its key's unsettled ones; the key's
    /// next one, unshelved, if `offset` was the oldest and the next was
    /// shelved.
    fn next_of_key(&mut self, key: &str, offset: i64) -> Option<i64> {
        let offsets = self.unsettled_by_key.get_mut(key)?;
        let was_first = offsets.first() == Some(&offset);
        offsets.remove(&offset);
        let Some(&next) = offsets.first() else {
            self.unsettled_by_key.remove(key);
            return None;
        };
        let entry = self.entries.get_mut(&next).filter(|_| was_first)?;
        if !entry.shelved {
            return None;
        }
        entry.shelved = false;
        self.shelved -= 1;
        Some(next)
    }

    /// Marks a message handed out as `attempt` as waiting for redelivery;
    /// false if that delivery is no longer the current one.
    pub fn nack(&mut self, offset: i64, attempt: u32) -> bool {
        match self.entries.get_mut(&offset) {
            Some(entry) if entry.stage == Stage::Out && entry.attempts == attempt => {
                entry.stage = Stage::Waiting;
                true
            }
            _ => false,
        }
    }

    /// Whether the delivery of `offset` handed out as `attempt` has been
    /// handed out again since (its holder was taken for dead, or it was
    /// nacked): settling it would settle the newer delivery.
    pub fn superseded(&self, offset: i64, attempt: u32) -> bool {
        self.entries
            .get(&offset)
            .is_some_and(|entry| entry.attempts != attempt)
    }

    /// Takes back what `holder` has out, to hand out again; the offsets.
    pub fn release(&mut self, holder: u64) -> Vec<i64> {
        let mut released = Vec::new();
        for (offset, entry) in &mut self.entries {
            if entry.stage == Stage::Out && entry.holder == holder {
                entry.stage = Stage::Waiting;
                released.push(*offset);
            }
        }
        released
    }

    /// Whether anything received is not done yet.
    pub fn holds_work(&self) -> bool {
        self.entries.values().any(|e| e.stage != Stage::Done)
    }

    /// The offset to commit: the lowest not done.
    pub fn commit_offset(&self) -> Option<i64> {
        match self.entries.first_key_value() {
            Some((offset, _)) => Some(*offset),
            None => self.next_offset,
        }
    }

    /// What the commit metadata says about attempts past the commit offset.
    pub fn notes(&self) -> Prior {
        let mut books = Prior {
            delivered_through: self.delivered_through.max(self.prior.delivered_through),
            ..Prior::default()
        };
        for (offset, entry) in &self.entries {
            if entry.stage == Stage::Done {
                match books.settled.last_mut() {
                    Some((_, last)) if *last + 1 == *offset => *last = *offset,
                    _ => books.settled.push((*offset, *offset)),
                }
            } else if entry.attempts >= 2 {
                books.attempts.insert(*offset, entry.attempts);
            }
        }
        // What an earlier owner noted and this member has not received.
        let received_up_to = self.next_offset.unwrap_or(i64::MIN);
        for (offset, attempts) in self.prior.attempts.range(received_up_to..) {
            books.attempts.insert(*offset, *attempts);
        }
        for (first, last) in &self.prior.settled {
            if *last >= received_up_to {
                books.settled.push(((*first).max(received_up_to), *last));
            }
        }
        books
    }

    /// The commit to send, if it differs from the last one sent.
    pub fn due_commit(&self) -> Option<(i64, String)> {
        let offset = self.commit_offset()?;
        let metadata = self.notes().encode();
        let due = (offset, metadata);
        (self.committed.as_ref() != Some(&due)).then_some(due)
    }

    pub fn committed(&mut self, commit: (i64, String)) {
        self.committed = Some(commit);
    }
}

/// Ledgers of the partitions a member holds, by topic and partition.
pub type Ledgers = HashMap<std::sync::Arc<str>, BTreeMap<i32, Ledger>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: i64) -> Message {
        Message::new("t", n.to_string())
    }

    #[test]
    fn commits_only_up_to_the_first_unfinished_offset() {
        let mut ledger = Ledger::new(1, None, Prior::default());
        for offset in 10..15 {
            assert_eq!(
                ledger.receive(offset, message(offset), || 0),
                Received::Filed
            );
        }
        assert_eq!(
            ledger.receive(12, message(12), || 0),
            Received::Ignored,
            "a re-fetch is ignored"
        );
        for offset in 10..15 {
            assert_eq!(ledger.hand_out(offset, 1).unwrap().1, 1);
        }
        assert_ne!(ledger.ack(11), Acked::Already);
        assert_ne!(ledger.ack(13), Acked::Already);
        assert_eq!(ledger.commit_offset(), Some(10));
        assert_ne!(ledger.ack(10), Acked::Already);
        assert_eq!(ledger.commit_offset(), Some(12));
        assert!(ledger.nack(12, 1));
        assert!(!ledger.nack(12, 1), "settled once");
        assert!(!ledger.superseded(12, 1), "not handed out again yet");
        assert_eq!(ledger.hand_out(12, 1).unwrap().1, 2);
        assert!(ledger.superseded(12, 1), "the first delivery is stale");
        assert!(!ledger.superseded(12, 2));
        assert_ne!(ledger.ack(12), Acked::Already);
        assert_ne!(ledger.ack(14), Acked::Already);
        assert_eq!(ledger.commit_offset(), Some(15));
        assert!(!ledger.holds_work());
        assert_eq!(ledger.ack(14), Acked::Already);
    }

    #[test]
    fn attempts_survive_a_handover_through_commit_metadata() {
        let mut first = Ledger::new(1, Some(0), Prior::default());
        for offset in 0..4 {
            first.receive(offset, message(offset), || 0);
            first.hand_out(offset, 1);
        }
        first.nack(2, 1);
        first.hand_out(2, 1);
        first.ack(0);
        let (offset, metadata) = first.due_commit().unwrap();
        assert_eq!((offset, metadata.as_str()), (1, "v1;3;2:2;"));
        first.committed((offset, metadata.clone()));
        assert_eq!(first.due_commit(), None);

        let mut next = Ledger::new(2, Some(offset), Prior::parse(&metadata));
        let attempts: Vec<u32> = (1..5)
            .map(|o| {
                next.receive(o, message(o), || 0);
                next.hand_out(o, 1).unwrap().1
            })
            .collect();
        assert_eq!(attempts, [2, 3, 2, 1]);
        assert_eq!(Prior::parse("something else"), Prior::default());
        let merged = Prior::parse("v1;3;2:2;5").merge(Prior::parse("v1;4;2:1,3:2;6"));
        assert_eq!(merged.encode(), "v1;4;2:2,3:2;5,6");
    }

    #[test]
    fn prior_attempts_not_yet_received_stay_in_the_metadata() {
        let prior = Prior::parse("v1;9;7:3;8-9");
        let mut ledger = Ledger::new(1, Some(5), prior);
        assert_eq!(
            ledger.due_commit().unwrap(),
            (5, "v1;9;7:3;8-9".to_string())
        );
        ledger.receive(5, message(5), || 0);
        ledger.receive(6, message(6), || 0);
        ledger.hand_out(6, 1);
        ledger.ack(6);
        assert_eq!(
            ledger.due_commit().unwrap(),
            (5, "v1;9;7:3;6,8-9".to_string())
        );
    }

    #[test]
    fn offsets_settled_under_an_earlier_owner_are_skipped() {
        let mut first = Ledger::new(1, Some(0), Prior::default());
        for offset in 0..5 {
            first.receive(offset, message(offset), || 0);
            first.hand_out(offset, 1);
        }
        for offset in [1, 2, 4] {
            first.ack(offset);
        }
        let (offset, metadata) = first.due_commit().unwrap();
        assert_eq!((offset, metadata.as_str()), (0, "v1;4;;1-2,4"));
        let mut next = Ledger::new(2, Some(0), Prior::parse(&metadata));
        let handed: Vec<bool> = (0..6)
            .map(|o| next.receive(o, message(o), || 0) == Received::Filed)
            .collect();
        assert_eq!(handed, [true, false, false, true, false, true]);
        next.hand_out(0, 1);
        next.ack(0);
        assert_eq!(next.commit_offset(), Some(3));
    }

    #[test]
    fn a_committed_start_is_confirmed_before_later_records_are_taken() {
        let mut ledger = Ledger::confirming(1, 5, Prior::default());
        assert_eq!(
            ledger.receive(16, message(16), || 0),
            Received::FetchFrom(0),
            "the batch holding 5 was skipped"
        );
        assert_eq!(ledger.commit_offset(), Some(5));
        for offset in 0..5 {
            assert_eq!(
                ledger.receive(offset, message(offset), || 0),
                Received::Ignored
            );
        }
        assert!(ledger.landing.is_none());
        assert_eq!(ledger.receive(5, message(5), || 0), Received::Filed);
        assert_eq!(ledger.receive(16, message(16), || 0), Received::Filed);
    }

    #[test]
    fn only_settling_a_keys_oldest_message_unshelves_the_next() {
        let mut ledger = Ledger::new(1, Some(0), Prior::default());
        for (offset, key) in ["a", "b", "a", "a", "b"].iter().enumerate() {
            let offset = offset as i64;
            ledger.receive(offset, message(offset).with_key(*key), || 0);
        }
        assert!(!ledger.behind_its_key(0));
        assert!(!ledger.behind_its_key(1));
        assert!(ledger.behind_its_key(2));
        assert!(ledger.behind_its_key(3));
        assert!(ledger.behind_its_key(4));
        for offset in [2, 3, 4] {
            ledger.shelve(offset);
        }
        ledger.shelve(4);
        assert_eq!(ledger.shelved(), 3, "shelving twice counts once");

        // Settled out of turn (as an unordered group may), a later message
        // of `a` unshelves nothing: the oldest is still unsettled.
        ledger.hand_out(3, 1);
        assert_eq!(ledger.ack(3), Acked::Now { unshelved: None });
        assert_eq!(ledger.shelved(), 2, "an acked shelved message is not");
        ledger.hand_out(0, 1);
        assert_eq!(ledger.ack(0), Acked::Now { unshelved: Some(2) });
        assert!(!ledger.behind_its_key(2));
        ledger.hand_out(1, 1);
        assert_eq!(ledger.ack(1), Acked::Now { unshelved: Some(4) });
        assert_eq!(ledger.ack(1), Acked::Already);
        assert_eq!(ledger.shelved(), 0);
        ledger.hand_out(2, 1);
        assert_eq!(ledger.ack(2), Acked::Now { unshelved: None });
        assert!(
            !ledger.unsettled_by_key.contains_key("a"),
            "a key settled is forgotten"
        );
    }
}
