//! Publishing to JetStream through a sliding window: messages go out in
//! order, one after another, without waiting for the server, and their
//! acknowledgements (PubAcks) are awaited together, at most [`WINDOW`] in
//! flight; each acknowledgement that arrives lets the next message go.
//!
//! A publish is a request whose reply is its PubAck. When the connection
//! breaks, requests still in the broken socket are lost and their PubAcks
//! would only time out, so everything still waiting is sent again on the
//! new connection: `Nats-Msg-Id` deduplicates what did arrive.

use std::collections::{HashSet, VecDeque};
use std::future::IntoFuture;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::context::{Context, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Client, Subject};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};

use super::headers;
use super::shards::{self, Shard};
use crate::message::Message;

/// Publishes awaiting their acknowledgement at once, per publish call.
pub const WINDOW: usize = 256;
/// How often a window with nothing arriving looks for a reconnect.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);
/// How many reconnects one publish call sends its waiting messages again
/// for, before their acknowledgements may time out.
const RESENDS: u32 = 3;

/// A message as it is sent: made once, sent again without copying its
/// payload.
#[derive(Clone)]
pub(crate) struct Outgoing {
    /// Where the stream keeps it: the topic, or with `shards` its shard.
    pub subject: Subject,
    publish: PublishMessage,
}

impl Outgoing {
    pub fn new(message: Message, shards: Option<u32>) -> Self {
        let headers = headers::encode(&message);
        let subject = match shards {
            Some(count) => {
                shards::subject(&message.topic, Shard::of(message.key.as_deref(), count))
            }
            None => message.topic,
        };
        Outgoing {
            subject: Subject::from(subject),
            publish: PublishMessage::build()
                .payload(message.payload.into())
                .headers(headers),
        }
    }
}

impl Outgoing {
    /// The topic it was published to.
    pub fn topic(&self, shards: Option<u32>) -> String {
        match shards {
            Some(_) => shards::topic(&self.subject),
            None => self.subject.to_string(),
        }
    }
}

/// A message whose publish failed.
pub(crate) struct Failure {
    /// Its index in the published slice.
    pub index: usize,
    pub error: anyhow::Error,
    /// No stream captures its topic.
    pub no_stream: bool,
}

impl Failure {
    fn new(index: usize, error: PublishError) -> Self {
        Failure {
            index,
            no_stream: error.kind() == PublishErrorKind::StreamNotFound,
            error: error.into(),
        }
    }
}

/// Publishes `messages` in order and waits until the server has stored
/// every one; returns the ones that failed, in order.
pub(crate) async fn publish(client: &Client, js: &Context, messages: &[Outgoing]) -> Vec<Failure> {
    let connects = || client.statistics().connects.load(Ordering::SeqCst);
    let mut failed = Vec::new();
    let mut to_send: VecDeque<usize> = (0..messages.len()).collect();
    let mut in_flight = HashSet::with_capacity(WINDOW.min(messages.len()));
    let mut waiting = FuturesUnordered::new();
    let mut epoch = connects();
    let mut resends = 0;
    loop {
        while waiting.len() < WINDOW
            && let Some(index) = to_send.pop_front()
        {
            let message = &messages[index];
            let publish = message.publish.clone();
            match js.send_publish(message.subject.clone(), publish).await {
                Ok(ack) => {
                    in_flight.insert(index);
                    // The acknowledgement's timeout starts when it is first polled.
                    waiting.push(ack.into_future().map(move |result| (index, result)));
                }
                Err(e) => failed.push(Failure::new(index, e)),
            }
        }
        if waiting.is_empty() {
            break;
        }
        tokio::select! {
            Some((index, result)) = waiting.next() => {
                in_flight.remove(&index);
                if let Err(e) = result {
                    failed.push(Failure::new(index, e));
                }
            }
            _ = tokio::time::sleep(RECONNECT_CHECK) => {}
        }
        if resends < RESENDS && connects() != epoch {
            resends += 1;
            epoch = connects();
            // Dropped acknowledgements hand their permits back by themselves.
            waiting.clear();
            let mut again: Vec<usize> = in_flight.drain().collect();
            again.sort_unstable();
            for index in again.into_iter().rev() {
                to_send.push_front(index);
            }
        }
    }
    failed.sort_by_key(|f| f.index);
    failed
}
