//! Topic patterns in the NATS style, matched by the host for backends that
//! have no wildcards of their own.
//!
//! Topics are dot-separated tokens. `*` matches exactly one token and `>`,
//! only as the last token, matches one or more tokens: `orders.*` matches
//! `orders.eu` but not `orders.eu.paid`; `orders.>` matches both.

/// Whether `topic` is matched by `pattern`.
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut topic_tokens = topic.split('.');
    let mut pattern_tokens = pattern.split('.').peekable();
    while let Some(p) = pattern_tokens.next() {
        if p == ">" && pattern_tokens.peek().is_none() {
            return topic_tokens.next().is_some();
        }
        match topic_tokens.next() {
            Some(t) if p == "*" || p == t => {}
            _ => return false,
        }
    }
    topic_tokens.next().is_none()
}

/// Whether the text contains a wildcard token.
pub fn is_pattern(topic: &str) -> bool {
    topic.split('.').any(|t| t == "*" || t == ">")
}

/// Checks a topic or pattern: non-empty tokens, `>` only last, no wildcard
/// characters inside a token.
pub fn validate(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("a topic cannot be empty".into());
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("`{pattern}` has an empty token"));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(format!("`{pattern}`: `>` may only be the last token"));
        }
        if token.len() > 1 && (token.contains('*') || token.contains('>')) {
            return Err(format!(
                "`{pattern}`: wildcards must be whole tokens (`*` or `>`)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcards() {
        assert!(matches("orders", "orders"));
        assert!(!matches("orders", "orders.eu"));
        assert!(matches("orders.*", "orders.eu"));
        assert!(!matches("orders.*", "orders.eu.paid"));
        assert!(!matches("orders.*", "orders"));
        assert!(matches("orders.>", "orders.eu.paid"));
        assert!(matches("orders.>", "orders.eu"));
        assert!(!matches("orders.>", "orders"));
        assert!(matches("*.paid", "eu.paid"));
        assert!(matches(">", "anything.at.all"));
        assert!(!matches("a.*.c", "a.b.d"));
    }

    #[test]
    fn validation() {
        assert!(validate("orders.*").is_ok());
        assert!(validate("orders.>").is_ok());
        assert!(validate("orders.>.x").is_err());
        assert!(validate("orders..x").is_err());
        assert!(validate("ord*").is_err());
        assert!(validate("").is_err());
    }
}
