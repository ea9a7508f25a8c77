//! The read side of a Streams subscription: XREADGROUP over every stream it
//! covers, XAUTOCLAIM of entries whose consumer went quiet, discovery of new
//! streams for patterns, and turning entries into deliveries.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::streams::{StreamAutoClaimReply, StreamId, StreamKey, StreamReadReply};
use ::redis::{RedisError, Value};
use anyhow::{Context, Result};
use tokio::time::Instant;

use super::delayed;
use super::envelope;
use super::scripts;
use super::settle::entry_order;
use super::streams::{Keys, Shared};
use super::subscription::{EntryReceipt, Held, StreamSubscription};
use crate::backend::{Delivery, Receipt, pattern};
use crate::message::Message;

/// How often due delayed retries are looked for when nothing here nacked;
/// bounds how late another process's delayed retry is noticed.
const PROMOTE_EVERY: Duration = Duration::from_millis(500);

/// Extra time a blocking read gets before it counts as hung.
const READ_GRACE: Duration = Duration::from_secs(10);

pub struct Reader {
    conn: ConnectionManager,
    retry: String,
    /// Topic streams read, besides the retry stream.
    streams: Vec<String>,
    /// Read but not yet returned, with when they were read.
    pub buffer: VecDeque<(Delivery, Instant)>,
    next_scan: Instant,
    next_reclaim: Instant,
    next_promote: Instant,
    /// XAUTOCLAIM cursor per stream.
    cursors: HashMap<String, String>,
    published_seen: usize,
    nacks_seen: u64,
    handbacks_seen: u64,
    /// Since when Redis has been failing to answer, if it is.
    pub outage: Option<Instant>,
}

impl Reader {
    /// `published_mark`: how many topics this process had published to
    /// when the subscription's first scan began.
    pub fn new(
        shared: &Shared,
        retry: String,
        streams: Vec<String>,
        published_mark: usize,
    ) -> Result<Self> {
        let now = Instant::now();
        Ok(Reader {
            conn: shared.reader_connection()?,
            retry,
            streams,
            buffer: VecDeque::new(),
            next_scan: now + shared.config.scan,
            // A new member first looks for work others left behind.
            next_reclaim: now,
            next_promote: now,
            cursors: HashMap::new(),
            published_seen: published_mark,
            nacks_seen: shared.nacks.load(Ordering::SeqCst),
            handbacks_seen: shared.handbacks.load(Ordering::SeqCst),
            outage: None,
        })
    }

    /// The retry stream first (so redeliveries are not starved), then the
    /// topic streams.
    pub fn all_streams(&self) -> Vec<String> {
        let mut all = Vec::with_capacity(self.streams.len() + 1);
        all.push(self.retry.clone());
        all.extend(self.streams.iter().cloned());
        all
    }

    /// When the next periodic chore is due.
    pub fn next_chore(&self) -> Instant {
        self.next_reclaim.min(self.next_promote).min(self.next_scan)
    }

