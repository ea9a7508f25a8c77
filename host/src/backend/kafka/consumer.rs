//! The thread that owns a subscription's librdkafka consumer: it polls,
//! files what arrives in the shared [`State`], commits settled offsets on
//! a timer, answers rebalances, takes records slowly while the buffer is
//! full, leaves the group when the application stops fetching, and closes.
//!
//! A plain thread rather than a task: librdkafka's calls block, and
//! destroying a consumer connected to tansu was seen to hang for ever in
//! `rd_kafka_destroy` (even after unsubscribing). So the consumer is
//! dropped on a thread of its own that nobody waits for beyond a few
//! seconds: a hang there costs a parked thread, never the process.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message as _};

use super::ledger::{Ledger, Prior, Received};
use super::state::{Resolving, Shared};
use super::{log_to_tracing, notes, wire};
use crate::backend::StartFrom;

/// Records taken from librdkafka in one go before waking fetches.
const FILE_AT_ONCE: usize = 500;
/// While the buffer is full: how often a record is taken anyway, so group
/// events (which come through the same poll) are not held up.
const TRICKLE: Duration = Duration::from_millis(100);
/// While the buffer is full: the pause between looks at it.
const FULL_NAP: Duration = Duration::from_millis(5);

/// What the async side asks of the thread.
pub enum Command {
    /// Leave the group and stop; the sender, if any, hears when the member
    /// is out of the group.
    Close(Option<tokio::sync::oneshot::Sender<()>>),
}

/// How a member behaves, fixed at subscribe.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub group_id: String,
    /// Topics and regular expressions, as librdkafka subscribes to them.
    pub subscription: Vec<String>,
    pub start: StartFrom,
    /// An ephemeral group commits nothing, so it leaves no offsets behind.
    pub ephemeral: bool,
    pub commit_interval: Duration,
    pub buffer: usize,
    /// Bound on the broker calls made during a rebalance.
    pub timeout: Duration,
}

/// The consumer's context: rebalances and librdkafka's log.
pub struct Context {
    shared: Arc<Shared>,
    behaviour: Behaviour,
}

impl Context {
    pub fn new(shared: Arc<Shared>, behaviour: Behaviour) -> Self {
        Context { shared, behaviour }
    }
}

impl ClientContext for Context {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        log_to_tracing(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(group = %self.behaviour.group_id, "Kafka consumer: {error}: {reason}");
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(consumer, partitions)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer),
            other => {
                tracing::warn!(group = %self.behaviour.group_id, "Kafka rebalance failed: {other:?}");
                self.revoke(consumer);
            }
        }
    }
}

