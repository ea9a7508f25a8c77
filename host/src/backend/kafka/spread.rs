//! Where messages without a key go. librdkafka's sticky partitioner sends a
//! burst of them to whichever partition its current batch fills, so one
//! publish may land anywhere from one partition to all of them. Sluice
//! sends them instead in runs of [`RUN`] consecutive messages, each run to
//! the next partition in turn: a small burst stays in one partition, in
//! order, and a large one, or many small ones, spread over every partition
//! (and so over every member of a group).

use std::collections::HashMap;
use std::sync::Mutex;

/// Keyless messages sent to one partition before moving to the next.
pub const RUN: usize = 16;

#[derive(Default)]
pub struct Spread {
    /// Per topic: its partition count and the next partition to fill.
    topics: Mutex<HashMap<String, (i32, u64)>>,
}

impl Spread {
    /// The partition count of `topic`, if known.
    pub fn partitions(&self, topic: &str) -> Option<i32> {
        self.lock().get(topic).map(|(count, _)| *count)
    }

    pub fn learn(&self, topic: &str, partitions: i32) {
        let mut topics = self.lock();
        let next = topics.get(topic).map_or(0, |(_, next)| *next);
        topics.insert(topic.to_string(), (partitions.max(1), next));
    }

    /// Partitions for `count` keyless messages of `topic` published
    /// together, in order.
    pub fn plan(&self, topic: &str, count: usize) -> Vec<i32> {
        let mut topics = self.lock();
        let (partitions, next) = topics.entry(topic.to_string()).or_insert((1, 0));
        let runs = count.div_ceil(RUN) as u64;
        let first = *next;
        *next += runs;
        (0..count)
            .map(|i| ((first + (i / RUN) as u64) % *partitions as u64) as i32)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i32, u64)>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_rotate_over_the_partitions() {
        let spread = Spread::default();
        spread.learn("t", 3);
        assert_eq!(spread.plan("t", 5), [0; 5]);
        let big = spread.plan("t", 40);
        assert_eq!(&big[..16], &[1; 16]);
        assert_eq!(&big[16..32], &[2; 16]);
        assert_eq!(&big[32..], &[0; 8]);
        assert_eq!(spread.plan("t", 1), [1]);
    }
}
