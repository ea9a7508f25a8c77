//! What a subscription's consumer thread and its async side share: the
//! ledgers of the partitions the member holds, the queue of messages ready
//! to hand out, nacked messages waiting out their delay, and the signals
//! between the two sides.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use super::ledger::{Acked, Ledger, Ledgers, Prior, Received};
use crate::backend::{Delivery, Receipt};
use crate::message::Message;

/// How many buffers' worth of messages an ordered group's member may hold,
/// in line and shelved together, most of them shelved behind their keys'
/// earlier ones (see [`State::fill`]).
const WAITING_PER_BUFFER: usize = 8;

/// One offset of one assignment of a partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The assignment it belongs to: a ticket of an earlier one is stale.
    pub epoch: u64,
}

/// The receipt of a Kafka delivery.
#[derive(Debug)]
pub struct KafkaReceipt {
    /// The subscription that handed it out.
    pub subscription: u64,
    pub ticket: Ticket,
    pub attempt: u32,
}

#[derive(Default)]
pub struct State {
    pub ledgers: Ledgers,
    /// In the order to hand out: per partition in offset order, redeliveries
    /// first. An ordered group's messages behind an unsettled one of their
    /// key are shelved in their ledgers instead, out of line.
    pub ready: VecDeque<Ticket>,
    /// Nacked messages by the time they are due.
    pub delayed: BinaryHeap<Reverse<(Instant, Ticket)>>,
    next_epoch: u64,
    /// Assignments received so far (a member that joins waits for one).
    pub assignments: u64,
    /// The subscriptions sharing this member, by id.
    pub subscribers: HashMap<u64, Subscriber>,
    /// Partitions of a `latest` group whose end is still being found out
    /// (see [`Resolving`]); their records are not filed until then.
    pub resolving: Vec<Resolving>,
    /// The member left the group because no subscription fetched while
    /// messages waited; the next fetch makes it join again.
    pub parked: bool,
}

impl State {
    pub fn new_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    /// The ledger of a ticket's partition, if it still holds the ticket's
    /// assignment.
    pub fn ledger(&mut self, ticket: &Ticket) -> Option<&mut Ledger> {
        self.ledger_at(&ticket.topic, ticket.partition, ticket.epoch)
    }

    pub fn ledger_at(&mut self, topic: &str, partition: i32, epoch: u64) -> Option<&mut Ledger> {
        self.ledgers
            .get_mut(topic)?
            .get_mut(&partition)
            .filter(|ledger| ledger.epoch == epoch)
    }

    /// Files a received record in its partition's ledger and queues it, if
    /// the partition is held (still) and the record is to be handed out;
    /// `log_start` as for [`Ledger::receive`].
    pub fn file(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        message: Message,
        log_start: impl FnOnce() -> i64,
    ) -> Received {
        let Some((topic, partitions)) = self.ledgers.get_key_value(topic) else {
            return Received::Ignored;
        };
        let topic = topic.clone();
        let Some(ledger) = partitions.get(&partition) else {
            return Received::Ignored;
        };
        let epoch = ledger.epoch;
        let ordered = self.ordered();
        let ledger = self
            .ledger_at(&topic, partition, epoch)
            .expect("found above");
        let received = ledger.receive(offset, message, log_start);
        if received == Received::Filed {
            if ordered && ledger.behind_its_key(offset) {
                ledger.shelve(offset);
                return received;
            }
            self.ready.push_back(Ticket {
                topic,
                partition,
                offset,
                epoch,
            });
        }
        received
    }

    /// Forgets every partition: their deliveries' settlements become no-ops.
    pub fn forget_partitions(&mut self) {
        self.ledgers.clear();
        self.resolving.clear();
        self.ready.clear();
        self.delayed.clear();
    }

    /// Whether the member holds anything the application has not finished.
    pub fn holds_work(&self) -> bool {
        !self.delayed.is_empty()
            || self
                .ledgers
                .values()
                .flat_map(|partitions| partitions.values())
                .any(Ledger::holds_work)
    }

