//! The Redis backends on the shared server at 127.0.0.1:6379: what the
//! conformance suite does not show — a dead consumer's entries reclaimed
//! with the attempt count going on, a batch settled around a delivery whose
//! lease was lost, MAXLEN trimming (and an ordered group's key whose
//! holder it trimmed), an ordered group's message whose reader died
//! before its key's turn, the pending count,
//! pub/sub fan-out, and the same plugin and config moved to Redis by the
//! environment alone.
//!
//! Each test works under a key prefix of its own and deletes its keys at
//! the end; nothing here flushes the server. Without a server these tests
//! fail when `CI` is set and are skipped (loudly) otherwise.
use std::collections::HashSet;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use sluice::Message;
use sluice::backend::redis::{RedisPubSubBackend, RedisStreamsBackend};
use sluice::backend::{Backend, Delivery, SettleError, Settlement, SubscribeOptions, Subscription};
use sluice_tests::common;

const SHARED: &str = "127.0.0.1:6379";

/// A namespace on the shared server, removed on drop.
struct Namespace {
    prefix: String,
    client: redis::Client,
}

impl Namespace {
    /// `None` (after saying so) if no server runs and `CI` is not set.
    async fn new() -> Option<Self> {
        let client = redis::Client::open(format!("redis://{SHARED}/0")).unwrap();
        let reachable = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await;
        if !matches!(reachable, Ok(Ok(_))) {
            if std::env::var_os("CI").is_some() {
                panic!("Redis is not reachable at {SHARED}; the Redis tests need it in CI");
            }
            eprintln!(
                "!!! SKIPPED: Redis is not reachable at {SHARED}; start redis-server to run this test"
            );
            return None;
        }
        let id = Message::new("", "").id;
        Some(Namespace {
            prefix: format!("sluice-test-{}:", &id[id.len() - 12..]),
            client,
        })
    }

