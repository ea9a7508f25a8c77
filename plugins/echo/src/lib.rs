//! Passes each message through unchanged: the baseline for benchmarks, so
//! it does as little as possible beyond the host round trip.
//!
//! Config: `output` — topic to publish to (default `out`).

use std::sync::OnceLock;

use sluice_sdk::prelude::*;

/// Config is fixed for an instance's life; reading it once saves a host call
/// per message, which is most of what this plugin would otherwise do.
static OUTPUT: OnceLock<String> = OnceLock::new();

fn echo(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let topic = OUTPUT.get_or_init(|| config_get("output").unwrap_or_else(|| "out".to_owned()));
    Ok(vec![msg.forward_to(topic.as_str())])
}

handler!(echo);