    /// Moves nacked messages whose delay is over to the front of the line;
    /// returns when the next one is due.
    pub fn release_due(&mut self, now: Instant) -> Option<Instant> {
        let mut due = Vec::new();
        while let Some(Reverse((at, _))) = self.delayed.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, ticket)) = self.delayed.pop().expect("peeked");
            due.push(ticket);
        }
        // Oldest offsets end up first.
        due.sort();
        for ticket in due.into_iter().rev() {
            self.ready.push_front(ticket);
        }
        self.delayed.peek().map(|Reverse((at, _))| *at)
    }

    /// Up to `max` deliveries from the front of the line. For an ordered
    /// group, a message whose key has an older unsettled one in its
    /// partition (out, or waiting out a nack) is shelved instead: settling
    /// that one puts it back in line ([`State::settled`]).
    pub fn hand_out(&mut self, max: usize, subscription: u64) -> Vec<Delivery> {
        let ordered = self.ordered();
        let mut deliveries = Vec::new();
        while deliveries.len() < max {
            let Some(ticket) = self.ready.pop_front() else {
                break;
            };
            let Some(ledger) = self.ledger(&ticket) else {
                continue;
            };
            // Filed before a subscription asked for order.
            if ordered && ledger.behind_its_key(ticket.offset) {
                ledger.shelve(ticket.offset);
                continue;
            }
            let Some((message, attempt)) = ledger.hand_out(ticket.offset, subscription) else {
                continue;
            };
            deliveries.push(Delivery {
                message,
                attempt,
                receipt: Receipt::new(KafkaReceipt {
                    subscription,
                    ticket,
                    attempt,
                }),
            });
        }
        deliveries
    }

    /// Settles `ticket` for good in its ledger; the key's next message, if
    /// it was shelved and goes back in line now.
    pub fn settled(&mut self, ticket: &Ticket) -> Option<Ticket> {
        match self.ledger(ticket)?.ack(ticket.offset) {
            Acked::Now {
                unshelved: Some(offset),
            } => Some(Ticket {
                offset,
                ..ticket.clone()
            }),
            _ => None,
        }
    }

    /// Whether a subscription of the member asked for key affinity.
    fn ordered(&self) -> bool {
        self.subscribers.values().any(|s| s.ordered)
    }

    /// Removes a subscription and puts what it holds back in line; false if
    /// it was not there. When no subscription asks for order any more,
    /// shelved messages go back in line too.
    pub fn detach(&mut self, id: u64) -> bool {
        if self.subscribers.remove(&id).is_none() {
            return false;
        }
        let mut back = self.take_from_ledgers(|ledger| ledger.release(id));
        if !self.ordered() {
            back.extend(self.take_from_ledgers(Ledger::unshelve_all));
        }
        self.put_first(back);
        true
    }

    /// Puts tickets at the front of the line, lowest offsets first.
    pub fn put_first(&mut self, mut tickets: Vec<Ticket>) {
        tickets.sort();
        for ticket in tickets.into_iter().rev() {
            self.ready.push_front(ticket);
        }
    }

    /// Puts what `subscription` holds back in line, first, for any
    /// subscription to take: it stopped fetching for a lease, or closed.
    /// Returns how many.
    pub fn release(&mut self, subscription: u64) -> usize {
        let released = self.take_from_ledgers(|ledger| ledger.release(subscription));
        let count = released.len();
        self.put_first(released);
        count
    }

    /// The tickets of the offsets `take` takes from each ledger.
    fn take_from_ledgers(&mut self, mut take: impl FnMut(&mut Ledger) -> Vec<i64>) -> Vec<Ticket> {
        let mut tickets = Vec::new();
        for (topic, partitions) in &mut self.ledgers {
            for (partition, ledger) in partitions.iter_mut() {
                tickets.extend(take(ledger).into_iter().map(|offset| Ticket {
                    topic: topic.clone(),
                    partition: *partition,
                    offset,
                    epoch: ledger.epoch,
                }));
            }
        }
        tickets
    }

    /// Subscriptions that are not fetching and have neither fetched nor
    /// settled for their lease.
    pub fn idle_subscribers(&self) -> Vec<u64> {
        self.subscribers
            .iter()
            .filter(|(_, s)| s.fetching == 0 && s.last_active.elapsed() >= s.lease)
            .map(|(id, _)| *id)
            .collect()
    }

    /// How full the line is, against the member's `buffer`: the messages
    /// in it. For an ordered group, those it could hand out now, or a
    /// [`WAITING_PER_BUFFER`]th of them and the shelved ones together if
    /// that is more: shelved messages feed no route until their keys'
    /// earlier ones are settled, and with many keys they filled the buffer
    /// while little of it could go out (in the broker bench, over 1,000
    /// keys, an ordered route ran at about half the rate of an unordered
    /// one while they counted in full).
    pub fn fill(&self) -> usize {
        let in_line = self.ready.len();
        if !self.ordered() {
            return in_line;
        }
        let shelved: usize = self
            .ledgers
            .values()
            .flat_map(|partitions| partitions.values())
            .map(Ledger::shelved)
            .sum();
        in_line.max((in_line + shelved) / WAITING_PER_BUFFER)
    }
}

