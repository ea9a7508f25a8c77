//! Settling a batch of deliveries in one round trip: the acks, nacks and
//! publish-and-acks of a batch go to the server in one call of the
//! settling script ([`scripts::SETTLE`]), which takes each delivery on its
//! own and all or nothing, and only while this consumer still holds it.
//!
//! That check is what makes a publish-and-ack exactly once within Redis: a
//! crash before the script leaves nothing behind, the script itself runs
//! whole or not at all, and a delivery whose lease passed to another
//! consumer (or to a later delivery here, after a reclaim) publishes
//! nothing and answers [`SettleError::LeaseLost`]. It also makes a call
//! that failed on the connection safe to repeat: what already took effect
//! is no longer held, so it is not done twice.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use ::redis::{ErrorKind, ServerErrorKind, Value};
use anyhow::anyhow;

use super::streams::{EntryField, entry_fields};
use super::subscription::{EntryReceipt, StreamSubscription};
use super::{envelope, scripts, transient};
use crate::backend::{Delivery, SettleError, Settlement};

/// What the script is asked to do for one delivery.
enum Plan<'a> {
    Ack,
    Nack {
        delay_ms: u64,
        parked: Vec<u8>,
    },
    /// Each output's stream (KEYS index) and entry fields.
    Publish(Vec<(usize, Vec<EntryField<'a>>)>),
}

/// One delivery of the batch, ready for the script.
struct Item<'a> {
    /// Its place in the batch.
    at: usize,
    receipt: &'a EntryReceipt,
    /// Its stream's KEYS index.
    source: usize,
    plan: Plan<'a>,
}

/// The script's keys, each once, with their 1-based indices.
struct KeyList {
    keys: Vec<String>,
    index: HashMap<String, usize>,
}

impl KeyList {
    fn add(&mut self, key: String) -> usize {
        if let Some(&at) = self.index.get(&key) {
            return at;
        }
        self.keys.push(key.clone());
        self.index.insert(key, self.keys.len());
        self.keys.len()
    }
}

/// Settles `batch` in one script call; one answer per item, in order.
pub async fn settle(
    sub: &StreamSubscription,
    batch: &[(&Delivery, Settlement)],
) -> Vec<Result<(), SettleError>> {
    let mut results: Vec<Option<Result<(), SettleError>>> =
        std::iter::repeat_with(|| None).take(batch.len()).collect();
    let keys = &sub.shared.keys;
    let mut key_list = KeyList {
        keys: Vec::new(),
        index: HashMap::new(),
    };
    key_list.add(keys.retry(&sub.group));
    key_list.add(keys.delayed(&sub.group));
    let mut items = Vec::with_capacity(batch.len());
    for (at, (delivery, settlement)) in batch.iter().enumerate() {
        match prepare(&mut key_list, sub, at, delivery, settlement) {
            Ok(item) => items.push(item),
            Err(e) => results[at] = Some(Err(SettleError::Fatal(e))),
        }
    }
    if !items.is_empty() {
        let answers = run(sub, &key_list.keys, &items).await;
        let mut nacked = false;
        let mut published = Vec::new();
        for (item, answer) in items.iter().zip(answers) {
            let result = match answer {
                Answer::Done => {
                    match item.plan {
                        Plan::Nack { .. } => nacked = true,
                        Plan::Publish(_) => published.push(item.at),
                        Plan::Ack => {}
                    }
                    sub.release(item.receipt);
                    Ok(())
                }
                Answer::NotHeld => {
                    sub.release(item.receipt);
                    Err(if sub.is_closed() {
                        SettleError::Closed
                    } else {
                        SettleError::LeaseLost
                    })
                }
                Answer::Refused(why) => Err(SettleError::Fatal(anyhow!(
                    "cannot settle entry {} of `{}`: {why}",
                    item.receipt.id,
                    item.receipt.stream
                ))),
                Answer::Failed(e) => Err(SettleError::Unavailable(e)),
            };
            results[item.at] = Some(result);
        }
        if nacked {
            sub.shared.nacks.fetch_add(1, Ordering::SeqCst);
        }
        let topics = published.into_iter().flat_map(|at| match &batch[at].1 {
            Settlement::PublishAndAck(messages) => messages.as_slice(),
            _ => &[],
        });
        sub.shared
            .note_published(topics.map(|message| message.topic.as_str()));
    }
    results
        .into_iter()
        .map(|result| result.expect("every item answered"))
        .collect()
}