    /// Discovers streams, moves due retries, reclaims abandoned entries.
    pub async fn maintain(&mut self, sub: &StreamSubscription) -> Result<()> {
        let shared = &sub.shared;
        let now = Instant::now();
        if !sub.patterns.is_empty() {
            self.discover(sub, now).await?;
        } else {
            self.next_scan = now + Duration::from_secs(3600);
        }

        let nacks = shared.nacks.load(Ordering::SeqCst);
        if now >= self.next_promote || nacks != self.nacks_seen {
            self.nacks_seen = nacks;
            let next_due = delayed::promote(sub, &mut self.conn).await?;
            self.next_promote = now + next_due.map_or(PROMOTE_EVERY, |d| d.min(PROMOTE_EVERY));
        }

        let handbacks = shared.handbacks.load(Ordering::SeqCst);
        if now >= self.next_reclaim || handbacks != self.handbacks_seen {
            self.handbacks_seen = handbacks;
            let full = self.reclaim(sub).await?;
            let every =
                (sub.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
            // A full batch means more may be waiting: go on next time.
            self.next_reclaim = if full { now } else { now + every };
        }
        Ok(())
    }

    /// Adds streams matching the patterns: topics published here at once,
    /// everything else at each scan.
    async fn discover(&mut self, sub: &StreamSubscription, now: Instant) -> Result<()> {
        let shared = &sub.shared;
        let (published, seen) = shared.published_since(self.published_seen);
        self.published_seen = seen;
        let mut found: Vec<String> = published
            .iter()
            .filter(|topic| sub.patterns.iter().any(|p| pattern::matches(p, topic)))
            .map(|topic| shared.keys.stream(topic))
            .collect();
        if now >= self.next_scan {
            for topic_pattern in &sub.patterns {
                found.extend(shared.scan(topic_pattern).await?);
            }
            self.next_scan = now + shared.config.scan;
        }
        found.retain(|s| !self.streams.contains(s));
        found.sort();
        found.dedup();
        if !found.is_empty() {
            shared.ensure_groups(&sub.group, sub.start, &found).await?;
            tracing::debug!(group = %sub.group, streams = ?found, "pattern subscription joined new streams");
            self.streams.extend(found);
        }
        Ok(())
    }

    /// After the server lost the group (or a stream was deleted), joins
    /// again where the group starts.
    async fn rejoin(&mut self, sub: &StreamSubscription) -> Result<()> {
        sub.shared
            .ensure_groups(&sub.group, sub.start, &self.streams)
            .await?;
        crate::backend::record_restored("redis");
        tracing::warn!(
            group = %sub.group,
            "the consumer group was gone from the server (its stream deleted, or the server lost its data) and was made again; what the stream still keeps is delivered again from the group's start position, and deliveries held when it went are settled into nothing"
        );
        Ok(())
    }

    /// One XREADGROUP for new entries on every stream, blocking up to
    /// `block` (not at all if it is under a millisecond). An ordered
    /// group's member then asks for the keyed entries' turns
    /// ([`scripts::TAKE_TURNS`]) and keeps those that got them.
    pub async fn read_new(
        &mut self,
        sub: &StreamSubscription,
        max: usize,
        block: Duration,
    ) -> Result<()> {
        let count = max.min(sub.shared.config.count);
        let streams = self.all_streams();
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&sub.group)
            .arg(&sub.consumer)
            .arg("COUNT")
            .arg(count);
        let block_ms = block.as_millis() as u64;
        if block_ms > 0 {
            cmd.arg("BLOCK").arg(block_ms);
        }
        cmd.arg("STREAMS").arg(&streams);
        for _ in &streams {
            cmd.arg(">");
        }
        let reply = tokio::time::timeout(
            block + READ_GRACE,
            cmd.query_async::<Option<StreamReadReply>>(&mut self.conn),
        )
        .await
        .context("XREADGROUP did not answer")?;
        let mut reply = match reply {
            Ok(reply) => reply.unwrap_or_default(),
            Err(e) if is_nogroup(&e) => return self.rejoin(sub).await,
            Err(e) => return Err(e).context("XREADGROUP"),
        };
        if sub.ordered {
            self.take_turns(sub, &mut reply.keys, true).await?;
        }
        self.buffer_read(sub, reply);
        Ok(())
    }

    /// Drops from `read` the topic entries that did not get their key's
    /// turn (they wait on their key's list now, or another member holds
    /// them). `run`: each stream's entries are one XREADGROUP's, with no
    /// other entry between them.
    async fn take_turns(
        &mut self,
        sub: &StreamSubscription,
        read: &mut [StreamKey],
        run: bool,
    ) -> Result<()> {
        let keys = &sub.shared.keys;
        let mut invocation = scripts::TAKE_TURNS.prepare_invoke();
        invocation
            .key(keys.busy(&sub.group))
            .key(keys.turned(&sub.group));
        invocation
            .arg(&sub.group)
            .arg(&sub.consumer)
            .arg(keys.waiting_prefix(&sub.group));
        let mut asked = 0;
        for stream in read.iter_mut() {
            if stream.key == self.retry || stream.ids.is_empty() {
                continue;
            }
            stream.ids.sort_by_key(|entry| entry_order(&entry.id));
            asked += 1;
            invocation
                .key(&stream.key)
                .arg(asked + 2)
                .arg(if run { "1" } else { "0" })
                .arg(stream.ids.len());
            for entry in &stream.ids {
                let key = peek_text(entry, "key").unwrap_or_default();
                let message_id = peek_text(entry, "id")
                    .unwrap_or_else(|| format!("{}/{}", stream.key, entry.id));
                invocation.arg(&entry.id).arg(key).arg(message_id);
            }
        }
        if asked == 0 {
            return Ok(());
        }
        let turns: Vec<i64> = invocation
            .invoke_async(&mut self.conn)
            .await
            .context("giving read entries their keys' turns")?;
        let mut turns = turns.into_iter();
        for stream in read.iter_mut() {
            if stream.key == self.retry || stream.ids.is_empty() {
                continue;
            }
            stream.ids.retain(|_| turns.next() == Some(1));
        }
        Ok(())
    }

