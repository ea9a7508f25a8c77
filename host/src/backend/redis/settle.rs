//! Settling deliveries in one round trip: the acks, nacks and
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
//!
//! Single acks and nacks that arrive while another is on its way wait for
//! it and then go together ([`Singles`]), so a consumer acking many
//! deliveries at once pays one script call, not one each.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use ::redis::{Cmd, ErrorKind, ServerErrorKind, Value};
use anyhow::{Result, anyhow};
use tokio::sync::oneshot;

use super::streams::{EntryField, entry_fields};
use super::subscription::{EntryReceipt, StreamSubscription};
use super::{envelope, scripts, transient};
use crate::backend::{Delivery, SettleError, Settlement};
use crate::message::Message;

/// One settlement, owning what the script needs.
pub struct Request {
    stream: String,
    id: String,
    /// The entry's delivery count when this consumer got it.
    count: u64,
    /// A keyed message's key and id: in an ordered group, settling the
    /// message that holds its key hands the key on.
    keyed: Option<(String, String)>,
    kind: Kind,
}

enum Kind {
    Ack,
    Nack { delay_ms: u64, parked: Vec<u8> },
    Publish(Vec<Message>),
}

impl Request {
    pub fn new(delivery: &Delivery, settlement: Settlement) -> Result<Self> {
        let receipt = delivery.receipt.get::<EntryReceipt>()?;
        let kind = match settlement {
            Settlement::Ack => Kind::Ack,
            Settlement::Nack(delay) => Kind::Nack {
                delay_ms: delay.as_millis() as u64,
                parked: envelope::encode(&delivery.message, delivery.attempt),
            },
            Settlement::PublishAndAck(messages) => Kind::Publish(messages),
        };
        Ok(Request {
            stream: receipt.stream.clone(),
            id: receipt.id.clone(),
            count: receipt.count,
            keyed: (delivery.message.key.clone()).map(|key| (key, delivery.message.id.clone())),
            kind,
        })
    }
}

/// Settles `batch` in one script call; one answer per item, in order.
pub async fn settle(
    sub: &StreamSubscription,
    batch: Vec<(&Delivery, Settlement)>,
) -> Vec<Result<(), SettleError>> {
    let requests = batch
        .into_iter()
        .map(|(delivery, settlement)| Request::new(delivery, settlement))
        .collect();
    settle_requests(sub, requests).await
}

/// Settles each request in one script call; one answer per request, in
/// order (a request that could not be made is answered as fatal).
async fn settle_requests(
    sub: &StreamSubscription,
    requests: Vec<Result<Request>>,
) -> Vec<Result<(), SettleError>> {
    let mut results: Vec<Option<Result<(), SettleError>>> = std::iter::repeat_with(|| None)
        .take(requests.len())
        .collect();
    let mut keys = KeyList::default();
    keys.add(sub.shared.keys.retry(&sub.group));
    keys.add(sub.shared.keys.delayed(&sub.group));
    keys.add(sub.shared.keys.busy(&sub.group));
    let mut items = Vec::with_capacity(requests.len());
    for (at, request) in requests.iter().enumerate() {
        match request
            .as_ref()
            .map_err(|e| anyhow!("{e:#}"))
            .and_then(|request| Item::new(&mut keys, sub, at, request))
        {
            Ok(item) => items.push(item),
            Err(e) => results[at] = Some(Err(SettleError::Fatal(e))),
        }
    }
    if !items.is_empty() {
        let most = sub.held.lock().unwrap().len().max(items.len()) + 1;
        let answers = call(sub, &keys.keys, &ranges(&items), most, &items).await;
        let mut nacked = false;
        for (item, answer) in items.iter().zip(answers) {
            let request = item.request;
            let result = match answer {
                Answer::Done => {
                    match &request.kind {
                        Kind::Nack { .. } => nacked = true,
                        Kind::Publish(messages) => sub
                            .shared
                            .note_published(messages.iter().map(|m| m.topic.as_str())),
                        Kind::Ack => {}
                    }
                    sub.release(&request.stream, &request.id);
                    Ok(())
                }
                Answer::NotHeld => {
                    sub.release(&request.stream, &request.id);
                    Err(if sub.is_closed() {
                        SettleError::Closed
                    } else {
                        SettleError::LeaseLost
                    })
                }
                Answer::Refused(why) => Err(SettleError::Fatal(anyhow!(
                    "cannot settle entry {} of `{}`: {why}",
                    request.id,
                    request.stream
                ))),
                Answer::Failed(e) => Err(SettleError::Unavailable(e)),
            };
            results[item.at] = Some(result);
        }
        if nacked {
            sub.shared.nacks.fetch_add(1, Ordering::SeqCst);
        }
    }
    results
        .into_iter()
        .map(|result| result.expect("every request answered"))
        .collect()
}

/// Where the answer for one single settlement goes.
type AnswerTo = oneshot::Sender<Result<(), SettleError>>;

/// Single settlements waiting for the one on its way, and the turn to send
/// the next call.
#[derive(Default)]
pub struct Singles {
    waiting: std::sync::Mutex<Vec<(Request, AnswerTo)>>,
    turn: tokio::sync::Mutex<()>,
}