impl Context {
    /// Takes the partitions on: each starts at the group's committed offset,
    /// or where the group starts if it has none, and gets a fresh ledger
    /// primed with the attempts the last commit recorded.
    fn assign(&self, consumer: &BaseConsumer<Self>, partitions: &TopicPartitionList) {
        let behaviour = &self.behaviour;
        let committed = consumer
            .committed_offsets(partitions.clone(), behaviour.timeout)
            .map_err(|e| {
                tracing::warn!(group = %behaviour.group_id, "Kafka: reading committed offsets failed ({e}); librdkafka reads them itself");
            })
            .ok();
        let mut assignment = TopicPartitionList::new();
        let mut ledgers = Vec::new();
        let mut resolving = Vec::new();
        for element in partitions.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            let found = committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, partition));
            let (committed_offset, from_broker) = match &found {
                Some(c) => match c.offset() {
                    Offset::Offset(offset) if offset >= 0 => {
                        (Some(offset), Prior::parse(c.metadata()))
                    }
                    _ => (None, Prior::default()),
                },
                None => (None, Prior::default()),
            };
            let prior = from_broker.merge(notes::recall(&behaviour.group_id, topic, partition));
            let start = match (committed_offset, behaviour.start) {
                (Some(offset), _) => Offset::Offset(offset),
                // Unknown: leave it to librdkafka (committed, else reset).
                (None, _) if committed.is_none() => Offset::Invalid,
                (None, StartFrom::Earliest) => Offset::Beginning,
                // Resolved before `subscribe` returns, so what is published
                // once the member has joined is never skipped; committed at
                // once, so the group's start stays put if the member leaves
                // before consuming.
                (None, StartFrom::Latest) => {
                    match consumer.fetch_watermarks(topic, partition, behaviour.timeout) {
                        Ok((low, high)) if high <= low.max(0) => Offset::Offset(high),
                        // Just before what ListOffsets calls the end, which on
                        // tansu lies inside the last batch: see `Resolving`.
                        Ok((_, high)) => {
                            resolving.push(Resolving {
                                topic: topic.to_string(),
                                partition,
                                at_least: high,
                                prior: prior.clone(),
                            });
                            Offset::Offset(high - 1)
                        }
                        Err(e) => {
                            tracing::warn!("Kafka: end of {topic}/{partition} unknown ({e})");
                            Offset::End
                        }
                    }
                }
            };
            tracing::debug!(
                group = %behaviour.group_id,
                "Kafka: {topic}/{partition} starts at {start:?}, earlier deliveries {prior:?}"
            );
            let _ = assignment.add_partition_offset(topic, partition, start);
            if resolving
                .last()
                .is_some_and(|r: &Resolving| r.topic == topic && r.partition == partition)
            {
                continue;
            }
            let known_start = match start {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            };
            let confirm = committed_offset.is_some();
            ledgers.push((topic.to_string(), partition, known_start, confirm, prior));
        }
        if let Err(e) = consumer.assign(&assignment) {
            tracing::warn!(group = %behaviour.group_id, "Kafka: assigning partitions failed: {e}");
            return;
        }
        let mut state = self.shared.lock();
        state.forget_partitions();
        for (topic, partition, start, confirm, prior) in ledgers {
            let epoch = state.new_epoch();
            let ledger = match (start, confirm) {
                (Some(start), true) => Ledger::confirming(epoch, start, prior),
                _ => Ledger::new(epoch, start, prior),
            };
            state
                .ledgers
                .entry(Arc::from(topic))
                .or_default()
                .insert(partition, ledger);
        }
        state.resolving = resolving;
        state.assignments += 1;
        drop(state);
        tracing::debug!(group = %behaviour.group_id, "Kafka: assigned {}", partitions.count());
        self.shared.changed.notify_waiters();
    }

    /// Gives the partitions up: commits what is settled (and the attempts
    /// of what is not), then forgets them, so late settlements are no-ops
    /// and the next owner redelivers what was unfinished.
    fn revoke(&self, consumer: &BaseConsumer<Self>) {
        commit(consumer, &self.shared, &self.behaviour, CommitMode::Sync);
        if let Err(e) = consumer.unassign() {
            tracing::warn!(group = %self.behaviour.group_id, "Kafka: unassigning failed: {e}");
        }
        self.shared.lock().forget_partitions();
        self.shared.changed.notify_waiters();
    }
}

/// Commits every partition whose commit changed.
fn commit(
    consumer: &BaseConsumer<Context>,
    shared: &Shared,
    behaviour: &Behaviour,
    mode: CommitMode,
) {
    if behaviour.ephemeral {
        return;
    }
    let mut list = TopicPartitionList::new();
    let mut sent = Vec::new();
    {
        let state = shared.lock();
        for (topic, partitions) in &state.ledgers {
            for (partition, ledger) in partitions {
                if let Some((offset, metadata)) = ledger.due_commit() {
                    notes::record(&behaviour.group_id, topic, *partition, ledger.notes());
                    let mut element = list.add_partition(topic, *partition);
                    let _ = element.set_offset(Offset::Offset(offset));
                    element.set_metadata(metadata.as_str());
                    sent.push((topic.clone(), *partition, ledger.epoch, (offset, metadata)));
                }
            }
        }
    }
    if sent.is_empty() {
        return;
    }
    match consumer.commit(&list, mode) {
        Ok(()) => {
            tracing::debug!(group = %behaviour.group_id, "Kafka: committed {list:?}");
            let mut state = shared.lock();
            for (topic, partition, epoch, commit) in sent {
                if let Some(ledger) = state.ledger_at(&topic, partition, epoch) {
                    ledger.committed(commit);
                }
            }
        }
        Err(e) => tracing::warn!(group = %behaviour.group_id, "Kafka: commit failed: {e}"),
    }
}