/// One subscription sharing the member.
#[derive(Debug)]
pub struct Subscriber {
    /// When it last fetched or settled, and fetches in progress: a
    /// subscription that holds messages and has done neither for a lease
    /// is taken for dead. (A busy route may go longer than a lease without
    /// fetching, its workers' lanes full, while it settles all along.)
    pub last_active: Instant,
    pub fetching: usize,
    pub lease: std::time::Duration,
    /// Asked for key affinity ([`crate::backend::SubscribeOptions::ordered`]).
    pub ordered: bool,
}

impl Subscriber {
    pub fn new(lease: std::time::Duration, ordered: bool) -> Self {
        Subscriber {
            last_active: Instant::now(),
            fetching: 0,
            lease,
            ordered,
        }
    }
}

/// A partition a `latest` group gets for the first time, assigned a little
/// before its end while the consumer learns where the end is from a fetch
/// response: tansu 0.6.0 answers ListOffsets(latest) with the base offset of
/// the newest record batch plus one, not the high watermark, so a batch of
/// ten would otherwise be read again from its second record.
#[derive(Debug)]
pub struct Resolving {
    pub topic: String,
    pub partition: i32,
    /// What ListOffsets said: the end is at least here.
    pub at_least: i64,
    pub prior: Prior,
}

/// The state and the signals, shared by both sides.
#[derive(Default)]
pub struct Shared {
    state: Mutex<State>,
    /// Something was added to the line, a partition was assigned, or the
    /// subscription closed.
    pub changed: Notify,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough books:
        // every change is a single map or queue operation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kafka::ledger::Prior;

    /// A member's books with one partition of `orders` holding `keys`, in
    /// offset order, filed after one subscription (`ordered` or not)
    /// attached.
    fn books(keys: &[&str], ordered: bool) -> State {
        let mut state = State::default();
        let lease = std::time::Duration::from_secs(30);
        state.subscribers.insert(1, Subscriber::new(lease, ordered));
        let epoch = state.new_epoch();
        state
            .ledgers
            .entry(Arc::from("orders"))
            .or_default()
            .insert(0, Ledger::new(epoch, Some(0), Prior::default()));
        for (offset, key) in keys.iter().enumerate() {
            let message = Message::new("orders", offset.to_string()).with_key(*key);
            state.file("orders", 0, offset as i64, message, || 0);
        }
        state
    }

    fn payloads(deliveries: &[Delivery]) -> Vec<String> {
        deliveries
            .iter()
            .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
            .collect()
    }

