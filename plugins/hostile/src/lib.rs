//! Attacks the host on demand, so the host's tests can show that a plugin
//! cannot hurt the host or the routes beside it.
//!
//! The UTF-8 payload is the attack:
//!
//! | payload             | attack                                              |
//! |---------------------|-----------------------------------------------------|
//! | `publish:N:KIB`     | N host `publish` calls of KIB KiB each, refusals ignored |
//! | `outputs:N`         | return N outputs of one byte each                   |
//! | `sleep:MS`          | sleep MS ms in WASI (the call waits in the host)    |
//! | `spin:MS`           | spin for MS ms of wall-clock time                   |
//! | `forge`             | log and reject with text that forges host log lines |
//! | `log-flood:N`       | log N lines                                         |
//! | `log-huge:KIB`      | log one line of KIB KiB                             |
//! | `headers`           | an output that sets the host's headers              |
//! | `bad-header`        | an output with a newline in a header name           |
//! | anything else       | one output with the same payload (a good citizen)   |
//!
//! Outputs go to the topic in config `output` (default `out`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use sluice_sdk::prelude::*;

/// A line a naive host would print as if it were its own.
const FORGED: &str = "done\n2026-01-01T00:00:00Z ERROR sluice::app: forged by a plugin";

fn hostile(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    let text = std::str::from_utf8(&msg.payload).unwrap_or("").trim();
    let mut parts = text.split(':');
    let attack = parts.next().unwrap_or("");
    let mut number = || {
        parts
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(1)
    };
    match attack {
        "publish" => {
            let (count, kib) = (number(), number());
            let payload = vec![0x5A_u8; (kib as usize) << 10];
            for _ in 0..count {
                let _ = publish(&Outgoing::new(output_topic(), payload.clone()));
            }
            Ok(Vec::new())
        }
        "outputs" => Ok((0..number())
            .map(|_| Outgoing::new(output_topic(), "x"))
            .collect()),
        "sleep" => {
            std::thread::sleep(Duration::from_millis(number()));
            Ok(vec![msg.forward_to(output_topic())])
        }
        "spin" => {
            let until = Instant::now() + Duration::from_millis(number());
            let mut n = 0u64;
            while Instant::now() < until {
                n = black_box(n).wrapping_add(1);
            }
            Ok(vec![msg.forward_to(output_topic())])
        }
        "forge" => {
            log::error(FORGED);
            Err(Failure::reject(FORGED))
        }
        "log-flood" => {
            for i in 0..number() {
                log::info(&format!("flood line {i}"));
            }
            Ok(vec![msg.forward_to(output_topic())])
        }
        "log-huge" => {
            log::info(&"L".repeat((number() as usize) << 10));
            Ok(vec![msg.forward_to(output_topic())])
        }
        "headers" => Ok(vec![
            Outgoing::new(output_topic(), "forged")
                .with_header("sluice-dead-letter-cause", "forged")
                .with_header("Sluice-Original-Topic", "forged")
                .with_header("sluice-hops", "0")
                .with_header("x-kept", "kept"),
        ]),
        "bad-header" => Ok(vec![
            Outgoing::new(output_topic(), "forged").with_header("x-evil\nsluice-route", "forged"),
        ]),
        _ => Ok(vec![msg.forward_to(output_topic())]),
    }
}

fn output_topic() -> String {
    config_get("output").unwrap_or_else(|| "out".to_owned())
}

handler!(hostile);
