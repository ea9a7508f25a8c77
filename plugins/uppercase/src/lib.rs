//! Uppercases UTF-8 payloads: the smallest useful transform, for end-to-end
//! tests and as a template for new plugins.
//!
//! Config: `output` — topic to publish to (default `<input topic>.upper`).

use sluice_sdk::prelude::*;

fn uppercase(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let upper = msg.payload_str()?.to_uppercase();
    let topic = config_get("output").unwrap_or_else(|| format!("{}.upper", msg.topic));
    let mut out = msg
        .forward_to(topic)
        .with_header("processed-by", "uppercase");
    out.payload = upper.into_bytes();
    Ok(vec![out])
}

handler!(uppercase);
