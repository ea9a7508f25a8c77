//! Request-reply from both ends, for tests and as an example.
//!
//! Config `role`:
//! - `answer`: replies to each request with its payload uppercased (a
//!   message that asks for no reply is rejected);
//! - `ask` (the default): sends each message's payload as a request to the
//!   topic `ask` (config), waiting at most `timeout_ms` (config, default
//!   1000), and publishes the reply's payload to `output` (config, default
//!   `answers`); a request that fails publishes the reason instead, with
//!   the header `failed` set, so a test can see it.

use sluice_sdk::prelude::*;

fn rpc(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    match config_get("role").as_deref() {
        Some("answer") => {
            let upper = msg.payload_str()?.to_uppercase();
            let reply = msg
                .reply(upper)
                .ok_or_else(|| Failure::reject("no reply asked for"))?;
            Ok(vec![reply])
        }
        _ => {
            let topic = config_get("ask").unwrap_or_else(|| "questions".to_owned());
            let timeout = config_get("timeout_ms")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(1000);
            let output = config_get("output").unwrap_or_else(|| "answers".to_owned());
            let question = Outgoing::new(topic, msg.payload.clone());
            let answer = match request(&question, timeout) {
                Ok(reply) => Outgoing::new(output, reply.payload),
                Err(reason) => Outgoing::new(output, reason).with_header("failed", "true"),
            };
            Ok(vec![answer.with_header("question", msg.payload_str()?)])
        }
    }
}

handler!(rpc);