    /// Turns what a read returned into buffered deliveries.
    fn buffer_read(&mut self, sub: &StreamSubscription, reply: StreamReadReply) {
        let now = Instant::now();
        let mut held = sub.held.lock().unwrap();
        for stream in reply.keys {
            for entry in stream.ids {
                let delivery = self.deliver(sub, &stream.key, entry, 1, &mut held);
                self.buffer.push_back((delivery, now));
            }
        }
    }

    /// Claims entries idle longer than the claim time from whichever
    /// consumer holds them. Returns whether a batch came back full.
    async fn reclaim(&mut self, sub: &StreamSubscription) -> Result<bool> {
        let count = sub.shared.config.count;
        let streams = self.all_streams();
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for stream in &streams {
            let cursor = self.cursors.get(stream).map_or("0-0", String::as_str);
            pipe.cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(&sub.group)
                .arg(&sub.consumer)
                .arg(sub.claim_idle.as_millis() as u64)
                .arg(cursor)
                .arg("COUNT")
                .arg(count);
        }
        let replies: Vec<::redis::RedisResult<StreamAutoClaimReply>> = pipe
            .query_async(&mut sub.shared.conn.clone())
            .await
            .context("XAUTOCLAIM")?;
        let mut claimed = Vec::new();
        let mut full = false;
        for (stream, reply) in streams.iter().zip(replies) {
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) if is_nogroup(&e) => {
                    self.rejoin(sub).await?;
                    continue;
                }
                Err(e) => return Err(e).context("XAUTOCLAIM"),
            };
            if !reply.deleted_ids.is_empty() {
                tracing::warn!(
                    group = %sub.group,
                    stream,
                    lost = reply.deleted_ids.len(),
                    "pending entries were trimmed from the stream before they were acknowledged"
                );
                if *stream != self.retry {
                    release_trimmed(sub, stream, &reply.deleted_ids).await?;
                }
            }
            full |= reply.claimed.len() >= count;
            self.cursors
                .insert(stream.clone(), reply.next_stream_id.clone());
            for entry in reply.claimed {
                claimed.push((stream.clone(), entry));
            }
        }
        if sub.ordered {
            let mut by_stream: Vec<StreamKey> = Vec::new();
            for (stream, entry) in claimed.drain(..) {
                match by_stream.iter_mut().find(|s| s.key == stream) {
                    Some(s) => s.ids.push(entry),
                    None => by_stream.push(StreamKey {
                        key: stream,
                        ids: vec![entry],
                    }),
                }
            }
            self.take_turns(sub, &mut by_stream, false).await?;
            for stream in by_stream {
                for entry in stream.ids {
                    claimed.push((stream.key.clone(), entry));
                }
            }
        }
        if claimed.is_empty() {
            return Ok(full);
        }
        // XAUTOCLAIM does not say how often an entry was delivered; the
        // pending list does.
        let mut pipe = ::redis::pipe();
        for (stream, entry) in &claimed {
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(&sub.group)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1);
        }
        let counts: Vec<Vec<(String, String, u64, u64)>> = pipe
            .query_async(&mut sub.shared.conn.clone())
            .await
            .context("XPENDING")?;
        let now = Instant::now();
        let mut held = sub.held.lock().unwrap();
        for ((stream, entry), pending) in claimed.into_iter().zip(counts) {
            let count = pending.first().map_or(1, |p| p.3.max(1));
            let delivery = self.deliver(sub, &stream, entry, count, &mut held);
            self.buffer.push_back((delivery, now));
        }
        Ok(full)
    }

    /// Turns an entry this consumer now holds into a delivery.
    fn deliver(
        &self,
        sub: &StreamSubscription,
        stream: &str,
        mut entry: StreamId,
        count: u64,
        held: &mut HashMap<(String, String), Held>,
    ) -> Delivery {
        let (message, attempts_before) = if stream == self.retry {
            decode_retry(&sub.shared.keys, &mut entry)
        } else {
            (decode_entry(&sub.shared.keys, stream, &mut entry), 0)
        };
        held.insert(
            (stream.to_string(), entry.id.clone()),
            Held {
                count,
                handed_out: false,
            },
        );
        Delivery {
            message,
            attempt: attempts_before.saturating_add(count.min(u32::MAX as u64) as u32),
            receipt: Receipt::new(EntryReceipt {
                stream: stream.to_string(),
                id: entry.id,
                count,
            }),
        }
    }
}

