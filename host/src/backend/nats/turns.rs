//! Key turns within one member of an ordered JetStream group. The member
//! alone reads the key shards it leases (see `leases.rs`) and pulls many of
//! their messages at once; of those it hands out each key's oldest
//! unsettled message only, the next once that one is acked, and keeps a
//! nacked one to hand out again after its delay. So a key's later messages
//! wait behind a retry here, as the server would only redeliver it after
//! them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Delivery;

/// Where a held message came from: its target and stream sequence.
pub(crate) type Place = (usize, u64);

#[derive(Default)]
pub(crate) struct KeyTurns {
    /// Keys with a message out (handed out, ready or kept for a retry),
    /// with their later messages by stream sequence.
    keys: HashMap<String, BTreeMap<u64, Delivery>>,
    /// Messages whose turn came, to hand out.
    ready: VecDeque<Delivery>,
    /// Nacked messages, to hand out again once due.
    retries: Vec<(Instant, Delivery)>,
    /// Every message here or out, so a redelivery of one is not taken twice.
    known: HashSet<Place>,
    waiting: usize,
}

impl KeyTurns {
    /// Takes in a message pulled for `key`; false if it is a redelivery of
    /// one already here or out (the member keeps the first).
    pub fn admit(&mut self, key: String, place: Place, delivery: Delivery) -> bool {
        if !self.known.insert(place) {
            return false;
        }
        match self.keys.get_mut(&key) {
            Some(later) => {
                later.insert(place.1, delivery);
                self.waiting += 1;
            }
            None => {
                self.keys.insert(key, BTreeMap::new());
                self.ready.push_back(delivery);
            }
        }
        true
    }

    /// The message of `key` at `place` was acked: the key's next one, if
    /// any, gets its turn.
    pub fn settled(&mut self, key: &str, place: Place) {
        self.known.remove(&place);
        let Some(later) = self.keys.get_mut(key) else {
            return;
        };
        match later.pop_first() {
            Some((_, next)) => {
                self.waiting -= 1;
                self.ready.push_back(next);
            }
            None => {
                self.keys.remove(key);
            }
        }
    }

    /// Hands `delivery` (a nacked message, its attempt counted on) out
    /// again after `delay`, its key held until then.
    pub fn retry(&mut self, delivery: Delivery, delay: Duration) {
        self.retries.push((Instant::now() + delay, delivery));
    }

    /// Up to `max` messages whose turn came: due retries first.
    pub fn take(&mut self, max: usize) -> Vec<Delivery> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut index = 0;
        while index < self.retries.len() && out.len() < max {
            if self.retries[index].0 <= now {
                out.push(self.retries.swap_remove(index).1);
            } else {
                index += 1;
            }
        }
        while out.len() < max
            && let Some(delivery) = self.ready.pop_front()
        {
            out.push(delivery);
        }
        out
    }

    /// When the next retry is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.iter().map(|(due, _)| *due).min()
    }

    /// Messages waiting behind their key's.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Forgets everything, for a closing subscription that hands back all
    /// it holds.
    pub fn clear(&mut self) {
        *self = KeyTurns::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Receipt;
    use crate::message::Message;

    fn delivery(text: &str) -> Delivery {
        Delivery {
            message: Message::new("t", text.to_string()),
            attempt: 1,
            receipt: Receipt::new(0u64),
        }
    }

    fn texts(deliveries: &[Delivery]) -> Vec<String> {
        deliveries
            .iter()
            .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
            .collect()
    }

    #[test]
    fn a_keys_next_message_waits_until_the_previous_is_acked() {
        let mut turns = KeyTurns::default();
        assert!(turns.admit("a".into(), (0, 1), delivery("a1")));
        assert!(turns.admit("b".into(), (0, 2), delivery("b1")));
        assert!(turns.admit("a".into(), (0, 4), delivery("a3")));
        assert!(turns.admit("a".into(), (0, 3), delivery("a2")));
        assert!(!turns.admit("a".into(), (0, 3), delivery("a2 again")));
        assert_eq!(texts(&turns.take(10)), ["a1", "b1"]);
        assert_eq!(turns.waiting(), 2);
        turns.settled("a", (0, 1));
        // By stream sequence, not by when they arrived.
        assert_eq!(texts(&turns.take(10)), ["a2"]);
        turns.settled("a", (0, 3));
        turns.settled("b", (0, 2));
        assert_eq!(texts(&turns.take(10)), ["a3"]);
        turns.settled("a", (0, 4));
        assert!(turns.take(10).is_empty());
        assert!(turns.keys.is_empty());
    }

    #[test]
    fn a_retry_holds_its_key_and_comes_back_when_due() {
        let mut turns = KeyTurns::default();
        turns.admit("a".into(), (0, 1), delivery("a1"));
        turns.admit("a".into(), (0, 2), delivery("a2"));
        let first = turns.take(10).pop().unwrap();
        turns.retry(first, Duration::from_millis(50));
        assert!(turns.take(10).is_empty());
        let due = turns.next_retry().unwrap();
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        assert_eq!(texts(&turns.take(10)), ["a1"]);
        turns.settled("a", (0, 1));
        assert_eq!(texts(&turns.take(10)), ["a2"]);
    }
}