    fn url(&self, scheme: &str, params: &str) -> String {
        format!("{scheme}://{SHARED}/0?prefix={}{params}", self.prefix)
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Only this test's keys: SCAN its prefix, delete what it finds.
        let Ok(mut conn) = self.client.get_connection() else {
            return;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
            else {
                return;
            };
            for key in keys {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(key).query(&mut conn);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

fn options(topic: &str, group: &str, lease_ms: u64) -> SubscribeOptions {
    let mut options = SubscribeOptions::new(vec![topic.to_string()], group);
    options.lease = Duration::from_millis(lease_ms);
    options
}

/// A member of the ordered group `g` reading `topic`.
async fn ordered_member(backend: &RedisStreamsBackend, topic: &str) -> Box<dyn Subscription> {
    let mut ordered = options(topic, "g", 30_000);
    ordered.ordered = true;
    backend.subscribe(ordered).await.unwrap()
}

/// An ordered member of `jobs` that read two messages of one key at once:
/// the first, handed out, holds the key; the second waits for it.
async fn first_holds_the_key_second_waits(
    backend: &RedisStreamsBackend,
) -> (Box<dyn Subscription>, Delivery) {
    let sub = ordered_member(backend, "jobs").await;
    let keyed = |text: &str| Message::new("jobs", text.to_string()).with_key("k");
    backend
        .publish(vec![keyed("first"), keyed("second")])
        .await
        .unwrap();
    let mut read = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    let payloads: Vec<&[u8]> = read.iter().map(|d| &d.message.payload[..]).collect();
    assert_eq!(payloads, [b"first"], "the second waits for the first");
    let first = read.pop().unwrap();
    (sub, first)
}

async fn next(sub: &dyn Subscription, within: Duration) -> Delivery {
    let give_up = tokio::time::Instant::now() + within;
    loop {
        if let Some(d) = sub
            .fetch(1, Duration::from_millis(200))
            .await
            .unwrap()
            .pop()
        {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "nothing within {within:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_consumers_entries_are_claimed_and_attempts_go_on() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let url = ns.url("redis", "&claim_idle_ms=300");
    let crashed_process = RedisStreamsBackend::connect(&url).await.unwrap();
    let dead = crashed_process
        .subscribe(options("jobs", "workers", 300))
        .await
        .unwrap();
    let sent = Message::new("jobs", "work");
    crashed_process.publish(vec![sent.clone()]).await.unwrap();
    let first = next(dead.as_ref(), Duration::from_secs(5)).await;
    assert_eq!(first.attempt, 1);
    // The consumer dies: no settle, no close.
    drop(first);
    drop(dead);

    let survivor_process = RedisStreamsBackend::connect(&url).await.unwrap();
    let survivor = survivor_process
        .subscribe(options("jobs", "workers", 300))
        .await
        .unwrap();
    let reclaimed = next(survivor.as_ref(), Duration::from_secs(10)).await;
    assert_eq!(reclaimed.message.id, sent.id);
    assert_eq!(reclaimed.attempt, 2, "XAUTOCLAIM counts as an attempt");

    // The server agrees: delivered twice, now held by the survivor.
    let group = options("jobs", "workers", 300).group_key();
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(format!("{}jobs", ns.prefix))
        .arg(&group)
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut ns.conn().await)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].1.starts_with("sluice-"), "{pending:?}");
    assert_eq!(pending[0].3, 2);

    // A nack after the reclaim goes on counting.
    survivor.nack(&reclaimed, Duration::ZERO).await.unwrap();
    let again = next(survivor.as_ref(), Duration::from_secs(5)).await;
    assert_eq!(again.message.id, sent.id);
    assert_eq!(again.attempt, 3);
    survivor.ack(&again).await.unwrap();
    assert_eq!(survivor_process.pending(&group).await.unwrap(), 0);
    survivor.close().await.unwrap();
}

/// Consumer `a` holds three deliveries of `jobs`, but the lease of the
/// first ran out and consumer `b` (another process) claimed it.
struct LostLease {
    a: Box<dyn Subscription>,
    b: Box<dyn Subscription>,
    /// `a`'s copies, the first one lost.
    held: Vec<Delivery>,
    /// `b`'s copy of the first.
    claimed: Delivery,
    group: String,
    backend: RedisStreamsBackend,
}

async fn lose_one_lease(ns: &Namespace) -> LostLease {
    let url = ns.url("redis", "&claim_idle_ms=300");
    let backend = RedisStreamsBackend::connect(&url).await.unwrap();
    let a = backend
        .subscribe(options("jobs", "workers", 300))
        .await
        .unwrap();
    backend
        .publish(vec![Message::new("jobs", "first")])
        .await
        .unwrap();
    let first = next(a.as_ref(), Duration::from_secs(5)).await;
    // `a` stalls past its lease; `b`, first thing, claims what it left.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let elsewhere = RedisStreamsBackend::connect(&url).await.unwrap();
    let b = elsewhere
        .subscribe(options("jobs", "workers", 300))
        .await
        .unwrap();
    let claimed = next(b.as_ref(), Duration::from_secs(5)).await;
    assert_eq!(claimed.message.id, first.message.id);
    assert_eq!(claimed.attempt, 2);
    backend
        .publish(vec![
            Message::new("jobs", "second"),
            Message::new("jobs", "third"),
        ])
        .await
        .unwrap();
    let mut held = vec![first];
    while held.len() < 3 {
        held.push(next(a.as_ref(), Duration::from_secs(5)).await);
    }
    LostLease {
        a,
        b,
        held,
        claimed,
        group: options("jobs", "workers", 300).group_key(),
        backend,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settles_around_a_delivery_whose_lease_was_lost() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let lost = lose_one_lease(&ns).await;
    let held = &lost.held;
    let results = lost
        .a
        .settle(vec![
            (&held[0], Settlement::Ack),
            (&held[1], Settlement::Ack),
            (&held[2], Settlement::Nack(Duration::ZERO)),
        ])
        .await;
    assert!(
        matches!(results[0], Err(SettleError::LeaseLost)),
        "{results:?}"
    );
    assert!(results[1].is_ok() && results[2].is_ok(), "{results:?}");

    // The lost one is still `b`'s, delivered twice; the others are settled.
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(format!("{}jobs", ns.prefix))
        .arg(&lost.group)
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut ns.conn().await)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].3, 2, "{pending:?}");
    // A single ack or nack of it answers the same and changes nothing.
    let stale = lost.a.nack(&held[0], Duration::ZERO).await.unwrap_err();
    assert!(
        matches!(stale.downcast_ref(), Some(SettleError::LeaseLost)),
        "{stale:#}"
    );
    assert_eq!(lost.backend.pending(&lost.group).await.unwrap(), 1);
    lost.b.ack(&lost.claimed).await.unwrap();

    // The nacked one comes back once, as its next attempt.
    let again = next(lost.a.as_ref(), Duration::from_secs(5)).await;
    assert_eq!(again.message.id, held[2].message.id);
    assert_eq!(again.attempt, 2);
    lost.a.ack(&again).await.unwrap();
    assert_eq!(lost.backend.pending(&lost.group).await.unwrap(), 0);
    lost.a.close().await.unwrap();
    lost.b.close().await.unwrap();
}

/// The settling script reads what a consumer holds once per batch; a
/// delivery that appears twice in one batch is still settled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_settled_twice_in_one_batch_publishes_once() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let backend = RedisStreamsBackend::connect(&ns.url("redis", ""))
        .await
        .unwrap();
    let sub = backend
        .subscribe(options("jobs", "workers", 30_000))
        .await
        .unwrap();
    backend
        .publish(vec![
            Message::new("jobs", "one"),
            Message::new("jobs", "two"),
        ])
        .await
        .unwrap();
    let (one, two) = (
        next(sub.as_ref(), Duration::from_secs(5)).await,
        next(sub.as_ref(), Duration::from_secs(5)).await,
    );
    let output = |text: &str| Settlement::PublishAndAck(vec![Message::new("done", text)]);
    let results = sub
        .settle(vec![
            (&one, output("one-first")),
            (&one, output("one-again")),
            (&two, Settlement::Ack),
        ])
        .await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(
        matches!(results[1], Err(SettleError::LeaseLost)),
        "{results:?}"
    );
    let published: usize = redis::cmd("XLEN")
        .arg(format!("{}done", ns.prefix))
        .query_async(&mut ns.conn().await)
        .await
        .unwrap();
    assert_eq!(published, 1);
    let group = options("jobs", "workers", 30_000).group_key();
    assert_eq!(backend.pending(&group).await.unwrap(), 0);
    sub.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_ack_publishes_nothing_for_a_lost_lease() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let lost = lose_one_lease(&ns).await;
    assert!(lost.a.transactional());
    let held = &lost.held;
    let outputs = |d: &Delivery| {
        vec![
            Message::new("done", format!("{}-x", d.message.id)),
            Message::new("done", format!("{}-y", d.message.id)),
        ]
    };
    let results = lost
        .a
        .settle(
            held.iter()
                .map(|d| (d, Settlement::PublishAndAck(outputs(d))))
                .collect(),
        )
        .await;
    assert!(
        matches!(results[0], Err(SettleError::LeaseLost)),
        "{results:?}"
    );
    assert!(results[1].is_ok() && results[2].is_ok(), "{results:?}");
    let stale = lost
        .a
        .publish_and_ack(&held[0], outputs(&held[0]))
        .await
        .unwrap_err();
    assert!(
        matches!(stale.downcast_ref(), Some(SettleError::LeaseLost)),
        "{stale:#}"
    );

