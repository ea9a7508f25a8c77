//! A group's backlog on Kafka: for every partition of the topics it reads,
//! the high watermark less the offset the group committed (or less the low
//! watermark where it committed nothing yet), summed. Commits stay at the
//! lowest unsettled offset, so what a member holds unsettled counts too.
//!
//! The committed offsets are read by a consumer of the group's id that
//! never subscribes, so it never joins the group or makes it rebalance;
//! one per group and process, kept, since making one costs connections
//! and dropping one can hang (see [`Detached`]).
//!
//! The high watermark is confirmed by reading from just before the end
//! ListOffsets reports: tansu 0.6.0 answers ListOffsets with the base
//! offset of the newest record batch plus one (see `state::Resolving`), so
//! the rest of that batch is found by reading it. On Kafka this reads one
//! record per partition.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{Detached, KafkaConfig, LogContext, apply_properties, client_config, names};
use crate::backend::pattern;

impl ConsumerContext for LogContext {}

/// A topic's partitions: low and high watermark as ListOffsets reports
/// them, and the group's committed offset.
type Partitions = BTreeMap<i32, (i64, i64, Option<i64>)>;

/// A group's reader; one call at a time assigns it partitions.
struct Reader {
    busy: Mutex<()>,
    consumer: Detached<BaseConsumer<LogContext>>,
}

/// The readers made in this process, by bootstrap servers and group id.
type Readers = Mutex<HashMap<(String, String), Arc<Reader>>>;

/// The reader of a group's committed offsets, made on first use.
fn reader(config: &KafkaConfig, group_id: &str) -> Result<Arc<Reader>> {
    static READERS: OnceLock<Readers> = OnceLock::new();
    let mut readers = READERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let slot = (config.bootstrap.clone(), group_id.to_string());
    if let Some(reader) = readers.get(&slot) {
        return Ok(reader.clone());
    }
    let mut client = client_config(config);
    client
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100");
    apply_properties(&mut client, config);
    let consumer: BaseConsumer<LogContext> = client
        .create_with_context(LogContext)
        .with_context(|| format!("cannot create a Kafka consumer for `{}`", config.shown))?;
    let reader = Arc::new(Reader {
        busy: Mutex::new(()),
        consumer: Detached::new(consumer),
    });
    readers.insert(slot, reader.clone());
    Ok(reader)
}

/// Messages of the topics of `group_key` not yet consumed by its group;
/// `None` for a key that names no topics. Blocks: run it off the runtime.
pub fn backlog(
    config: &KafkaConfig,
    producer: &FutureProducer<LogContext>,
    group_key: &str,
    timeout: Duration,
) -> Result<Option<u64>> {
    let patterns = names::topics_of(group_key);
    if patterns.is_empty() {
        return Ok(None);
    }
    let client = producer.client();
    let metadata = client
        .fetch_metadata(None, timeout)
        .context("cannot read the Kafka cluster's metadata")?;
    let mut partitions = TopicPartitionList::new();
    for topic in metadata.topics() {
        // Internal topics (`__consumer_offsets`) are never a group's.
        if topic.name().starts_with("__")
            || !patterns.iter().any(|p| pattern::matches(p, topic.name()))
        {
            continue;
        }
        for partition in topic.partitions() {
            partitions.add_partition(topic.name(), partition.id());
        }
    }
    if partitions.count() == 0 {
        return Ok(Some(0));
    }
    let reader = reader(config, &names::group_id(group_key))?;
    let _busy = reader.busy.lock().unwrap_or_else(|e| e.into_inner());
    let consumer = reader.consumer.get();
    let committed = consumer
        .committed_offsets(partitions, timeout)
        .context("cannot read the Kafka group's committed offsets")?;
    // Topic → partition → (low and high watermark as listed, committed).
    let mut topics: BTreeMap<String, Partitions> = BTreeMap::new();
    for element in committed.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let (low, high) = client
            .fetch_watermarks(topic, partition, timeout)
            .with_context(|| {
                format!("cannot read the offsets of Kafka topic `{topic}` partition {partition}")
            })?;
        let committed = match element.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        };
        topics
            .entry(topic.to_string())
            .or_default()
            .insert(partition, (low, high, committed));
    }
    let mut total = 0u64;
    for (topic, partitions) in topics {
        let ends = confirm_ends(consumer, &topic, &partitions, timeout)?;
        for (partition, (low, _, committed)) in partitions {
            let from = committed.map_or(low, |offset| offset.max(low));
            total += u64::try_from(ends[&partition] - from).unwrap_or(0);
        }
    }
    Ok(Some(total))
}

/// The high watermark of each partition of `topic`: read from just before
/// the end ListOffsets reported to the end of the partition, one topic at
/// a time (the end of a partition is reported by its number only).
fn confirm_ends(
    consumer: &BaseConsumer<LogContext>,
    topic: &str,
    partitions: &Partitions,
    timeout: Duration,
) -> Result<BTreeMap<i32, i64>> {
    let mut ends: BTreeMap<i32, i64> = partitions
        .iter()
        .map(|(partition, (_, high, _))| (*partition, *high))
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut open = HashSet::new();
    for (partition, (low, high, _)) in partitions {
        if high > low {
            assignment.add_partition_offset(topic, *partition, Offset::Offset(high - 1))?;
            open.insert(*partition);
        }
    }
    if open.is_empty() {
        return Ok(ends);
    }
    consumer.assign(&assignment)?;
    let give_up = Instant::now() + timeout;
    let read = loop {
        if open.is_empty() {
            break Ok(());
        }
        let left = give_up.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(anyhow!(
                "the end of Kafka topic `{topic}` was not reached within {timeout:?}"
            ));
        }
        match consumer.poll(left.min(Duration::from_millis(100))) {
            Some(Ok(record)) if record.topic() == topic => {
                let end = ends.entry(record.partition()).or_default();
                *end = (*end).max(record.offset() + 1);
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                open.remove(&partition);
            }
            Some(Err(e)) => {
                break Err(anyhow::Error::new(e)
                    .context(format!("cannot read the end of Kafka topic `{topic}`")));
            }
            _ => {}
        }
    };
    consumer.unassign()?;
    read.map(|()| ends)
}
