//! Key shards for JetStream (`shards=N`): where a topic's messages are kept
//! so that an ordered group can take each key's messages one at a time.
//!
//! A JetStream consumer filters on a subject only, so a key has to be in
//! the subject for a group to tell keys apart. With `shards=N` a topic's
//! messages are stored under a subject with one token more, after the
//! first: `orders.eu` keyed `k` is kept as `orders.~3.eu`, where 3 is the
//! FNV-1a (64-bit) hash of `k` modulo N, and an unkeyed message as
//! `orders.~u.eu`. The token is taken off again on delivery, so topics stay
//! what they were published as; N is fixed when a stream is made (its
//! description records it) and a URL that says otherwise is refused.
//!
//! An unordered group reads every shard through one consumer (`orders.*.eu`).
//! An ordered group has one consumer per shard, and each shard is read by
//! one member of the group at a time, the one that leases it (see
//! `leases.rs`): the member pulls many of the shard's messages at once and
//! hands out each key's next message only once the previous one is settled,
//! keeping a nacked one for its retry (see `turns.rs`). When a member dies,
//! another takes its shards once what it held has come back, and gets that
//! first, in stream order. Keys that share a shard share its member but
//! not their turns; unkeyed messages have a consumer of their own that
//! every member reads and that waits for nothing.
//!
//! Choosing N: each shard is the unit the members of a group divide among
//! themselves, and a consumer the server does some work for on every
//! message its stream stores. A few times the number of members suits most
//! groups; more than needed costs speed (in the broker bench, one member
//! over 1,000 keys ran at 0.85 of an unordered route with 8 shards and 0.55
//! with 64).
//!
//! Consumers that an ordered group made before shard leases let one message
//! out at a time (`max_ack_pending` 1). They are used as they are (order
//! holds, at the old pace); delete them while the group is stopped to have
//! them made again.

use anyhow::{Result, bail};

/// The most shards a topic may have.
pub const MAX: u32 = 1024;
/// The shard of unkeyed messages.
const UNKEYED: &str = "~u";
/// How a stream's description records its shard count.
const MARKER: &str = "sluice: topics in ";

/// One lane of a sharded topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shard {
    Keyed(u32),
    Unkeyed,
}

impl Shard {
    /// The shard that keeps a message with `key` among `count` shards.
    pub fn of(key: Option<&str>, count: u32) -> Shard {
        match key {
            Some(key) if !key.is_empty() => {
                Shard::Keyed((fnv1a(key.as_bytes()) % count as u64) as u32)
            }
            _ => Shard::Unkeyed,
        }
    }

    /// Every shard of `count`: the keyed ones, then the unkeyed one.
    pub fn all(count: u32) -> impl Iterator<Item = Shard> {
        (0..count).map(Shard::Keyed).chain([Shard::Unkeyed])
    }

    fn token(self) -> String {
        match self {
            Shard::Keyed(index) => format!("~{index}"),
            Shard::Unkeyed => UNKEYED.to_string(),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ *byte as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Puts `token` after the first token of `subject`.
fn insert(subject: &str, token: &str) -> String {
    match subject.split_once('.') {
        Some((first, rest)) => format!("{first}.{token}.{rest}"),
        None => format!("{subject}.{token}"),
    }
}

/// The subject that keeps a message of `topic` in `shard`.
pub fn subject(topic: &str, shard: Shard) -> String {
    insert(topic, &shard.token())
}

/// The topic a message was published to, from the subject that keeps it.
pub fn topic(subject: &str) -> String {
    let mut tokens = subject.splitn(3, '.');
    match (tokens.next(), tokens.next(), tokens.next()) {
        (Some(first), Some(_), Some(rest)) => format!("{first}.{rest}"),
        (Some(first), _, None) => first.to_string(),
        _ => subject.to_string(),
    }
}

/// The filter subject that reads `pattern` from one shard, or from every
/// shard (`None`). A pattern that is only `>` can be read whole but not by
/// shard.
pub fn filter(pattern: &str, shard: Option<Shard>) -> Result<String> {
    if pattern == ">" {
        match shard {
            None => return Ok(">".to_string()),
            Some(_) => bail!(
                "an ordered group cannot read `>` from a sharded stream (its shards are the \
                 second token); name the first token, as in `*.>`"
            ),
        }
    }
    Ok(insert(
        pattern,
        &shard.map_or("*".to_string(), Shard::token),
    ))
}

/// The description of a stream made with `count` shards.
pub fn describe(count: u32) -> String {
    format!("{MARKER}{count} shards by key (the second subject token)")
}

/// Refuses a stream whose shards (from its description) are not what the
/// URL says.
pub fn check_stream(name: &str, description: Option<&str>, wanted: Option<u32>) -> Result<()> {
    let recorded: Option<u32> = description
        .and_then(|d| d.strip_prefix(MARKER))
        .and_then(|d| d.split(' ').next())
        .and_then(|n| n.parse().ok());
    if recorded == wanted {
        return Ok(());
    }
    let said = |count: Option<u32>| match count {
        Some(n) => format!("shards={n}"),
        None => "no shards".to_string(),
    };
    bail!(
        "JetStream stream `{name}` keeps its topics with {}, and the URL says {}: every \
         process must use the stream's shard count (it is fixed when the stream is made)",
        said(recorded),
        said(wanted)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_token_goes_after_the_first_token_and_comes_off_again() {
        for topic in ["orders", "orders.eu", "orders.eu.paid"] {
            let kept = subject(topic, Shard::Keyed(3));
            assert_eq!(kept.split('.').nth(1), Some("~3"), "{kept}");
            assert_eq!(self::topic(&kept), topic);
            assert_eq!(self::topic(&subject(topic, Shard::Unkeyed)), topic);
        }
    }

    #[test]
    fn filters_read_one_shard_or_all() {
        assert_eq!(
            filter("orders.*", Some(Shard::Keyed(2))).unwrap(),
            "orders.~2.*"
        );
        assert_eq!(filter("orders.>", None).unwrap(), "orders.*.>");
        assert_eq!(filter("orders", Some(Shard::Unkeyed)).unwrap(), "orders.~u");
        assert_eq!(filter("*.paid", None).unwrap(), "*.*.paid");
        assert_eq!(filter(">", None).unwrap(), ">");
        assert!(filter(">", Some(Shard::Keyed(0))).is_err());
    }

    #[test]
    fn a_key_always_has_the_same_shard_and_keys_spread() {
        assert_eq!(
            Shard::of(Some("order-7"), 16),
            Shard::of(Some("order-7"), 16)
        );
        assert_eq!(Shard::of(None, 16), Shard::Unkeyed);
        assert_eq!(Shard::of(Some(""), 16), Shard::Unkeyed);
        let used: std::collections::HashSet<Shard> = (0..1000)
            .map(|i| Shard::of(Some(&format!("key-{i}")), 16))
            .collect();
        assert_eq!(used.len(), 16);
    }

    #[test]
    fn a_stream_with_other_shards_is_refused() {
        assert!(check_stream("S", Some(&describe(8)), Some(8)).is_ok());
        assert!(check_stream("S", None, None).is_ok());
        assert!(check_stream("S", Some("made by hand"), None).is_ok());
        let err = check_stream("S", Some(&describe(8)), Some(16)).unwrap_err();
        assert!(err.to_string().contains("shards=8"), "{err}");
        let err = check_stream("S", None, Some(4)).unwrap_err();
        assert!(err.to_string().contains("no shards"), "{err}");
    }
}