    // Exactly the outputs of the two settled inputs, in order.
    type Field = (String, Vec<u8>);
    let entries: Vec<(String, Vec<Field>)> = redis::cmd("XRANGE")
        .arg(format!("{}done", ns.prefix))
        .arg("-")
        .arg("+")
        .query_async(&mut ns.conn().await)
        .await
        .unwrap();
    let payloads: Vec<String> = entries
        .iter()
        .map(|(_, fields)| {
            let (_, payload) = fields.iter().find(|(name, _)| name == "payload").unwrap();
            String::from_utf8(payload.clone()).unwrap()
        })
        .collect();
    let expected: Vec<String> = held[1..]
        .iter()
        .flat_map(outputs)
        .map(|m| String::from_utf8(m.payload).unwrap())
        .collect();
    assert_eq!(payloads, expected);
    assert_eq!(lost.backend.pending(&lost.group).await.unwrap(), 1);
    lost.b.ack(&lost.claimed).await.unwrap();
    lost.a.close().await.unwrap();
    lost.b.close().await.unwrap();
}

/// Single acks and nacks made at the same time go to the server together;
/// each still gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_settlements_each_get_their_own_answer() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let lost = lose_one_lease(&ns).await;
    lost.backend
        .publish(
            (0..40)
                .map(|i| Message::new("jobs", format!("more-{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let mut held = lost.held;
    while held.len() < 43 {
        held.extend(lost.a.fetch(50, Duration::from_secs(2)).await.unwrap());
    }
    let a = lost.a.as_ref();
    let answers = futures::future::join_all(held.iter().enumerate().map(|(i, d)| async move {
        if i % 2 == 0 {
            a.ack(d).await
        } else {
            a.nack(d, Duration::from_secs(60)).await
        }
    }))
    .await;
    let stale = answers[0].as_ref().unwrap_err();
    assert!(
        matches!(stale.downcast_ref(), Some(SettleError::LeaseLost)),
        "{stale:#}"
    );
    for answer in &answers[1..] {
        assert!(answer.is_ok(), "{answer:?}");
    }
    // `b`'s entry, and the 21 nacked ones waiting for their delay.
    assert_eq!(lost.backend.pending(&lost.group).await.unwrap(), 22);
    lost.b.ack(&lost.claimed).await.unwrap();
    lost.a.close().await.unwrap();
    lost.b.close().await.unwrap();
}

/// In an ordered group, a key whose holder is trimmed from its stream
/// before it is settled (as `maxlen` does past a lagging group) goes on to
/// its next message once a reclaim finds the holder gone, instead of
/// staying busy for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_held_by_a_trimmed_entry_goes_on_to_its_next_message() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let backend = RedisStreamsBackend::connect(&ns.url("redis", "&claim_idle_ms=100"))
        .await
        .unwrap();
    let (sub, _first) = first_holds_the_key_second_waits(&backend).await;

    let _: u64 = redis::cmd("XTRIM")
        .arg(format!("{}jobs", ns.prefix))
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut ns.conn().await)
        .await
        .unwrap();
    let second = next(sub.as_ref(), Duration::from_secs(5)).await;
    assert_eq!(second.message.payload, b"second");
    sub.ack(&second).await.unwrap();
    sub.close().await.unwrap();
}

/// In an ordered group, a message read by a member that died before it
/// asked for its key's turn keeps its place: the next member to read a
/// later message of that key gives the earlier one its turn first, so the
/// later one waits until the earlier one is claimed and settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_read_by_a_member_that_died_before_its_turn_keeps_its_place() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let backend = RedisStreamsBackend::connect(&ns.url("redis", ""))
        .await
        .unwrap();
    let sub = ordered_member(&backend, "jobs").await;
    let group = options("jobs", "g", 30_000).group_key();
    let stream = format!("{}jobs", ns.prefix);
    let keyed = |text: &str| Message::new("jobs", text.to_string()).with_key("k");
    backend.publish(vec![keyed("first")]).await.unwrap();
    let mut conn = ns.conn().await;
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("died-before-its-turn")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let first_entry = read.keys[0].ids[0].id.clone();
    backend.publish(vec![keyed("second")]).await.unwrap();

    let early = sub.fetch(10, Duration::from_secs(1)).await.unwrap();
    let early: Vec<_> = early
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload))
        .collect();
    assert!(
        early.is_empty(),
        "{early:?} overtook the dead member's message"
    );

    // The dead member's entry becomes claimable at once, as a closing
    // member's would.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg(&group)
        .arg("sluice-returned")
        .arg(0)
        .arg(&first_entry)
        .arg("IDLE")
        .arg(1_000_000_000u64)
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = next(sub.as_ref(), Duration::from_secs(10)).await;
    assert_eq!(first.message.payload, b"first");
    let meanwhile = sub.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert!(
        meanwhile.is_empty(),
        "the later message came while the earlier one held the key"
    );
    sub.ack(&first).await.unwrap();
    let second = next(sub.as_ref(), Duration::from_secs(5)).await;
    assert_eq!(second.message.payload, b"second");
    sub.ack(&second).await.unwrap();
    sub.close().await.unwrap();
}