/// Starts each partition still [`Resolving`] at its end once a fetch
/// response has told librdkafka the high watermark: seeks there, takes the
/// partition on and commits that start.
fn resolve_ends(consumer: &BaseConsumer<Context>, shared: &Shared, behaviour: &Behaviour) {
    let pending: Vec<(String, i32, i64)> = {
        let state = shared.lock();
        state
            .resolving
            .iter()
            .map(|r| (r.topic.clone(), r.partition, r.at_least))
            .collect()
    };
    let mut resolved = Vec::new();
    for (topic, partition, at_least) in pending {
        let Some((_, high)) = watermarks(consumer, &topic, partition) else {
            continue;
        };
        // Below it: left over from an earlier assignment, not this fetch.
        if high < at_least {
            continue;
        }
        match consumer.seek(&topic, partition, Offset::Offset(high), behaviour.timeout) {
            Ok(()) => resolved.push((topic, partition, high)),
            Err(e) => tracing::warn!("Kafka: seeking {topic}/{partition} to {high} failed: {e}"),
        }
    }
    if resolved.is_empty() {
        return;
    }
    {
        let mut state = shared.lock();
        for (topic, partition, high) in resolved {
            // Rebalances run inside `poll`, on this thread, so the partition
            // is still held.
            let Some(index) = state
                .resolving
                .iter()
                .position(|r| r.topic == topic && r.partition == partition)
            else {
                continue;
            };
            let prior = state.resolving.swap_remove(index).prior;
            tracing::debug!(group = %behaviour.group_id, "Kafka: {topic}/{partition} starts at its end, {high}");
            let epoch = state.new_epoch();
            state
                .ledgers
                .entry(Arc::from(topic))
                .or_default()
                .insert(partition, Ledger::new(epoch, Some(high), prior));
        }
    }
    commit(consumer, shared, behaviour, CommitMode::Async);
    shared.changed.notify_waiters();
}

/// The log start and high watermark of the partition's last fetch
/// response, if there was one; rdkafka wraps only the ListOffsets query,
/// which tansu gets wrong.
fn watermarks(consumer: &BaseConsumer<Context>, topic: &str, partition: i32) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client handle is valid while `consumer` lives, `topic` is
    // NUL-terminated and outlives the call, and both out-pointers are valid
    // for writes; librdkafka only reads its cached offsets under a lock.
    let error = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (error == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low, high))
}

/// Moves a partition's fetching to `from`, to reach a start it skipped.
fn fetch_from(
    consumer: &BaseConsumer<Context>,
    behaviour: &Behaviour,
    topic: &str,
    partition: i32,
    from: i64,
) {
    tracing::debug!(group = %behaviour.group_id, "Kafka: {topic}/{partition} skipped its start; fetching from {from}");
    if let Err(e) = consumer.seek(topic, partition, Offset::Offset(from), behaviour.timeout) {
        tracing::warn!("Kafka: seeking {topic}/{partition} to {from} failed: {e}");
    }
}

/// Confirms the starts of partitions that stay silent although the broker
/// reports records past them: see [`super::landing`].
fn confirm_silent_starts(consumer: &BaseConsumer<Context>, shared: &Shared, behaviour: &Behaviour) {
    let mut moves = Vec::new();
    {
        let mut state = shared.lock();
        for (topic, partitions) in state.ledgers.iter_mut() {
            for (partition, ledger) in partitions.iter_mut() {
                let Some(landing) = &mut ledger.landing else {
                    continue;
                };
                let Some((low, high)) = watermarks(consumer, topic, *partition) else {
                    continue;
                };
                if landing.at_end(high) {
                    ledger.landing = None;
                } else if let Some(from) = landing.silent(low, high) {
                    moves.push((topic.clone(), *partition, from));
                }
            }
        }
    }
    for (topic, partition, from) in moves {
        fetch_from(consumer, behaviour, &topic, partition, from);
    }
}

