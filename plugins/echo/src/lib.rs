//! Passes each message through unchanged: the baseline for benchmarks, so
//! it does as little as possible beyond the host round trip. It exports
//! `handle-batch`, so a route with a `batch_size` hands it many messages
//! per call.
//!
//! Config: `output` — topic to publish to (default `out`).

use std::sync::OnceLock;

use sluice_sdk::prelude::*;

/// Config is fixed for an instance's life; reading it once saves a host call
/// per message, which is most of what this plugin would otherwise do.
static OUTPUT: OnceLock<String> = OnceLock::new();

fn echo(msgs: Vec<Message>) -> Vec<Result<Vec<Outgoing>, Failure>> {
    let topic = OUTPUT.get_or_init(|| config_get("output").unwrap_or_else(|| "out".to_owned()));
    msgs.into_iter()
        .map(|msg| Ok(vec![msg.forward_to(topic.as_str())]))
        .collect()
}

batch_handler!(echo);