    fn ticket(delivery: &Delivery) -> Ticket {
        delivery
            .receipt
            .get::<KafkaReceipt>()
            .unwrap()
            .ticket
            .clone()
    }

    #[test]
    fn an_ordered_member_hands_out_a_key_only_after_its_previous_message() {
        let mut state = books(&["a", "b", "a", "c", "b"], true);
        let first = state.hand_out(10, 1);
        assert_eq!(payloads(&first), ["0", "1", "3"]);
        assert!(state.hand_out(10, 1).is_empty(), "a and b are out");

        // Acked, `a` lets its next go; nacked, `b` holds its key.
        let (a, b) = (ticket(&first[0]), ticket(&first[1]));
        let next_of_a = state.settled(&a);
        assert_eq!(next_of_a.as_ref().map(|t| t.offset), Some(2));
        assert!(state.ledger(&b).unwrap().nack(b.offset, 1));
        state.put_first(vec![b].into_iter().chain(next_of_a).collect());
        assert_eq!(payloads(&state.hand_out(10, 1)), ["1", "2"]);
        assert!(
            state.hand_out(10, 1).is_empty(),
            "b's second waits for its first"
        );
    }

    #[test]
    fn an_ordered_line_is_as_full_as_what_it_could_hand_out() {
        let keys: Vec<String> = (0..40).map(|i| format!("k{}", i % 2)).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let unordered = books(&keys, false);
        assert_eq!(unordered.fill(), 40);
        let mut ordered = books(&keys, true);
        // Each key's first could go out; the rest are shelved behind it,
        // and count an eighth.
        assert_eq!(ordered.ready.len(), 2);
        assert_eq!(ordered.fill(), 40 / WAITING_PER_BUFFER);
        assert_eq!(payloads(&ordered.hand_out(10, 1)), ["0", "1"]);
        assert_eq!(ordered.fill(), 38 / WAITING_PER_BUFFER);
        let keys = ["a", "b", "c", "a"];
        assert_eq!(books(&keys, true).fill(), 3);
    }

    #[test]
    fn settling_a_key_in_turn_brings_out_each_of_its_messages_in_order() {
        let keys: Vec<String> = (0..300).map(|i| format!("k{}", i % 7)).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut state = books(&keys, true);
        let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
        let mut out = state.hand_out(3, 1);
        while !out.is_empty() {
            let mut again = Vec::new();
            for delivery in &out {
                let ticket = ticket(delivery);
                let key = delivery.message.key.clone().unwrap();
                seen.entry(key).or_default().push(ticket.offset);
                again.extend(state.settled(&ticket));
            }
            state.put_first(again);
            out = state.hand_out(3, 1);
        }
        assert_eq!(seen.values().map(Vec::len).sum::<usize>(), 300);
        for (key, offsets) in &seen {
            assert!(offsets.is_sorted(), "{key}: {offsets:?}");
        }
        assert!(!state.holds_work());
    }

    #[test]
    fn a_member_shelves_when_a_subscription_asks_for_order_and_unshelves_when_none_does() {
        let mut state = books(&["a", "a", "b", "a"], false);
        let lease = std::time::Duration::from_secs(30);
        state.subscribers.insert(2, Subscriber::new(lease, true));
        // Filed in line before; shelved as they come to the front.
        assert_eq!(payloads(&state.hand_out(10, 2)), ["0", "2"]);
        assert!(state.ready.is_empty());
        assert!(state.detach(2), "it was attached");
        assert_eq!(
            payloads(&state.hand_out(10, 1)),
            ["0", "1", "2", "3"],
            "with no one asking for order, the shelved go back in line, and what the \
             one detached held"
        );
    }

    #[test]
    fn an_unordered_member_hands_out_in_line() {
        let mut state = books(&["a", "b", "a", "c", "b"], false);
        assert_eq!(payloads(&state.hand_out(10, 1)), ["0", "1", "2", "3", "4"]);
    }
}