/// Runs the member until it is closed (or its subscription dropped).
///
/// While the buffer is full the thread takes records from librdkafka only
/// now and then (group events arrive through the same poll), rather than
/// pausing the partitions: a paused partition loses what librdkafka
/// prefetched and is fetched again from the next offset, inside a record
/// batch, which tansu answers with the batch after (see [`super::landing`]).
/// Left alone, librdkafka stops fetching once its own queue is full
/// (`queued.max.messages.kbytes`), and carries on from a batch's end.
pub fn run(consumer: BaseConsumer<Context>, shared: Arc<Shared>, commands: Receiver<Command>) {
    let behaviour = consumer.context().behaviour.clone();
    let topics: Vec<&str> = behaviour.subscription.iter().map(String::as_str).collect();
    let mut last_commit = Instant::now();
    let mut full = false;
    let mut last_trickle = Instant::now();
    let closed_by = loop {
        match commands.try_recv() {
            Ok(Command::Close(done)) => break done,
            Err(TryRecvError::Disconnected) => break None,
            Err(TryRecvError::Empty) => {}
        }
        let (leave, rejoin, fill, released) = {
            let mut state = shared.lock();
            let idle = state.idle_subscribers();
            let released: usize = idle.iter().map(|id| state.release(*id)).sum();
            let all_idle = idle.len() == state.subscribers.len();
            let leave = !state.parked && all_idle && state.holds_work();
            let rejoin = state.parked && !all_idle;
            if leave {
                state.parked = true;
            }
            if rejoin {
                state.parked = false;
            }
            (leave, rejoin, state.fill(), released)
        };
        if released > 0 {
            tracing::warn!(
                group = %behaviour.group_id,
                "Kafka: {released} message(s) held by a subscription that has neither fetched nor settled for its lease go back in line"
            );
            shared.changed.notify_waiters();
        }
        if leave {
            tracing::warn!(
                group = %behaviour.group_id,
                "Kafka: no subscription fetched or settled for its lease while messages wait; leaving the group so other members take them"
            );
            consumer.unsubscribe();
        }
        if rejoin && let Err(e) = consumer.subscribe(&topics) {
            tracing::warn!(group = %behaviour.group_id, "Kafka: joining again failed: {e}");
        }
        // Full at the limit, and again taking records once half of it is
        // handed out, so the line never runs dry while records wait.
        let now_full = if full {
            fill > behaviour.buffer / 2
        } else {
            fill >= behaviour.buffer
        };
        if now_full != full {
            full = now_full;
            tracing::debug!(group = %behaviour.group_id, "Kafka: {}", if full { "the buffer is full" } else { "taking records again" });
        }
        let at_once = if full {
            if last_trickle.elapsed() < TRICKLE {
                std::thread::sleep(FULL_NAP);
                0
            } else {
                last_trickle = Instant::now();
                1
            }
        } else {
            FILE_AT_ONCE
        };
        // What is at hand is filed before the application hears of it, so a
        // fetch gets a batch rather than the first message alone.
        let mut filed = false;
        let mut wait = if full {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        for _ in 0..at_once {
            match consumer.poll(wait) {
                Some(Ok(record)) => {
                    let (topic, partition) = (record.topic(), record.partition());
                    let message = wire::decode(&record);
                    let log_start = || watermarks(&consumer, topic, partition).map_or(0, |w| w.0);
                    match shared
                        .lock()
                        .file(topic, partition, record.offset(), message, log_start)
                    {
                        Received::Filed => filed = true,
                        Received::Ignored => {}
                        Received::FetchFrom(from) => {
                            fetch_from(&consumer, &behaviour, topic, partition, from)
                        }
                    }
                    wait = Duration::ZERO;
                }
                Some(Err(e)) => {
                    tracing::warn!(group = %behaviour.group_id, "Kafka consumer: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
                None => break,
            }
        }
        if filed {
            shared.changed.notify_waiters();
        }
        if !full {
            // While full, silence is the member's own doing.
            confirm_silent_starts(&consumer, &shared, &behaviour);
        }
        resolve_ends(&consumer, &shared, &behaviour);
        if last_commit.elapsed() >= behaviour.commit_interval {
            commit(&consumer, &shared, &behaviour, CommitMode::Async);
            last_commit = Instant::now();
        }
    };
    // Unsubscribing revokes the partitions (committing them) in a later poll.
    consumer.unsubscribe();
    let give_up = Instant::now() + behaviour.timeout.min(Duration::from_secs(10));
    while Instant::now() < give_up {
        let _ = consumer.poll(Duration::from_millis(50));
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        if assigned == 0 && shared.lock().ledgers.is_empty() {
            break;
        }
    }
    if let Some(done) = closed_by {
        let _ = done.send(());
    }
    dispose(consumer, &behaviour.group_id);
}

/// Drops the consumer on a thread of its own, waiting a little to report a
/// hang, never for ever.
fn dispose(consumer: BaseConsumer<Context>, group_id: &str) {
    let (dropped, gone) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("sluice-kafka-drop".into())
        .spawn(move || {
            drop(consumer);
            let _ = dropped.send(());
        });
    if spawned.is_err() {
        return;
    }
    if gone.recv_timeout(Duration::from_secs(5)).is_err() {
        tracing::warn!(
            group = %group_id,
            "Kafka: librdkafka did not finish destroying the consumer within 5 s; leaving it behind"
        );
    }
}
