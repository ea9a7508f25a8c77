//! Queue and topic names. SQS allows 80 characters of `[A-Za-z0-9_-]` in a
//! queue name and SNS 256 in a topic name; Sluice topics and groups allow
//! more (dots above all), so each name carries a readable part and a hash.
//!
//! A queue is `<prefix><topic part>--<group part>`, each part being the
//! name cut to letters, digits and `_` (anything else becomes `_`, and it is
//! shortened to fit) followed by `-` and 12 hex digits of the SHA-256 of the
//! full name. The readable parts hold no `-`, so the first `-` ends the
//! topic's readable part, the hash after it is the topic's, and a listing
//! with the prefix `<prefix><topic part>--` finds exactly that topic's group
//! queues. A queue's dead-letter queue has the same name with `-dlq`
//! appended, which a group part (ending in hex digits) never has.
//!
//! An ordered group's queue is a FIFO queue: the same name with `.fifo`
//! after it (as SQS requires; the group part is cut 5 characters shorter
//! where it must), and its dead-letter queue `…-dlq.fifo`.
//! The group part hashes [`SubscribeOptions::group_key`], so the same group
//! name used with other topics is another group.
//!
//! A group subscribed to a topic pattern has a queue of the same form with
//! the pattern in place of the topic and one more `-` after the prefix:
//! `<prefix>-<pattern part>--<group part>`. No topic's queue starts with
//! `<prefix>-` (a topic's readable part is never empty), so a listing with
//! that prefix finds every pattern queue, and each says its pattern in a
//! tag ([`PATTERN_TAG`]).
//!
//! [`SubscribeOptions::group_key`]: crate::backend::SubscribeOptions::group_key

use sha2::{Digest, Sha256};

/// SQS's longest queue name.
const MAX_QUEUE_NAME: usize = 80;
/// Hex digits of the hash in each part.
const HASH_HEX: usize = 12;
/// Appended to a queue's name for its dead-letter queue.
pub const DLQ_SUFFIX: &str = "-dlq";
/// At the end of a FIFO queue's name, as SQS requires.
pub const FIFO_SUFFIX: &str = ".fifo";
/// Between the topic part and the group part.
const SEPARATOR: &str = "--";
/// After the prefix of a pattern queue's name.
const PATTERN_MARK: &str = "-";
/// The tag of a pattern queue that holds its pattern, hex-encoded (tag
/// values take few characters besides letters and digits).
pub const PATTERN_TAG: &str = "sluice-pattern";
/// SQS's longest tag value, over two hex digits a byte.
pub const MAX_PATTERN_BYTES: usize = 128;

/// Names of one deployment's queues and topics (one prefix).
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_string(),
        }
    }

    /// Characters left for the topic and group parts of a queue name.
    fn room(&self) -> usize {
        MAX_QUEUE_NAME - self.prefix.len() - SEPARATOR.len() - DLQ_SUFFIX.len()
    }

    fn topic_part(&self, topic: &str) -> String {
        part(topic, topic, self.room() / 2)
    }

    /// What every group queue of `topic` starts with.
    pub fn topic_queue_prefix(&self, topic: &str) -> String {
        format!("{}{}{SEPARATOR}", self.prefix, self.topic_part(topic))
    }

    /// The queue of group `group_key` (named `group`) for `topic`: a FIFO
    /// queue if `fifo`.
    pub fn queue(&self, topic: &str, group: &str, group_key: &str, fifo: bool) -> String {
        let suffix = if fifo { FIFO_SUFFIX } else { "" };
        let room = self.room() - self.topic_part(topic).len() - suffix.len();
        let name = format!(
            "{}{}{suffix}",
            self.topic_queue_prefix(topic),
            part(group, group_key, room)
        );
        debug_assert!(Self::dead_letter_queue(&name).len() <= MAX_QUEUE_NAME);
        name
    }

    /// What every pattern queue starts with.
    pub fn pattern_queue_prefix(&self) -> String {
        format!("{}{PATTERN_MARK}", self.prefix)
    }

    /// The queue of group `group_key` (named `group`) for topic pattern
    /// `pattern`: a FIFO queue if `fifo`.
    pub fn pattern_queue(&self, pattern: &str, group: &str, group_key: &str, fifo: bool) -> String {
        let suffix = if fifo { FIFO_SUFFIX } else { "" };
        let pattern_part = self.topic_part(pattern);
        let room = self.room() - PATTERN_MARK.len() - pattern_part.len() - suffix.len();
        let name = format!(
            "{}{pattern_part}{SEPARATOR}{}{suffix}",
            self.pattern_queue_prefix(),
            part(group, group_key, room)
        );
        debug_assert!(Self::dead_letter_queue(&name).len() <= MAX_QUEUE_NAME);
        name
    }

    /// The dead-letter queue of queue `queue` (a FIFO queue's is FIFO too).
    pub fn dead_letter_queue(queue: &str) -> String {
        match queue.strip_suffix(FIFO_SUFFIX) {
            Some(base) => format!("{base}{DLQ_SUFFIX}{FIFO_SUFFIX}"),
            None => format!("{queue}{DLQ_SUFFIX}"),
        }
    }

    /// Whether a queue found by listing is a group queue, not a dead-letter
    /// queue.
    pub fn is_group_queue(name: &str) -> bool {
        !name
            .strip_suffix(FIFO_SUFFIX)
            .unwrap_or(name)
            .ends_with(DLQ_SUFFIX)
    }

    /// Whether a queue (by name or URL) is a FIFO queue.
    pub fn is_fifo(queue: &str) -> bool {
        queue.ends_with(FIFO_SUFFIX)
    }

    /// The SNS topic of a Sluice topic.
    pub fn sns_topic(&self, topic: &str) -> String {
        format!("{}{}", self.prefix, self.topic_part(topic))
    }
}

