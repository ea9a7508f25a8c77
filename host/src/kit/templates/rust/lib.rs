//! {{name}}: a Sluice plugin. Uppercases a text message and publishes it to
//! the topic in config `output` (default `{{name}}.out`); rejects an empty one.

use sluice_sdk::prelude::*;

/// The component's handler: asks the host for the config, then does the work.
fn handle(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let topic = config_get("output").unwrap_or_else(|| "{{name}}.out".to_owned());
    shout(msg, topic)
}

handler!(handle);

/// The work itself. It makes no host calls (those work only inside the
/// host), so `cargo test` runs it natively.
fn shout(msg: Message, topic: String) -> Result<Vec<Outgoing>, Failure> {
    let text = msg.payload_str()?;
    if text.is_empty() {
        return Err(Failure::reject("empty payload"));
    }
    let mut out = Outgoing::new(topic, text.to_uppercase()).with_header("by", "{{name}}");
    out.key = msg.key;
    Ok(vec![out])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uppercases_onto_the_topic_keeping_the_key() {
        let msg = Message::new("words", "hello");
        let msg = Message { key: Some("k1".into()), ..msg };
        let expected = Outgoing::new("{{name}}.out", "HELLO")
            .with_key("k1")
            .with_header("by", "{{name}}");
        assert_eq!(shout(msg, "{{name}}.out".into()), Ok(vec![expected]));
    }

    #[test]
    fn rejects_an_empty_message() {
        let outcome = shout(Message::new("words", ""), "{{name}}.out".into());
        assert_eq!(outcome, Err(Failure::reject("empty payload")));
    }
}
