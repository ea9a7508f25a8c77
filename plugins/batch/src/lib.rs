//! A batch handler whose answers the tests choose, written the same way in
//! every plugin language (`plugins/{python,js,c}/batch`), so the host's
//! tests can check a batch with mixed results.
//!
//! For each message of a batch, by its UTF-8 payload:
//!
//! | payload  | answer                                                     |
//! |----------|------------------------------------------------------------|
//! | `retry`  | `Failure::Retry("asked to retry")` on attempt 1            |
//! | `reject` | `Failure::Reject("asked to reject")`                       |
//! | `trap`   | a panic, which traps the whole call                        |
//! | other    | one output: the payload and key, on config `output`        |
//! |          | (default `out`), with a header `batch: I/N` (the message's |
//! |          | place in the call, from 1)                                 |
//!
//! A `retry` message succeeds on its second attempt. `handle` answers one
//! message as a batch of one (`batch: 1/1`).
//!
//! Two more, in this Rust version only, for the host's own tests:
//! `publish:TOPIC` calls the host's `publish` first (refused in a batch:
//! the message is rejected with the host's reason), and `short` makes the
//! batch answer one message fewer than it was given.

use sluice_sdk::prelude::*;

fn answer_all(msgs: Vec<Message>) -> Vec<Result<Vec<Outgoing>, Failure>> {
    let topic = config_get("output").unwrap_or_else(|| "out".to_owned());
    let count = msgs.len();
    let short = msgs.iter().any(|m| m.payload == b"short");
    let mut answers: Vec<_> = msgs
        .into_iter()
        .enumerate()
        .map(|(index, msg)| {
            if let Some(side) = msg.payload.strip_prefix(b"publish:") {
                let side = String::from_utf8_lossy(side);
                publish(&Outgoing::new(side, "side")).map_err(Failure::reject)?;
            }
            match msg.payload.as_slice() {
                b"retry" if msg.attempt == 1 => Err(Failure::retry("asked to retry")),
                b"reject" => Err(Failure::reject("asked to reject")),
                b"trap" => panic!("asked to trap"),
                _ => {
                    let mut out = Outgoing::new(topic.clone(), msg.payload)
                        .with_header("batch", format!("{}/{count}", index + 1));
                    out.key = msg.key;
                    Ok(vec![out])
                }
            }
        })
        .collect();
    if short {
        answers.pop();
    }
    answers
}

batch_handler!(answer_all);
