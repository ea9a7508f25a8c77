//! A handler built against `sluice:plugin@0.1.0` (its WIT is kept in
//! `wit/`), so the host's tests show that it still runs components built
//! before the `batch-handler` world existed, host calls included.
//!
//! By its UTF-8 payload: `retry` retries on attempt 1, `reject` rejects,
//! `panic` traps, `publish:TOPIC` publishes `side` to TOPIC with the host's
//! `publish`; anything else is forwarded to config `output` (default
//! `out`) with a header `world: 0.1.0`. Each call logs a line.

// The generated glue lowers a `message` into 13 flat arguments: the
// canonical ABI, not a design choice to lint.
#[allow(clippy::too_many_arguments)]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "handler",
    });
}

use bindings::sluice::plugin::host;
use bindings::sluice::plugin::types::Header;
use bindings::{Failure, Guest, Message, Outgoing};

struct V01;

impl Guest for V01 {
    fn handle(msg: Message) -> Result<Vec<Outgoing>, Failure> {
        host::log(host::LogLevel::Debug, &format!("handling {}", msg.id));
        match msg.payload.as_slice() {
            b"retry" if msg.attempt == 1 => return Err(Failure::Retry("asked to retry".into())),
            b"reject" => return Err(Failure::Reject("asked to reject".into())),
            b"panic" => panic!("asked to panic"),
            payload => {
                if let Some(topic) = payload.strip_prefix(b"publish:") {
                    let side = Outgoing {
                        topic: String::from_utf8_lossy(topic).into_owned(),
                        key: None,
                        headers: Vec::new(),
                        payload: b"side".to_vec(),
                    };
                    host::publish(&side).map_err(Failure::Reject)?;
                }
            }
        }
        Ok(vec![Outgoing {
            topic: host::config_get("output").unwrap_or_else(|| "out".into()),
            key: msg.key,
            headers: vec![Header {
                name: "world".into(),
                value: "0.1.0".into(),
            }],
            payload: msg.payload,
        }])
    }
}

bindings::export!(V01 with_types_in bindings);
