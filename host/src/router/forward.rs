//! Forwarding: the handler of a route without a plugin (`forward = true`),
//! a bridge from one backend to another.
//!
//! Each message goes on as it came (id, key, headers, payload, publish
//! time) under its topic, renamed by the first of the route's rules that
//! matches it. Keeping the id lets the far side deduplicate what a crash
//! makes the bridge send twice (JetStream drops a repeated `Nats-Msg-Id`
//! within its duplicate window; elsewhere `sluice-id`-aware readers can).

use async_trait::async_trait;
use serde::Deserialize;

use super::handler::{MessageHandler, Worker};
use crate::backend::pattern;
use crate::message::Message;
use crate::runtime::{CallError, Outcome};

/// A topic renaming rule: topics matching `from` are forwarded as `to`,
/// each wildcard of `to` filled with what the same wildcard of `from`
/// matched (`orders.*.paid` to `shop.*.paid`, `orders.>` to `legacy.>`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    /// A topic or pattern (`*` one token, `>` the rest).
    pub from: String,
    /// The new name: a topic with the same wildcards as `from`, in the
    /// same order.
    pub to: String,
}

impl Rename {
    /// Checks that both sides are well formed and `to` has the wildcards of
    /// `from`, in order.
    pub fn validate(&self) -> Result<(), String> {
        pattern::validate(&self.from).map_err(|e| format!("`from`: {e}"))?;
        pattern::validate(&self.to).map_err(|e| format!("`to`: {e}"))?;
        let wildcards = |text: &str| -> Vec<String> {
            text.split('.')
                .filter(|token| matches!(*token, "*" | ">"))
                .map(String::from)
                .collect()
        };
        if wildcards(&self.from) != wildcards(&self.to) {
            return Err(format!(
                "`to` (`{}`) must have the wildcards of `from` (`{}`), in the same order",
                self.to, self.from
            ));
        }
        Ok(())
    }

    /// The new name of `topic`, if this rule matches it.
    fn apply(&self, topic: &str) -> Option<String> {
        if !pattern::matches(&self.from, topic) {
            return None;
        }
        let mut taken = topic.split('.');
        // What each wildcard of `from` matched, in order.
        let mut captured = Vec::new();
        for token in self.from.split('.') {
            match token {
                ">" => captured.push(taken.by_ref().collect::<Vec<_>>().join(".")),
                "*" => captured.push(taken.next()?.to_string()),
                _ => {
                    taken.next()?;
                }
            }
        }
        let mut captured = captured.into_iter();
        let renamed: Vec<String> = self
            .to
            .split('.')
            .map(|token| match token {
                "*" | ">" => captured.next().unwrap_or_default(),
                literal => literal.to_string(),
            })
            .collect();
        Some(renamed.join("."))
    }
}

/// The handler of a forwarding route.
#[derive(Debug, Clone, Default)]
pub struct Forward {
    rules: Vec<Rename>,
}

impl Forward {
    pub fn new(rules: Vec<Rename>) -> Self {
        Forward { rules }
    }

    /// The topic `topic` is forwarded as.
    pub fn rename(&self, topic: &str) -> String {
        self.rules
            .iter()
            .find_map(|rule| rule.apply(topic))
            .unwrap_or_else(|| topic.to_string())
    }
}

impl MessageHandler for Forward {
    fn worker(&self) -> Box<dyn Worker> {
        Box::new(self.clone())
    }

    fn describe(&self) -> String {
        "forward".into()
    }
}

#[async_trait]
impl Worker for Forward {
    async fn handle(&mut self, message: &Message, _attempt: u32) -> Result<Outcome, CallError> {
        let mut forwarded = message.clone();
        forwarded.topic = self.rename(&message.topic);
        Ok(Outcome::Outputs(vec![forwarded]))
    }

    fn plugin(&self) -> (String, String) {
        ("forward".into(), "-".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(from: &str, to: &str) -> Rename {
        Rename {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn the_first_matching_rule_renames_and_wildcards_carry_over() {
        let forward = Forward::new(vec![
            rule("orders.*.paid", "shop.*.paid.v2"),
            rule("orders.>", "legacy.orders.>"),
            rule("audit", "audit.copy"),
        ]);
        assert_eq!(forward.rename("orders.eu.paid"), "shop.eu.paid.v2");
        assert_eq!(forward.rename("orders.eu.new"), "legacy.orders.eu.new");
        assert_eq!(
            forward.rename("orders.eu.paid.late"),
            "legacy.orders.eu.paid.late"
        );
        assert_eq!(forward.rename("audit"), "audit.copy");
        assert_eq!(forward.rename("payments.eu"), "payments.eu");
    }

    #[test]
    fn a_rule_needs_the_same_wildcards_on_both_sides() {
        assert!(rule("orders.*.>", "x.*.y.>").validate().is_ok());
        for (from, to) in [
            ("orders.*", "shop.orders"),
            ("orders.>", "shop.*"),
            ("orders.*.>", "shop.>.*"),
            ("orders..x", "shop"),
        ] {
            assert!(rule(from, to).validate().is_err(), "{from} -> {to}");
        }
    }

    #[tokio::test]
    async fn a_forwarded_message_keeps_everything_but_its_topic() {
        let mut message = Message::new("orders.eu", b"{}".to_vec());
        message.key = Some("k".into());
        message.headers.push(("h".into(), "v".into()));
        let mut forward = Forward::new(vec![rule("orders.*", "shop.*")]);
        let Ok(Outcome::Outputs(outputs)) = forward.handle(&message, 1).await else {
            panic!("forwarding failed");
        };
        let expected = Message {
            topic: "shop.eu".into(),
            ..message
        };
        assert_eq!(outputs, [expected]);
    }
}