/// At most `room` characters: `readable` cut short in `[A-Za-z0-9_]`, then
/// `-` and the hash of `identity`.
fn part(readable: &str, identity: &str, room: usize) -> String {
    let keep = room.saturating_sub(1 + HASH_HEX);
    let clean: String = readable
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(keep)
        .collect();
    let digest = Sha256::digest(identity.as_bytes());
    format!("{clean}-{}", &hex::encode(digest)[..HASH_HEX])
}

/// The queue name at the end of a queue URL.
pub fn queue_name_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        name.len() <= MAX_QUEUE_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }

    #[test]
    fn names_are_valid_distinct_and_found_by_their_topic_prefix() {
        let names = Names::new("sluice-");
        let a = names.queue("orders.eu", "billing", "billing[orders.eu]", false);
        let b = names.queue("orders_eu", "billing", "billing[orders_eu]", false);
        assert_ne!(a, b);
        assert!(a.starts_with("sluice-orders_eu-"), "{a}");
        assert!(a.starts_with(&names.topic_queue_prefix("orders.eu")));
        assert!(!b.starts_with(&names.topic_queue_prefix("orders.eu")));
        assert!(valid(&Names::dead_letter_queue(&a)));
        assert!(Names::is_group_queue(&a));
        assert!(!Names::is_group_queue(&Names::dead_letter_queue(&a)));
        let p = names.pattern_queue("orders.*", "billing", "billing[orders.*]", false);
        assert!(p.starts_with(&names.pattern_queue_prefix()), "{p}");
        assert!(!a.starts_with(&names.pattern_queue_prefix()));
        assert!(valid(&Names::dead_letter_queue(&p)));

        let long = "x".repeat(300);
        let names = Names::new(&"p".repeat(20));
        let q = names.queue(&long, &long, &format!("{long}[{long}]"), false);
        assert!(valid(&Names::dead_letter_queue(&q)), "{q}");
        assert_ne!(q, names.queue(&long, &long, "other", false));
        assert!(names.sns_topic(&long).len() <= 256);

        let wide = names.pattern_queue(&format!("{long}.>"), &long, "k", false);
        assert!(valid(&Names::dead_letter_queue(&wide)), "{wide}");

        // An ordered group's FIFO queue, and its dead-letter queue, for
        // the longest names too; listed by the topic's prefix like others.
        for fifo in [
            names.queue(&long, &long, "k", true),
            names.pattern_queue(&format!("{long}.>"), &long, "k", true),
        ] {
            let dead = Names::dead_letter_queue(&fifo);
            assert!(
                fifo.ends_with(".fifo") && dead.ends_with("-dlq.fifo"),
                "{dead}"
            );
            assert!(valid(&fifo.replace(".fifo", "")) && fifo.len() <= MAX_QUEUE_NAME);
            assert!(dead.len() <= MAX_QUEUE_NAME, "{dead}");
            assert!(Names::is_group_queue(&fifo) && !Names::is_group_queue(&dead));
            assert!(Names::is_fifo(&fifo) && !Names::is_fifo(&q));
        }
        assert!(
            names
                .queue(&long, &long, "k", true)
                .starts_with(&names.topic_queue_prefix(&long))
        );

        // A topic whose readable part looks like another's full part.
        let tricky = names.topic_queue_prefix("a");
        let other = names.queue(&format!("a-{}", "0".repeat(12)), "g", "g[x]", false);
        assert!(!other.starts_with(&tricky));
    }
}