/// In an ordered group, a message waiting for its key's turn (read, and
/// no longer in the stream's lag) still counts in the group's backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_waiting_for_its_key_counts_in_the_backlog() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let backend = RedisStreamsBackend::connect(&ns.url("redis", ""))
        .await
        .unwrap();
    let (sub, first) = first_holds_the_key_second_waits(&backend).await;
    let group = options("jobs", "g", 30_000).group_key();
    assert_eq!(backend.backlog(&group).await.unwrap(), Some(1));
    sub.ack(&first).await.unwrap();
    sub.close().await.unwrap();
}

/// In an ordered group, an empty key is no key: such messages wait for
/// nothing, as unkeyed ones do (and none is left waiting for a key that
/// settling would never hand on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_key_waits_for_nothing_in_an_ordered_group() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let backend = RedisStreamsBackend::connect(&ns.url("redis", ""))
        .await
        .unwrap();
    let sub = ordered_member(&backend, "jobs").await;
    let blank = |text: &str| Message::new("jobs", text.to_string()).with_key("");
    backend.publish(vec![blank("1"), blank("2")]).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let batch = sub.fetch(10, Duration::from_secs(2)).await.unwrap();
        assert!(!batch.is_empty(), "only {got:?} delivered");
        got.extend(batch);
    }
    let acks = got.iter().map(|d| (d, Settlement::Ack)).collect();
    for result in sub.settle(acks).await {
        result.unwrap();
    }
    sub.close().await.unwrap();
}

