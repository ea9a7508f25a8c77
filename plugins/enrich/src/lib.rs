//! JSON enrich, the example written in every plugin language (see
//! docs/plugins.md): adds an `enriched` object (the topic, the attempt and
//! the configured region) to a JSON object and publishes it.
//!
//! Config: `output` — the topic to publish to (default `enriched`);
//! `region` — the region to record (default `unknown`).
//!
//! A payload that is not a JSON object is rejected. A message whose
//! `retry_until` field is an integer above the attempt number is retried.

use serde_json::{Value, json};
use sluice_sdk::prelude::*;

fn enrich(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let Ok(Value::Object(mut doc)) = serde_json::from_slice::<Value>(&msg.payload) else {
        return Err(Failure::reject("payload is not a JSON object"));
    };
    if let Some(until) = doc.get("retry_until").and_then(Value::as_i64)
        && i64::from(msg.attempt) < until
    {
        return Err(Failure::retry(format!("not ready before attempt {until}")));
    }
    let region = config_get("region").unwrap_or_else(|| "unknown".to_owned());
    doc.insert(
        "enriched".to_owned(),
        json!({ "topic": msg.topic, "attempt": msg.attempt, "region": region }),
    );
    let topic = config_get("output").unwrap_or_else(|| "enriched".to_owned());
    let payload = Value::Object(doc).to_string();
    let mut out = Outgoing::new(topic, payload).with_header("enriched-by", "enrich");
    out.key = msg.key;
    Ok(vec![out])
}

handler!(enrich);
