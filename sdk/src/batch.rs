//! What the export macros expand to for batches: a per-message handler run
//! over a batch, and a batch handler given one message.
//!
//! Not part of the API; public only because the macros expand in the
//! plugin's crate.

use std::cell::RefCell;

use crate::{Failure, Message, Outgoing};

type Answer = Result<Vec<Outgoing>, Failure>;

thread_local! {
    /// While a per-message handler runs inside a batch: what it published,
    /// kept with its own outputs, since the host refuses `publish` during a
    /// batch (it could not tell which message it belongs to).
    static PUBLISHED: RefCell<Option<Vec<Outgoing>>> = const { RefCell::new(None) };
}

/// Answers each message of `msgs` with `handler`.
pub fn each(msgs: Vec<Message>, mut handler: impl FnMut(Message) -> Answer) -> Vec<Answer> {
    msgs.into_iter()
        .map(|msg| {
            PUBLISHED.with_borrow_mut(|published| *published = Some(Vec::new()));
            let answer = handler(msg);
            let published = PUBLISHED.with_borrow_mut(Option::take).unwrap_or_default();
            answer.map(|outputs| {
                if published.is_empty() {
                    outputs
                } else {
                    published.into_iter().chain(outputs).collect()
                }
            })
        })
        .collect()
}

/// Answers one message with a batch handler.
///
/// # Panics
///
/// If the handler does not answer exactly once: a broken contract, which
/// traps like any other panic.
pub fn one(msg: Message, handler: impl FnOnce(Vec<Message>) -> Vec<Answer>) -> Answer {
    let mut answers = handler(vec![msg]);
    assert!(
        answers.len() == 1,
        "a batch handler gave {} answers for 1 message",
        answers.len()
    );
    answers.remove(0)
}

/// Keeps `msg` for the message being handled if a per-message handler is
/// running inside a batch; `false` otherwise.
pub(crate) fn keep_published(msg: &Outgoing) -> bool {
    PUBLISHED.with_borrow_mut(|published| match published {
        Some(published) => {
            published.push(msg.clone());
            true
        }
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_keeps_what_a_message_published_with_its_own_outputs() {
        let answers = each(
            vec![Message::new("t", "a"), Message::new("t", "b")],
            |msg| {
                assert!(keep_published(&Outgoing::new("side", msg.payload.clone())));
                if msg.payload == b"b" {
                    return Err(Failure::retry("later"));
                }
                Ok(vec![msg.forward_to("out")])
            },
        );
        assert_eq!(
            answers,
            vec![
                Ok(vec![Outgoing::new("side", "a"), Outgoing::new("out", "a")]),
                Err(Failure::retry("later")),
            ]
        );
        // Outside a batch nothing is kept: publish goes to the host.
        assert!(!keep_published(&Outgoing::new("side", "c")));
    }

    #[test]
    fn one_gives_a_batch_handler_a_single_message() {
        let answer = one(Message::new("t", "x"), |msgs| {
            msgs.into_iter()
                .map(|m| Ok(vec![m.forward_to("out")]))
                .collect()
        });
        assert_eq!(answer, Ok(vec![Outgoing::new("out", "x")]));
    }
}