#[tokio::test]
async fn maxlen_trims_each_topic_stream() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let backend = RedisStreamsBackend::connect(&ns.url("redis", "&maxlen=100"))
        .await
        .unwrap();
    for _ in 0..10 {
        let batch = (0..100)
            .map(|i| Message::new("trimmed", format!("{i}")))
            .collect();
        backend.publish(batch).await.unwrap();
    }
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("{}trimmed", ns.prefix))
        .query_async(&mut ns.conn().await)
        .await
        .unwrap();
    // Approximate trimming removes whole stream nodes: at least the cap
    // stays, and far fewer than were published.
    assert!((100..=300).contains(&len), "XLEN {len} with maxlen=100");
}

#[tokio::test]
async fn pending_counts_unsettled_and_delayed_messages() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let backend = RedisStreamsBackend::connect(&ns.url("redis", ""))
        .await
        .unwrap();
    let options = options("orders", "billing", 30_000);
    let group = options.group_key();
    let sub = backend.subscribe(options).await.unwrap();
    backend
        .publish(
            (0..5)
                .map(|i| Message::new("orders", format!("{i}")))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        backend.pending(&group).await.unwrap(),
        0,
        "nothing fetched yet"
    );
    let mut held = Vec::new();
    while held.len() < 5 {
        held.extend(sub.fetch(5, Duration::from_secs(2)).await.unwrap());
    }
    assert_eq!(backend.pending(&group).await.unwrap(), 5);
    sub.ack(&held[0]).await.unwrap();
    sub.ack(&held[1]).await.unwrap();
    assert_eq!(backend.pending(&group).await.unwrap(), 3);
    // Nacked with a delay: no longer delivered, still unsettled.
    sub.nack(&held[2], Duration::from_secs(60)).await.unwrap();
    assert_eq!(backend.pending(&group).await.unwrap(), 3);
    sub.ack(&held[3]).await.unwrap();
    sub.ack(&held[4]).await.unwrap();
    assert_eq!(backend.pending(&group).await.unwrap(), 1);
    assert!(
        sub.fetch(5, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty(),
        "a delayed retry came back early"
    );
    sub.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_fans_out_to_every_group_and_process() {
    let Some(ns) = Namespace::new().await else {
        return;
    };
    let url = ns.url("redis+pubsub", "");
    let here = RedisPubSubBackend::connect(&url).await.unwrap();
    let elsewhere = RedisPubSubBackend::connect(&url).await.unwrap();
    let a1 = here.subscribe(options("news", "a", 0)).await.unwrap();
    let a2 = here.subscribe(options("news", "a", 0)).await.unwrap();
    let b = here.subscribe(options("news", "b", 0)).await.unwrap();
    let a_elsewhere = elsewhere.subscribe(options("news", "a", 0)).await.unwrap();
    here.publish(
        (0..40)
            .map(|i| Message::new("news", format!("{i}")))
            .collect(),
    )
    .await
    .unwrap();

    async fn drain(subs: &[&dyn Subscription], want: usize) -> Vec<usize> {
        let mut seen = HashSet::new();
        let mut counts = vec![0; subs.len()];
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < want {
            assert!(
                tokio::time::Instant::now() < give_up,
                "{} of {want}",
                seen.len()
            );
            for (i, sub) in subs.iter().enumerate() {
                for d in sub.fetch(3, Duration::from_millis(50)).await.unwrap() {
                    assert!(
                        seen.insert(d.message.id.clone()),
                        "delivered twice in a group"
                    );
                    counts[i] += 1;
                    sub.ack(&d).await.unwrap();
                }
            }
        }
        counts
    }
    let split = drain(&[a1.as_ref(), a2.as_ref()], 40).await;
    assert!(
        split.iter().all(|c| *c > 0),
        "members of a group compete: {split:?}"
    );
    drain(&[b.as_ref()], 40).await;
    // Groups are per process: the other process's `a` gets everything too.
    drain(&[a_elsewhere.as_ref()], 40).await;
    for sub in [a1, a2, b, a_elsewhere] {
        sub.close().await.unwrap();
    }
}

fn sluice(args: &[&str]) -> Output {
    common::sluice()
        .args(args)
        .env("SLUICE_LOG", "warn")
        .env_remove("SLUICE_BACKEND_URL")
        .output()
        .expect("run sluice")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Runs the config (optionally moved by `SLUICE_BACKEND_URL`) until idle,
/// after publishing to `url`, and returns what `tail` reads back.
fn run_pipeline(config: &Path, url: &str, moved: bool) -> Vec<serde_json::Value> {
    let published = sluice(&["publish", "--url", url, "words", "hello", "--count", "20"]);
    assert!(published.status.success(), "{}", text(&published.stderr));
    let mut run = common::sluice();
    run.args([
        "run",
        &config.display().to_string(),
        "--exit-when-idle",
        "1",
    ])
    .env("SLUICE_LOG", "warn")
    .env_remove("SLUICE_BACKEND_URL");
    if moved {
        run.env("SLUICE_BACKEND_URL", url);
    }
    let out = run.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("received 20, succeeded 20"),
        "{}",
        text(&out.stdout)
    );
    let tail = sluice(&["tail", "--url", url, "shouted", "--json"]);
    assert!(tail.status.success(), "{}", text(&tail.stderr));
    text(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_same_plugin_and_config_run_on_redis_by_url_alone() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(ns) = runtime.block_on(Namespace::new()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}", dir.path().join("sluice.db").display());
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        common::upper_config(dir.path(), &common::plugin_path("uppercase"), ""),
    )
    .unwrap();

    let on_sqlite = run_pipeline(&config, &sqlite_url, false);
    let redis_url = ns.url("redis", "");
    let on_redis = run_pipeline(&config, &redis_url, true);
    let payloads = |lines: &[serde_json::Value]| -> Vec<String> {
        lines.iter().map(|m| m["payload"].to_string()).collect()
    };
    assert_eq!(on_redis.len(), 20);
    assert_eq!(payloads(&on_redis), payloads(&on_sqlite));
    assert!(
        on_redis
            .iter()
            .all(|m| m["payload"] == "HELLO" && m["topic"] == "shouted")
    );
    // The outputs are Redis stream entries under the namespace.
    let len: u64 = runtime.block_on(async {
        redis::cmd("XLEN")
            .arg(format!("{}shouted", ns.prefix))
            .query_async(&mut ns.conn().await)
            .await
            .unwrap()
    });
    assert_eq!(len, 20);
    drop(ns);
}