fn prepare<'a>(
    key_list: &mut KeyList,
    sub: &StreamSubscription,
    at: usize,
    delivery: &'a Delivery,
    settlement: &'a Settlement,
) -> anyhow::Result<Item<'a>> {
    let receipt = delivery.receipt.get::<EntryReceipt>()?;
    let plan = match settlement {
        Settlement::Ack => Plan::Ack,
        Settlement::Nack(delay) => Plan::Nack {
            delay_ms: delay.as_millis() as u64,
            parked: envelope::encode(&delivery.message, delivery.attempt),
        },
        Settlement::PublishAndAck(messages) => {
            let mut outputs = Vec::with_capacity(messages.len());
            for message in messages {
                let fields = entry_fields(message)?;
                outputs.push((key_list.add(sub.shared.keys.stream(&message.topic)), fields));
            }
            Plan::Publish(outputs)
        }
    };
    Ok(Item {
        at,
        receipt,
        source: key_list.add(receipt.stream.clone()),
        plan,
    })
}

/// How the script answered for one delivery.
enum Answer {
    Done,
    /// No longer this consumer's; nothing changed.
    NotHeld,
    /// A key it would write holds something else.
    Refused(String),
    /// The call failed: nothing or everything of it may have happened.
    Failed(anyhow::Error),
}

/// One script call for every item (loading the script if the server does
/// not know it), repeated over a connection blip.
async fn run(sub: &StreamSubscription, keys: &[String], items: &[Item<'_>]) -> Vec<Answer> {
    let mut cmd = ::redis::cmd("EVALSHA");
    cmd.arg(scripts::SETTLE.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(&sub.group)
        .arg(&sub.consumer)
        .arg(
            sub.shared
                .config
                .maxlen
                .map_or(String::new(), |n| n.to_string()),
        );
    for item in items {
        let kind = match item.plan {
            Plan::Ack => "a",
            Plan::Nack { .. } => "n",
            Plan::Publish(_) => "p",
        };
        cmd.arg(kind)
            .arg(item.source)
            .arg(&item.receipt.id)
            .arg(item.receipt.count);
        match &item.plan {
            Plan::Ack => {}
            Plan::Nack { delay_ms, parked } => {
                cmd.arg(delay_ms).arg(parked);
            }
            Plan::Publish(outputs) => {
                cmd.arg(outputs.len());
                for (stream, fields) in outputs {
                    cmd.arg(stream).arg(fields.len() * 2);
                    for (name, value) in fields {
                        cmd.arg(*name).arg(value.as_ref());
                    }
                }
            }
        }
    }
    let cmd = &cmd;
    let reply: ::redis::RedisResult<Vec<Value>> = transient::retry(|| {
        let mut conn = sub.shared.conn.clone();
        async move {
            match cmd.query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    scripts::SETTLE.load_async(&mut conn).await?;
                    cmd.query_async(&mut conn).await
                }
                other => other,
            }
        }
    })
    .await;
    let answers = match reply {
        Ok(answers) if answers.len() == items.len() => answers,
        Ok(answers) => {
            let e = anyhow!(
                "the settling script answered {} times for {} deliveries",
                answers.len(),
                items.len()
            );
            return items
                .iter()
                .map(|_| Answer::Failed(anyhow!("{e}")))
                .collect();
        }
        Err(e) => {
            let e = anyhow::Error::new(e).context("settling deliveries");
            return items
                .iter()
                .map(|_| Answer::Failed(anyhow!("{e:#}")))
                .collect();
        }
    };
    answers
        .into_iter()
        .map(|answer| match answer {
            Value::Int(1) => Answer::Done,
            Value::Int(0) => Answer::NotHeld,
            Value::BulkString(why) => Answer::Refused(String::from_utf8_lossy(&why).into_owned()),
            other => Answer::Failed(anyhow!(
                "unexpected answer from the settling script: {other:?}"
            )),
        })
        .collect()
}
