//! What the SQL backends share in settling: each delivery is a claim on a
//! row (its sequence number and the attempt that claimed it), which the
//! database settles only while it is still the current claim, and each
//! subscription keeps the claims it holds, to hand back on close.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;

use super::{Delivery, SettleError, Settlement};
use crate::message::Message;

/// A stored row as a message. Headers that do not parse make it an
/// undecodable message (dead-lettered raw by the route) instead of failing
/// the fetch, and with it every row claimed beside it.
pub fn stored_message(
    seq: i64,
    id: String,
    topic: String,
    key: Option<String>,
    headers: &str,
    payload: Vec<u8>,
    timestamp_ms: i64,
) -> Message {
    match serde_json::from_str(headers) {
        Ok(headers) => Message {
            id,
            topic,
            key,
            headers,
            payload,
            timestamp_ms: timestamp_ms as u64,
        },
        Err(e) => {
            let error = format!(
                "row {seq}: headers are not a JSON list of name/value pairs ({e}): {}",
                crate::runtime::escape(headers, 512)
            );
            let mut message = Message::undecodable(id, topic, payload, error);
            message.key = key;
            message
        }
    }
}

/// One delivery to settle: its claim and what to do with it.
pub struct Item<A> {
    pub seq: i64,
    pub attempt: A,
    pub settlement: Settlement,
}

/// Drops a claim from those handed back on close, unless the row has been
/// claimed again since.
pub fn forget_claim<A: PartialEq>(mine: &mut HashMap<i64, A>, seq: i64, attempt: A) {
    if mine.get(&seq) == Some(&attempt) {
        mine.remove(&seq);
    }
}

/// Settles a batch of claims: reads each delivery's claim from its receipt
/// (`R`, read by `claim`), hands those it could read to `settle` in one
/// call, and drops from `mine` the claims that were settled or are another
/// consumer's now. Answers per delivery, in order.
pub async fn settle_claims<R: Any, A: Copy + PartialEq>(
    batch: Vec<(&Delivery, Settlement)>,
    claim: impl Fn(&R) -> (i64, A),
    mine: &Mutex<HashMap<i64, A>>,
    settle: impl AsyncFnOnce(Vec<Item<A>>) -> Vec<Result<(), SettleError>>,
) -> Vec<Result<(), SettleError>> {
    let mut results: Vec<Option<Result<(), SettleError>>> = Vec::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.len());
    for (delivery, settlement) in batch {
        match delivery.receipt.get::<R>() {
            Ok(receipt) => {
                let (seq, attempt) = claim(receipt);
                results.push(None);
                items.push(Item {
                    seq,
                    attempt,
                    settlement,
                });
            }
            Err(e) => results.push(Some(Err(SettleError::Fatal(e)))),
        }
    }
    let claims: Vec<(i64, A)> = items.iter().map(|i| (i.seq, i.attempt)).collect();
    let settled = if items.is_empty() {
        Vec::new()
    } else {
        settle(items).await
    };
    let mut mine = mine.lock().unwrap();
    let mut settled = claims.into_iter().zip(settled);
    for result in results.iter_mut().filter(|r| r.is_none()) {
        let ((seq, attempt), outcome) = settled.next().expect("an answer per item");
        // Settled, or another consumer's now: either way no longer ours to
        // hand back on close.
        if !matches!(outcome, Err(SettleError::Unavailable(_))) {
            forget_claim(&mut mine, seq, attempt);
        }
        *result = Some(outcome);
    }
    results
        .into_iter()
        .map(|r| r.expect("every item answered"))
        .collect()
}
