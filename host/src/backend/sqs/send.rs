//! Sending encoded messages in batches: SendMessageBatch (SQS) and
//! PublishBatch (SNS) take up to 10 entries and 256 KiB in all. Entries a
//! batch reports failed through no fault of the sender (throttling, a
//! server error) are sent again a few times; any other failure fails the
//! publish, naming the message.
//!
//! A FIFO queue (an ordered group's) gets each message's key as its message
//! group, so SQS hands a key's next message to no member while one is in
//! flight, and the message's id for deduplication (a publish repeated
//! within SQS's five minutes is kept once). An unkeyed message is a group
//! of its own.

use std::borrow::Cow;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use super::client::{error_code, is_missing_queue};
use super::codec::{Encoded, MAX_MESSAGE_BYTES, META_ATTRIBUTE};
use super::names::{Names, queue_name_of};

/// Entries per batch request, for SQS and SNS alike.
pub const MAX_BATCH: usize = 10;
/// Tries of an entry that failed through no fault of ours.
const TRIES: u32 = 4;

/// Splits messages into runs that fit one batch request.
pub fn batches(messages: &[Encoded]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, message) in messages.iter().enumerate() {
        let size = message.size();
        if i > start && (i - start == MAX_BATCH || bytes + size > MAX_MESSAGE_BYTES) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < messages.len() {
        out.push(start..messages.len());
    }
    out
}

/// What became of a send.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Every message was accepted.
    All,
    /// The queue (or topic) does not exist (any more).
    Gone,
}

/// An entry of a batch request that was refused.
pub struct EntryFailure {
    /// Its index in the messages given to [`with_entry_retries`].
    pub index: usize,
    /// The request was wrong (too big, bad attribute), not the service.
    pub sender_fault: bool,
    pub why: String,
}

impl EntryFailure {
    /// An entry the `service` (SQS or SNS) reported as failed, by the id
    /// it was sent with (its index).
    pub fn from_reply(
        service: &str,
        id: &str,
        sender_fault: bool,
        code: &str,
        message: Option<&str>,
    ) -> Result<Self> {
        Ok(EntryFailure {
            index: id
                .parse()
                .with_context(|| format!("{service} answered for a batch entry it was not sent"))?,
            sender_fault,
            why: format!("{code} {}", message.unwrap_or("")),
        })
    }
}

/// Runs `send` with the indices of the messages to send, and again with
/// those that failed through no fault of ours (at most [`TRIES`] times in
/// all). `send` returns the refused entries, or `None` if the target is
/// gone. `ids` and `target` name messages and target in errors.
pub async fn with_entry_retries<F, Fut>(
    count: usize,
    ids: &[&str],
    target: &str,
    mut send: F,
) -> Result<Sent>
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: Future<Output = Result<Option<Vec<EntryFailure>>>>,
{
    let mut waiting: Vec<usize> = (0..count).collect();
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=TRIES {
        let Some(failures) = send(waiting).await? else {
            return Ok(Sent::Gone);
        };
        let mut again = Vec::new();
        for failure in failures {
            // The entry id comes back from the endpoint: one that names no
            // entry sent is the endpoint's error, not an index to trust.
            if failure.index >= count {
                bail!(
                    "`{target}` answered for batch entry {} of {count}",
                    failure.index
                );
            }
            if failure.sender_fault || attempt == TRIES {
                let id = ids.get(failure.index).copied().unwrap_or("?");
                bail!("`{target}` refused message {id}: {}", failure.why);
            }
            again.push(failure.index);
        }
        if again.is_empty() {
            return Ok(Sent::All);
        }
        tracing::debug!(
            target,
            failed = again.len(),
            "batch entries failed; sending them again"
        );
        waiting = again;
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    unreachable!("the last try returns")
}

/// Sends `messages` (one batch, see [`batches`]) to the queue at `url`.
/// `ids` are their ids (which also name them in errors) and `keys` their
/// keys.
pub async fn send_batch(
    sqs: &Client,
    url: &str,
    messages: &[Encoded],
    ids: &[&str],
    keys: &[Option<&str>],
) -> Result<Sent> {
    let target = queue_name_of(url);
    let fifo = Names::is_fifo(url);
    with_entry_retries(messages.len(), ids, target, |indices| async move {
        let entries = indices
            .iter()
            .map(|&i| {
                let mut entry = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&messages[i].body)
                    .message_attributes(META_ATTRIBUTE, messages[i].sqs_attribute());
                if fifo {
                    let group = keys[i].filter(|key| !key.is_empty()).unwrap_or(ids[i]);
                    entry = entry
                        .message_group_id(fifo_token(group))
                        .message_deduplication_id(fifo_token(ids[i]));
                }
                entry.build().expect("id and body are set")
            })
            .collect();
        let out = match sqs
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if is_missing_queue(error_code(&e)) => return Ok(None),
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("SQS SendMessageBatch to `{target}`"));
            }
        };
        out.failed()
            .iter()
            .map(|f| {
                EntryFailure::from_reply("SQS", f.id(), f.sender_fault(), f.code(), f.message())
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    })
    .await
}

/// `text` as a FIFO message group or deduplication id: itself where SQS
/// takes it (1 to 128 of ASCII's letters, digits and punctuation), else
/// the hex of its SHA-256, so any key keeps a group of its own.
fn fifo_token(text: &str) -> Cow<'_, str> {
    if (1..=128).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic()) {
        Cow::Borrowed(text)
    } else {
        use sha2::Digest;
        Cow::Owned(hex::encode(sha2::Sha256::digest(text.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    #[test]
    fn fifo_tokens_are_what_sqs_takes() {
        assert_eq!(fifo_token("order-17/eu"), "order-17/eu");
        for odd in ["", "has space", "ünïcode", &"x".repeat(129)] {
            let token = fifo_token(odd);
            assert_eq!(token.len(), 64, "{odd:?}");
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(fifo_token("a b"), fifo_token("a  b"));
    }

    #[test]
    fn batches_respect_count_and_size() {
        let small: Vec<Encoded> = (0..25)
            .map(|i| super::super::codec::encode(&Message::new("t", format!("{i}"))).unwrap())
            .collect();
        assert_eq!(batches(&small), vec![0..10, 10..20, 20..25]);
        let big: Vec<Encoded> = (0..3)
            .map(|_| super::super::codec::encode(&Message::new("t", "x".repeat(100_000))).unwrap())
            .collect();
        assert_eq!(batches(&big), vec![0..2, 2..3]);
        assert!(batches(&[]).is_empty());
    }

    #[tokio::test]
    async fn an_answer_for_an_entry_never_sent_is_an_error() {
        let answer = |_| async {
            Ok(Some(vec![EntryFailure {
                index: 7,
                sender_fault: false,
                why: "throttled".into(),
            }]))
        };
        let error = with_entry_retries(2, &["a", "b"], "q", answer)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("batch entry 7 of 2"), "{error}");
    }
}