/// Hands on the keys that entries trimmed from `stream` held (their
/// holders will never be settled), for an ordered group.
async fn release_trimmed(sub: &StreamSubscription, stream: &str, ids: &[String]) -> Result<()> {
    let keys = &sub.shared.keys;
    let mut invocation = scripts::RELEASE_TRIMMED.prepare_invoke();
    invocation
        .key(keys.busy(&sub.group))
        .key(keys.retry(&sub.group))
        .arg(keys.waiting_prefix(&sub.group))
        .arg(stream)
        .arg(ids);
    let handed_on: u64 = invocation
        .invoke_async(&mut sub.shared.conn.clone())
        .await
        .context("handing on the keys of trimmed entries")?;
    if handed_on > 0 {
        tracing::warn!(
            group = %sub.group,
            stream,
            keys = handed_on,
            "keys held by trimmed entries were handed to their next messages"
        );
    }
    Ok(())
}

fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// Takes a field's value out of the entry (so a payload is not copied).
fn field_bytes(entry: &mut StreamId, name: &str) -> Option<Vec<u8>> {
    match entry.map.remove(name)? {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// A field's value as text, left in the entry.
fn peek_text(entry: &StreamId, name: &str) -> Option<String> {
    match entry.map.get(name)? {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn field_text(entry: &mut StreamId, name: &str) -> Option<String> {
    field_bytes(entry, name).map(|b| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
}

/// A topic stream entry as a message. Lenient, so streams written by other
/// tools can be consumed: a missing id becomes `<stream>/<entry id>`, a
/// missing timestamp the entry id's time, a missing payload empty.
pub(crate) fn decode_entry(keys: &Keys, stream: &str, entry: &mut StreamId) -> Message {
    let topic = keys.topic(stream).unwrap_or(stream).to_string();
    let headers = match field_text(entry, "headers") {
        None => Vec::new(),
        Some(json) => match serde_json::from_str(&json) {
            Ok(headers) => headers,
            Err(e) => {
                let error = format!(
                    "entry {} of {stream}: headers are not a JSON list of name/value pairs ({e}): {}",
                    entry.id,
                    crate::runtime::escape(&json, 512)
                );
                let id =
                    field_text(entry, "id").unwrap_or_else(|| format!("{stream}/{}", entry.id));
                let payload = field_bytes(entry, "payload").unwrap_or_default();
                // The key still counts: in an ordered group, settling this
                // message hands its key on.
                let mut message = Message::undecodable(id, topic, payload, error);
                message.key = field_text(entry, "key");
                return message;
            }
        },
    };
    let entry_ms = entry
        .id
        .split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);
    Message {
        id: field_text(entry, "id").unwrap_or_else(|| format!("{stream}/{}", entry.id)),
        topic,
        key: field_text(entry, "key"),
        headers,
        payload: field_bytes(entry, "payload").unwrap_or_default(),
        timestamp_ms: field_text(entry, "ts")
            .and_then(|ts| ts.parse().ok())
            .unwrap_or(entry_ms),
    }
}

/// A retry stream entry: the envelope parked by a nack, or a topic entry
/// that waited for its key's turn (with its stream in `src`), not yet
/// attempted.
pub(crate) fn decode_retry(keys: &Keys, entry: &mut StreamId) -> (Message, u32) {
    if let Some(source) = field_text(entry, "src") {
        return (decode_entry(keys, &source, entry), 0);
    }
    let bytes = field_bytes(entry, "m").unwrap_or_default();
    envelope::decode(&bytes).unwrap_or_else(|e| {
        // Only Sluice writes retry streams; a broken entry is delivered as
        // what it is so the route dead-letters it instead of looping.
        let id = format!("unreadable-retry/{}", entry.id);
        let error = format!("retry entry {}: {e:#}", entry.id);
        (Message::undecodable(id, String::new(), bytes, error), 0)
    })
}
