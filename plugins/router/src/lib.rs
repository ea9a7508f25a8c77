//! Content-based router: forwards each JSON message to a topic chosen by one
//! of its fields, e.g. `{"type": "order"}` goes to `routed.order`.
//!
//! Config: `field` — the top-level string field to route on (default
//! `type`); `prefix` — prepended to its value (default `routed`).

use serde_json::Value;
use sluice_sdk::prelude::*;

fn route(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let field = config_get("field").unwrap_or_else(|| "type".to_owned());
    let prefix = config_get("prefix").unwrap_or_else(|| "routed".to_owned());

    // Every failure below is in the message itself, so retrying cannot help.
    let doc: Value = serde_json::from_slice(&msg.payload)
        .map_err(|e| Failure::reject(format!("payload is not valid JSON: {e}")))?;
    let value = match &doc {
        Value::Object(fields) => match fields.get(&field) {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(Failure::reject(format!(
                    "field `{field}` must be a string, found {}",
                    kind(other)
                )));
            }
            None => {
                return Err(Failure::reject(format!(
                    "JSON object has no field `{field}`"
                )));
            }
        },
        other => {
            return Err(Failure::reject(format!(
                "payload must be a JSON object, found {}",
                kind(other)
            )));
        }
    };
    check_topic_tail(value).map_err(|why| {
        Failure::reject(format!(
            "field `{field}` = {value:?} cannot name a topic: {why}"
        ))
    })?;

    let topic = format!("{prefix}.{value}");
    Ok(vec![msg.forward_to(topic)])
}

/// Topics are `.`-separated tokens where `*` and `>` are wildcards, so a
/// value that is empty or carries either would publish somewhere unintended
/// (or be refused by the host, which would look like a host fault).
fn check_topic_tail(value: &str) -> Result<(), &'static str> {
    if value.split('.').any(str::is_empty) {
        return Err("empty topic token");
    }
    if value.contains(['*', '>']) {
        return Err("wildcard characters `*` and `>` are not allowed");
    }
    if value.contains(char::is_whitespace) {
        return Err("whitespace is not allowed");
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

handler!(route);
