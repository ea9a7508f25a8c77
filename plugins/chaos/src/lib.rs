//! Misbehaves on demand, so the host's tests can exercise retries,
//! dead-lettering, traps, timeouts, memory limits and host calls.
//!
//! The UTF-8 payload is the command:
//!
//! | payload         | behaviour                                             |
//! |-----------------|-------------------------------------------------------|
//! | `ok` / other    | succeed (see below)                                   |
//! | `retry:N`       | `Failure::Retry` while `attempt <= N`, then succeed   |
//! | `retry`         | always `Failure::Retry`                               |
//! | `reject`        | `Failure::Reject`                                     |
//! | `panic`         | panic (a trap, since plugins build with panic=abort)  |
//! | `loop`          | spin forever                                          |
//! | `oom`           | allocate and touch 1 MiB chunks until memory runs out |
//! | `publish:TOPIC` | host `publish` of `side` to TOPIC, then succeed       |
//! | `log`           | host `log` at info, then succeed                      |
//! | `sleep:MS`      | sleep MS milliseconds (a slow handler), then succeed  |
//! | `env:NAME`      | succeed with the variable's value, or `<unset>`       |
//! | `read:PATH`     | succeed with the file's text, or `<denied: reason>`   |
//!
//! `env:` and `read:` probe the sandbox: the host grants no environment and
//! no files unless the config says so. Otherwise success is one output with
//! the same payload, key and headers, plus an
//! `attempt: <n>` header, on topic config `output` (default `out`).
//! Surrounding whitespace is ignored so shell-typed payloads work.

use std::hint::black_box;

use sluice_sdk::prelude::*;

enum Command<'a> {
    Ok,
    /// `None` retries forever; `Some(n)` stops once the attempt exceeds `n`.
    Retry(Option<u32>),
    Reject,
    Panic,
    Loop,
    Oom,
    Publish(&'a str),
    Log,
    Sleep(u64),
    Env(&'a str),
    Read(&'a str),
}

impl<'a> Command<'a> {
    fn parse(payload: &'a [u8]) -> Self {
        let Ok(text) = std::str::from_utf8(payload) else {
            return Command::Ok;
        };
        match text.trim() {
            "retry" => Command::Retry(None),
            "reject" => Command::Reject,
            "panic" => Command::Panic,
            "loop" => Command::Loop,
            "oom" => Command::Oom,
            "log" => Command::Log,
            other => {
                if let Some(n) = other.strip_prefix("retry:").and_then(|n| n.parse().ok()) {
                    Command::Retry(Some(n))
                } else if let Some(topic) = other.strip_prefix("publish:") {
                    Command::Publish(topic)
                } else if let Some(ms) = other.strip_prefix("sleep:").and_then(|n| n.parse().ok()) {
                    Command::Sleep(ms)
                } else if let Some(name) = other.strip_prefix("env:") {
                    Command::Env(name)
                } else if let Some(path) = other.strip_prefix("read:") {
                    Command::Read(path)
                } else {
                    Command::Ok
                }
            }
        }
    }
}

fn chaos(msg: Message) -> Result<Vec<Outgoing>, Failure> {
    match Command::parse(&msg.payload) {
        Command::Ok => {}
        Command::Retry(limit) => {
            if limit.is_none_or(|n| msg.attempt <= n) {
                return Err(Failure::retry("asked to retry"));
            }
        }
        Command::Reject => return Err(Failure::reject("asked to reject")),
        Command::Panic => panic!("asked to panic"),
        Command::Loop => spin_forever(),
        Command::Oom => exhaust_memory(),
        Command::Publish(topic) => publish(&Outgoing::new(topic, "side"))
            .map_err(|e| Failure::reject(format!("publish to `{topic}` refused: {e}")))?,
        Command::Log => log::info("chaos: asked to log"),
        Command::Sleep(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
        Command::Env(name) => {
            let value = std::env::var(name).unwrap_or_else(|_| "<unset>".to_owned());
            return Ok(vec![Outgoing::new(output_topic(), value)]);
        }
        Command::Read(path) => {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<denied: {e}>"));
            return Ok(vec![Outgoing::new(output_topic(), text)]);
        }
    }

    let attempt = msg.attempt.to_string();
    Ok(vec![
        msg.forward_to(output_topic())
            .with_header("attempt", attempt),
    ])
}

fn output_topic() -> String {
    config_get("output").unwrap_or_else(|| "out".to_owned())
}

/// Must really run until the host interrupts it; `black_box` stops the
/// optimiser from proving the loop does nothing and folding it away.
fn spin_forever() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n).wrapping_add(1);
    }
}

/// Every chunk is written in full so the memory is really committed, and
/// kept alive so nothing is freed; the allocator's failure then traps.
fn exhaust_memory() -> ! {
    const CHUNK: usize = 1 << 20;
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        chunk.resize(CHUNK, 0xA5);
        hoard.push(black_box(chunk));
        black_box(&mut hoard);
    }
}

handler!(chaos);
