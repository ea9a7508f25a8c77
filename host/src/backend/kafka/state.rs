//! What a subscription's consumer thread and its async side share: the
//! ledgers of the partitions the member holds, the queue of messages ready
//! to hand out, nacked messages waiting out their delay, and the signals
//! between the two sides.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use super::ledger::{Ledger, Ledgers, Prior, Received};
use crate::backend::{Delivery, Receipt};
use crate::message::Message;

/// How many buffers' worth of messages an ordered group's line may hold,
/// most of them waiting behind their keys' earlier ones (see
/// [`State::fill`]).
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
    /// first.
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
        let ledger = self
            .ledger_at(&topic, partition, epoch)
            .expect("found above");
        let received = ledger.receive(offset, message, log_start);
        if received == Received::Filed {
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
    /// partition (out, or waiting out a nack) stays in line, in its place.
    pub fn hand_out(&mut self, max: usize, subscription: u64) -> Vec<Delivery> {
        let held_back = if self.ordered() {
            self.held_back()
        } else {
            Vec::new()
        };
        let mut deliveries = Vec::new();
        let mut kept = VecDeque::new();
        let mut position = 0;
        while deliveries.len() < max {
            let Some(ticket) = self.ready.pop_front() else {
                break;
            };
            position += 1;
            if held_back.get(position - 1) == Some(&true) {
                kept.push_back(ticket);
                continue;
            }
            let Some((message, attempt)) = self
                .ledger(&ticket)
                .and_then(|l| l.hand_out(ticket.offset, subscription))
            else {
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
        while let Some(ticket) = kept.pop_back() {
            self.ready.push_front(ticket);
        }
        deliveries
    }

    /// Whether a subscription of the member asked for key affinity.
    fn ordered(&self) -> bool {
        self.subscribers.values().any(|s| s.ordered)
    }

    /// For each ticket in line, in order, whether its key has an older
    /// unsettled message in its partition. Handing messages out does not
    /// change the answer, since an unsettled message counts whether it is
    /// out or not.
    fn held_back(&self) -> Vec<bool> {
        let mut firsts: HashMap<(&str, i32, u64), HashMap<&str, i64>> = HashMap::new();
        self.ready
            .iter()
            .map(|ticket| {
                let Some(ledger) = self
                    .ledgers
                    .get(&ticket.topic)
                    .and_then(|partitions| partitions.get(&ticket.partition))
                    .filter(|ledger| ledger.epoch == ticket.epoch)
                else {
                    return false;
                };
                let Some(key) = ledger.key(ticket.offset) else {
                    return false;
                };
                let first = firsts
                    .entry((&ticket.topic, ticket.partition, ticket.epoch))
                    .or_insert_with(|| ledger.first_of_keys());
                first.get(key).is_some_and(|&offset| offset < ticket.offset)
            })
            .collect()
    }

    /// Puts what `subscription` holds back in line, first, for any
    /// subscription to take: it stopped fetching for a lease, or closed.
    /// Returns how many.
    pub fn release(&mut self, subscription: u64) -> usize {
        let mut released = Vec::new();
        for (topic, partitions) in &mut self.ledgers {
            for (partition, ledger) in partitions.iter_mut() {
                for offset in ledger.release(subscription) {
                    released.push(Ticket {
                        topic: topic.clone(),
                        partition: *partition,
                        offset,
                        epoch: ledger.epoch,
                    });
                }
            }
        }
        released.sort();
        let count = released.len();
        for ticket in released.into_iter().rev() {
            self.ready.push_front(ticket);
        }
        count
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
    /// [`WAITING_PER_BUFFER`]th of the line if that is more: behind each
    /// key's message out come the key's later ones, which feed no route
    /// until it is settled, and with many keys they filled the buffer while
    /// little of it could go out (in the broker bench, over 1,000 keys, an
    /// ordered route ran at about half the rate of an unordered one while
    /// they counted in full). Only a line of more than `half` is looked
    /// into: less cannot be full, nor stay so.
    pub fn fill(&self, half: usize) -> usize {
        let in_line = self.ready.len();
        if in_line <= half || !self.ordered() {
            return in_line;
        }
        let free = self.held_back().iter().filter(|held| !**held).count();
        free.max(in_line / WAITING_PER_BUFFER)
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
    /// offset order, and one subscription (`ordered` or not).
    fn books(keys: &[&str], ordered: bool) -> State {
        let mut state = State::default();
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
        let lease = std::time::Duration::from_secs(30);
        state.subscribers.insert(1, Subscriber::new(lease, ordered));
        state
    }

    fn payloads(deliveries: &[Delivery]) -> Vec<String> {
        deliveries
            .iter()
            .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
            .collect()
    }

    #[test]
    fn an_ordered_member_hands_out_a_key_only_after_its_previous_message() {
        let mut state = books(&["a", "b", "a", "c", "b"], true);
        let first = state.hand_out(10, 1);
        assert_eq!(payloads(&first), ["0", "1", "3"]);
        assert!(state.hand_out(10, 1).is_empty(), "a and b are out");

        // Acked, `a` lets its next go; nacked, `b` holds its key.
        let ticket = |d: &Delivery| d.receipt.get::<KafkaReceipt>().unwrap().ticket.clone();
        let (a, b) = (ticket(&first[0]), ticket(&first[1]));
        state.ledger(&a).unwrap().ack(a.offset);
        assert!(state.ledger(&b).unwrap().nack(b.offset, 1));
        state.ready.push_front(b);
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
        assert_eq!(unordered.fill(0), 40);
        let mut ordered = books(&keys, true);
        // Each key's first could go out; the rest wait behind it, and count
        // an eighth.
        assert_eq!(ordered.fill(0), 5);
        assert_eq!(
            ordered.fill(40),
            40,
            "a line within half is not looked into"
        );
        assert_eq!(payloads(&ordered.hand_out(10, 1)), ["0", "1"]);
        assert_eq!(ordered.fill(0), 38 / WAITING_PER_BUFFER);
        let keys = ["a", "b", "c", "a"];
        assert_eq!(books(&keys, true).fill(0), 3);
    }

    #[test]
    fn an_unordered_member_hands_out_in_line() {
        let mut state = books(&["a", "b", "a", "c", "b"], false);
        assert_eq!(payloads(&state.hand_out(10, 1)), ["0", "1", "2", "3", "4"]);
    }
}
