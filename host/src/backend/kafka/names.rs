//! Names on the Kafka side: which Sluice topics are valid Kafka topics, the
//! consumer group id of a Sluice group, and the regular expression a topic
//! pattern becomes in a subscription.

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};

use crate::backend::pattern;

/// Checks that `topic` is a name Kafka accepts: 1 to 249 characters among
/// letters, digits, `.`, `_` and `-`.
pub fn check_topic(topic: &str) -> Result<()> {
    pattern::validate(topic).map_err(anyhow::Error::msg)?;
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.len() > 249 || !topic.chars().all(legal) {
        bail!("`{topic}` is not a valid Kafka topic: up to 249 letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

/// The Kafka group id of a Sluice group, from
/// [`SubscribeOptions::group_key`](crate::backend::SubscribeOptions::group_key):
/// readable, and unique for the key (the readable part drops characters, so
/// a hash of the whole key tells apart keys that read the same).
pub fn group_id(group_key: &str) -> String {
    let readable: String = group_key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let digest = Sha256::digest(group_key.as_bytes());
    format!("sluice.{readable}.{}", hex::encode(&digest[..8]))
}

/// The topics and patterns of a group, read back from its
/// [`SubscribeOptions::group_key`](crate::backend::SubscribeOptions::group_key)
/// (`group[topic,topic]`): Kafka names hold no `[` or `,`, so the last `[`
/// starts the list. Empty for a key of another form.
pub fn topics_of(group_key: &str) -> Vec<&str> {
    group_key
        .rsplit_once('[')
        .and_then(|(_, list)| list.strip_suffix(']'))
        .map(|list| list.split(',').filter(|t| !t.is_empty()).collect())
        .unwrap_or_default()
}

/// Checks a topic or a pattern: its literal tokens must be valid Kafka
/// topic characters.
pub fn check_pattern(topic: &str) -> Result<()> {
    if !pattern::is_pattern(topic) {
        return check_topic(topic);
    }
    pattern::validate(topic).map_err(anyhow::Error::msg)?;
    let literal = topic.replace(['*', '>'], "x");
    check_topic(&literal).map_err(|_| {
        anyhow::anyhow!(
            "`{topic}` is not a valid Kafka topic pattern: tokens of letters, digits, `_` and `-`, or `*` and `>`"
        )
    })
}

/// What librdkafka subscribes to for a Sluice topic or pattern: the topic
/// itself, or an anchored regular expression (librdkafka treats a
/// subscription starting with `^` as one). `*` is one token, `>` one or more.
pub fn subscription(topic: &str) -> String {
    if !pattern::is_pattern(topic) {
        return topic.to_string();
    }
    const TOKEN: &str = "[^.]+";
    let mut regex = String::from("^");
    for (i, token) in topic.split('.').enumerate() {
        if i > 0 {
            regex.push_str("\\.");
        }
        match token {
            "*" => regex.push_str(TOKEN),
            ">" => regex.push_str(&format!("{TOKEN}(\\.{TOKEN})*")),
            // Checked by `check_pattern`: letters, digits, `_` and `-` only,
            // none of them special in a regular expression.
            literal => regex.push_str(literal),
        }
    }
    regex.push('$');
    regex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_patterns() {
        assert!(check_topic("orders.eu-1_x").is_ok());
        assert!(check_topic("orders eu").is_err());
        assert!(check_topic("zoë").is_err());
        assert!(check_topic(&"a".repeat(250)).is_err());
        assert_eq!(subscription("orders.eu"), "orders.eu");
        assert_eq!(subscription("orders.*"), "^orders\\.[^.]+$");
        assert_eq!(subscription("a-b.>"), "^a-b\\.[^.]+(\\.[^.]+)*$");
        assert!(check_pattern("orders.*.>").is_ok());
        assert!(check_pattern("orders.(x|y)").is_err());
    }

    #[test]
    fn topics_are_read_back_from_a_group_key() {
        let mut options = crate::backend::SubscribeOptions::new(
            vec!["orders.eu".into(), "jobs.*".into()],
            "g[1],x",
        );
        assert_eq!(topics_of(&options.group_key()), ["jobs.*", "orders.eu"]);
        options.topics = vec!["t".into()];
        assert_eq!(topics_of(&options.group_key()), ["t"]);
        assert!(topics_of("no list").is_empty());
    }

    #[test]
    fn group_ids_are_readable_and_distinct() {
        let a = group_id("g[orders.eu]");
        let b = group_id("g[orders_eu]");
        assert_ne!(a, b);
        assert!(a.starts_with("sluice.g_orders.eu_."), "{a}");
    }
}