impl Singles {
    /// Settles one delivery, together with whatever else is waiting.
    pub async fn settle(
        &self,
        sub: &StreamSubscription,
        delivery: &Delivery,
        settlement: Settlement,
    ) -> Result<(), SettleError> {
        let request = Request::new(delivery, settlement).map_err(SettleError::Fatal)?;
        let (sender, mut answer) = oneshot::channel();
        self.waiting.lock().unwrap().push((request, sender));
        let _turn = self.turn.lock().await;
        // Whoever had the turn before may have sent this one along.
        match answer.try_recv() {
            Ok(result) => return result,
            Err(oneshot::error::TryRecvError::Closed) => {
                return Err(SettleError::Unavailable(anyhow!(
                    "settling was interrupted; it may or may not have taken effect"
                )));
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        let (requests, senders): (Vec<_>, Vec<_>) =
            std::mem::take(&mut *self.waiting.lock().unwrap())
                .into_iter()
                .map(|(request, sender)| (Ok(request), sender))
                .unzip();
        let results = settle_requests(sub, requests).await;
        for (sender, result) in senders.into_iter().zip(results) {
            // A caller that gave up no longer listens.
            let _ = sender.send(result);
        }
        answer
            .try_recv()
            .unwrap_or_else(|_| unreachable!("this settlement was among those sent"))
    }
}

/// A request ready for the script.
struct Item<'a> {
    /// Its place in the call.
    at: usize,
    request: &'a Request,
    /// Its stream's KEYS index.
    source: usize,
    /// Each output's stream (KEYS index) and entry fields.
    outputs: Vec<(usize, Vec<EntryField<'a>>)>,
}

impl<'a> Item<'a> {
    fn new(
        keys: &mut KeyList,
        sub: &StreamSubscription,
        at: usize,
        request: &'a Request,
    ) -> Result<Self> {
        let mut outputs = Vec::new();
        if let Kind::Publish(messages) = &request.kind {
            outputs.reserve(messages.len());
            for message in messages {
                let fields = entry_fields(message)?;
                outputs.push((keys.add(sub.shared.keys.stream(&message.topic)), fields));
            }
        }
        Ok(Item {
            at,
            request,
            source: keys.add(request.stream.clone()),
            outputs,
        })
    }

    /// Its arguments, as [`scripts::SETTLE`] reads them.
    fn write(&self, cmd: &mut Cmd) {
        let request = self.request;
        let kind = match request.kind {
            Kind::Ack => "a",
            Kind::Nack { .. } => "n",
            Kind::Publish(_) => "p",
        };
        cmd.arg(kind)
            .arg(self.source)
            .arg(&request.id)
            .arg(request.count)
            .arg(request.keyed.as_ref().map_or("", |(key, _)| key.as_str()))
            .arg(request.keyed.as_ref().map_or("", |(_, id)| id.as_str()));
        match &request.kind {
            Kind::Ack => {}
            Kind::Nack { delay_ms, parked } => {
                cmd.arg(delay_ms).arg(&parked[..]);
            }
            Kind::Publish(_) => {
                cmd.arg(self.outputs.len());
                for (stream, fields) in &self.outputs {
                    cmd.arg(stream).arg(fields.len() * 2);
                    for (name, value) in fields {
                        cmd.arg(*name).arg(value.as_ref());
                    }
                }
            }
        }
    }
}

/// The script's keys, each once, with their 1-based indices.
#[derive(Default)]
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

/// Per source stream (KEYS index), the lowest and highest entry id the
/// items settle there.
fn ranges<'a>(items: &[Item<'a>]) -> BTreeMap<usize, (&'a str, &'a str)> {
    // Each bound with its id's order, parsed once.
    type Bound<'a> = ((u64, u64), &'a str);
    let mut ranges: BTreeMap<usize, (Bound, Bound)> = BTreeMap::new();
    for item in items {
        let id = item.request.id.as_str();
        let bound = (entry_order(id), id);
        let (low, high) = ranges.entry(item.source).or_insert((bound, bound));
        if bound.0 < low.0 {
            *low = bound;
        }
        if bound.0 > high.0 {
            *high = bound;
        }
    }
    ranges
        .into_iter()
        .map(|(source, (low, high))| (source, (low.1, high.1)))
        .collect()
}

/// A stream entry id (`millis-sequence`) as something that sorts like it.
pub(super) fn entry_order(id: &str) -> (u64, u64) {
    let (millis, sequence) = id.split_once('-').unwrap_or((id, "0"));
    (millis.parse().unwrap_or(0), sequence.parse().unwrap_or(0))
}

/// One script call for every item (loading the script if the server does
/// not know it), repeated over a connection blip. `most` bounds how many
/// entries the consumer can hold in one source range.
async fn call(
    sub: &StreamSubscription,
    keys: &[String],
    ranges: &BTreeMap<usize, (&str, &str)>,
    most: usize,
    items: &[Item<'_>],
) -> Vec<Answer> {
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
        )
        .arg(sub.shared.keys.waiting_prefix(&sub.group))
        .arg(ranges.len());
    for (source, (low, high)) in ranges {
        cmd.arg(source).arg(low).arg(high).arg(most);
    }
    for item in items {
        item.write(&mut cmd);
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
    let failed = |e: &dyn std::fmt::Display| {
        items
            .iter()
            .map(|_| Answer::Failed(anyhow!("settling deliveries: {e}")))
            .collect()
    };
    match reply {
        Ok(answers) if answers.len() == items.len() => answers
            .into_iter()
            .map(|answer| match answer {
                Value::Int(1) => Answer::Done,
                Value::Int(0) => Answer::NotHeld,
                Value::BulkString(why) => {
                    Answer::Refused(String::from_utf8_lossy(&why).into_owned())
                }
                other => Answer::Failed(anyhow!(
                    "unexpected answer from the settling script: {other:?}"
                )),
            })
            .collect(),
        Ok(answers) => failed(&format_args!(
            "the script answered {} times for {} deliveries",
            answers.len(),
            items.len()
        )),
        Err(e) => failed(&e),
    }
}
