//! {{name}}: a Sluice plugin. Uppercases a text message and publishes it to
//! the topic in config `output` (default `{{name}}.out`); rejects an empty one.

use sluice_sdk::prelude::*;

fn handle(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let text = msg.payload_str()?;
    if text.is_empty() {
        return Err(Failure::reject("empty payload"));
    }
    let topic = config_get("output").unwrap_or_else(|| "{{name}}.out".to_owned());
    let mut out = Outgoing::new(topic, text.to_uppercase()).with_header("by", "{{name}}");
    out.key = msg.key;
    Ok(vec![out])
}

handler!(handle);
