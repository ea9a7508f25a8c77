//! The contract cases: publish, subscribe, settle, groups, durability,
//! each checked directly against a backend.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use sluice::Message;
use sluice::backend::{Capabilities, Delivery, SettleError, Settlement, StartFrom, Subscription};

use crate::case;
use crate::conformance::harness::{
    Case, Ctx, consume, distinct_ids, expect_nothing, numbered, payload,
};
use crate::conformance::targets::Target;

const LIMIT: Duration = Duration::from_secs(30);
const QUIET: Duration = Duration::from_millis(300);

pub fn all() -> Vec<Case> {
    vec![
        case!(publish_subscribe_keeps_payload_key_and_headers),
        case!(concurrent_publishers_and_subscribers_lose_nothing),
        case!(many_topics_at_once),
        case!(topics_are_isolated),
        case!(redelivery_after_nack),
        case!(nacked_message_returns_before_later_ones, needs_order),
        case!(order_preserved_per_key, needs_order),
        case!(
            a_key_waits_for_its_previous_delivery_across_consumers,
            needs_key_affinity
        ),
        case!(continue_after_subscriber_closes, needs_at_least_once),
        case!(concurrent_close, needs_at_least_once),
        case!(continue_after_repeated_errors),
        case!(nothing_lost_when_publisher_closes),
        case!(cancelled_subscription_receives_nothing_more),
        case!(new_subscriber_sees_old_messages, needs_history),
        case!(latest_start_skips_old_messages, needs_history),
        case!(every_group_gets_every_message),
        case!(members_of_a_group_split_messages),
        case!(nack_delay_is_honoured),
        case!(abandoned_delivery_returns_after_lease, needs_lease),
        case!(batch_settle_answers_per_item),
        case!(batch_settles_around_a_lost_lease, needs_lease_checked),
        case!(backlog_counts_what_waits),
        case!(pattern_subscription_sees_new_topics, needs_wildcards),
        case!(
            carries_on_after_its_server_state_is_lost,
            needs_server_state
        ),
        case!(reconnect_after_server_restart, needs_restart),
        case!(
            carries_on_after_the_server_restarts_empty,
            needs_restart_empty
        ),
    ]
}

/// At-most-once backends (Redis pub/sub, NATS core) lose what a consumer
/// held when it goes away; that is their declared contract.
pub fn needs_at_least_once(caps: &Capabilities, _: &dyn Target) -> Option<&'static str> {
    (!caps.at_least_once).then_some("at-most-once by design")
}

pub fn needs_order(caps: &Capabilities, _: &dyn Target) -> Option<&'static str> {
    (!caps.ordered_per_key).then_some("no ordering per key")
}

fn needs_key_affinity(caps: &Capabilities, _: &dyn Target) -> Option<&'static str> {
    (!caps.key_affinity).then_some("no key affinity across consumers")
}

pub fn needs_history(caps: &Capabilities, _: &dyn Target) -> Option<&'static str> {
    (!caps.history).then_some("keeps no history")
}

fn needs_lease(caps: &Capabilities, _: &dyn Target) -> Option<&'static str> {
    (!caps.lease).then_some("in-process, no lease")
}

fn needs_lease_checked(caps: &Capabilities, _: &dyn Target) -> Option<&'static str> {
    (!caps.lease_checked).then_some("a stale settlement is not detected")
}

fn needs_wildcards(caps: &Capabilities, _: &dyn Target) -> Option<&'static str> {
    (!caps.wildcards).then_some("no wildcards")
}

fn needs_restart(_: &Capabilities, target: &dyn Target) -> Option<&'static str> {
    (!target.can_restart()).then_some("no server it can restart")
}

fn needs_restart_empty(_: &Capabilities, target: &dyn Target) -> Option<&'static str> {
    (!target.can_restart_empty()).then_some("no server it can restart empty")
}

fn needs_server_state(_: &Capabilities, target: &dyn Target) -> Option<&'static str> {
    target
        .restores_within()
        .is_none()
        .then_some("makes nothing on a server for a group")
}

async fn publish_subscribe_keeps_payload_key_and_headers(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    let sent: Vec<Message> = (0..50)
        .map(|i| {
            Message::new(&topic, vec![i as u8; 10 + i])
                .with_key(format!("k{}", i % 3))
                .with_header("n", i.to_string())
                .with_header("n", "repeated")
                .with_header("unicode", "zoë ✓")
        })
        .collect();
    ctx.backend.publish(sent.clone()).await?;
    let got = consume(sub.as_ref(), 50, LIMIT).await?;
    for original in &sent {
        let received = got
            .iter()
            .find(|m| m.id == original.id)
            .with_context(|| format!("message {} missing", original.id))?;
        ensure!(received.payload == original.payload, "payload changed");
        ensure!(received.key == original.key, "key changed");
        ensure!(
            received.headers == original.headers,
            "headers changed: {:?}",
            received.headers
        );
        ensure!(received.topic == original.topic, "topic changed");
        ensure!(
            received.timestamp_ms == original.timestamp_ms,
            "timestamp changed"
        );
    }
    Ok(())
}

async fn concurrent_publishers_and_subscribers_lose_nothing(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        subscribers.push(ctx.subscribe([topic.clone()], "g").await?);
    }
    let per_publisher = ctx.volume(100);
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let backend = ctx.target.open().await?;
        let topic = topic.clone();
        publishers.push(tokio::spawn(async move {
            for chunk in numbered(&topic, per_publisher).chunks(10) {
                backend.publish(chunk.to_vec()).await?;
            }
            anyhow::Ok(())
        }));
    }
    // The subscribers consume while the publishers publish, until they have
    // seen everything between them or the time is up.
    let expected = 4 * per_publisher;
    let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let give_up = tokio::time::Instant::now() + LIMIT;
    let consumers: Vec<_> = subscribers
        .into_iter()
        .map(|sub| {
            let seen = seen.clone();
            tokio::spawn(async move {
                while seen.lock().unwrap().len() < expected && tokio::time::Instant::now() < give_up
                {
                    for d in sub.fetch(20, Duration::from_millis(200)).await? {
                        sub.ack(&d).await?;
                        seen.lock().unwrap().insert(d.message.id.clone());
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await??;
    }
    for consumer in consumers {
        consumer.await??;
    }
    let consumed = seen.lock().unwrap().len();
    ensure!(
        consumed == expected,
        "{consumed} of {expected} distinct messages consumed within {LIMIT:?}"
    );
    Ok(())
}

async fn many_topics_at_once(ctx: Ctx) -> Result<()> {
    let topics: Vec<String> = (0..20).map(|i| ctx.topic(&format!("t{i}"))).collect();
    // Subscribed together: one after another, twenty group joins would make
    // the case a measure of how long a join takes on a loaded machine.
    let joining = futures::future::try_join_all(
        topics
            .iter()
            .map(|topic| ctx.subscribe([topic.clone()], "g")),
    );
    let subs = tokio::time::timeout(LIMIT, joining)
        .await
        .map_err(|_| anyhow!("subscribing to {} topics took over {LIMIT:?}", topics.len()))??;
    let all: Vec<Message> = topics.iter().flat_map(|t| numbered(t, 10)).collect();
    ctx.backend.publish(all).await?;
    for (topic, sub) in topics.iter().zip(&subs) {
        let got = consume(sub.as_ref(), 10, LIMIT)
            .await
            .with_context(|| format!("consuming {topic}"))?;
        ensure!(
            got.iter().all(|m| &m.topic == topic),
            "a message of another topic arrived on {topic}"
        );
        expect_nothing(sub.as_ref(), Duration::from_millis(50)).await?;
    }
    Ok(())
}

async fn topics_are_isolated(ctx: Ctx) -> Result<()> {
    let (a, b) = (ctx.topic("a"), ctx.topic("b"));
    let sub_a = ctx.subscribe([a.clone()], "g").await?;
    ctx.backend.publish(numbered(&b, 5)).await?;
    ctx.backend.publish(numbered(&a, 3)).await?;
    let got = consume(sub_a.as_ref(), 3, LIMIT).await?;
    ensure!(got.iter().all(|m| m.topic == a), "saw another topic");
    expect_nothing(sub_a.as_ref(), QUIET).await
}

async fn redelivery_after_nack(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 1)).await?;
    let first = sub.fetch(1, LIMIT).await?.pop().context("no delivery")?;
    ensure!(first.attempt == 1, "first attempt is {}", first.attempt);
    sub.nack(&first, Duration::ZERO).await?;
    let again = sub
        .fetch(1, LIMIT)
        .await?
        .pop()
        .context("not redelivered")?;
    ensure!(
        again.message.id == first.message.id,
        "a different message came back"
    );
    ensure!(
        again.attempt == 2,
        "attempt is {} after one nack",
        again.attempt
    );
    sub.ack(&again).await?;
    expect_nothing(sub.as_ref(), QUIET).await
}

/// In an ordered group, a nack holds its key: the message comes back before
/// the later ones of its key.
async fn nacked_message_returns_before_later_ones(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let ordered = |options: &mut sluice::backend::SubscribeOptions| options.ordered = true;
    let sub = ctx.subscribe_with([topic.clone()], "g", ordered).await?;
    let messages = numbered(&topic, 5)
        .into_iter()
        .map(|m| m.with_key("k"))
        .collect();
    ctx.backend.publish(messages).await?;
    let first = sub.fetch(1, LIMIT).await?.pop().context("no delivery")?;
    ensure!(
        payload(&first) == "0",
        "first delivery is {}",
        payload(&first)
    );
    sub.nack(&first, Duration::ZERO).await?;
    let mut order = Vec::new();
    while order.len() < 5 {
        let batch = sub.fetch(1, LIMIT).await?;
        ensure!(!batch.is_empty(), "stalled after {order:?}");
        for d in batch {
            order.push(payload(&d));
            sub.ack(&d).await?;
        }
    }
    ensure!(
        order == ["0", "1", "2", "3", "4"],
        "order after a nack: {order:?}"
    );
    Ok(())
}

/// What `ordered_per_key` promises: an ordered group gets each key's
/// messages in publish order.
async fn order_preserved_per_key(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let ordered = |options: &mut sluice::backend::SubscribeOptions| options.ordered = true;
    let sub = ctx.subscribe_with([topic.clone()], "g", ordered).await?;
    let messages: Vec<Message> = (0..100)
        .map(|i| {
            Message::new(&topic, format!("{i}")).with_key(if i % 2 == 0 { "even" } else { "odd" })
        })
        .collect();
    for chunk in messages.chunks(7) {
        ctx.backend.publish(chunk.to_vec()).await?;
    }
    let got = consume(sub.as_ref(), 100, LIMIT).await?;
    for key in ["even", "odd"] {
        let seen: Vec<u32> = got
            .iter()
            .filter(|m| m.key.as_deref() == Some(key))
            .map(|m| String::from_utf8_lossy(&m.payload).parse().unwrap())
            .collect();
        ensure!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {seen:?}"
        );
    }
    Ok(())
}

/// Two ordered consumers of one group: each key's oldest unsettled message
/// is the only one of its key either can get, whoever holds it and whether
/// it is claimed, nacked or acked; unkeyed messages wait for nothing.
async fn a_key_waits_for_its_previous_delivery_across_consumers(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let ordered = |options: &mut sluice::backend::SubscribeOptions| options.ordered = true;
    let first = ctx.subscribe_with([topic.clone()], "g", ordered).await?;
    let second = ctx.subscribe_with([topic.clone()], "g", ordered).await?;
    let keyed = |text: &str, key: &str| Message::new(&topic, text.to_string()).with_key(key);
    ctx.backend
        .publish(vec![
            keyed("a1", "a"),
            keyed("b1", "b"),
            keyed("a2", "a"),
            Message::new(&topic, "free"),
            keyed("b2", "b"),
            keyed("a3", "a"),
        ])
        .await?;

    // Until something is settled: the head of each key, and the unkeyed
    // (in any order: the keys may be in different partitions). Either
    // consumer may get them (a backend may divide the keys among its
    // members, as Kafka its partitions and JetStream its key shards).
    let consumers = [second.as_ref(), first.as_ref()];
    let held = take_from_either(&consumers).await?;
    ensure!(
        sorted_of(&held) == ["a1", "b1", "free"],
        "the consumers got {:?}",
        payloads_of(&held)
    );

    // A nacked message holds its key: it alone of its key comes back. An
    // acked one lets its key's next go. Either consumer may get them (a
    // backend may keep a key's next message with the member that read it
    // ahead), but nothing else comes, and each comes once.
    for (at, delivery) in &held {
        match payload(delivery).as_str() {
            "a1" => consumers[*at].nack(delivery, Duration::ZERO).await?,
            _ => consumers[*at].ack(delivery).await?,
        }
    }
    let got = take_from_either(&consumers).await?;
    ensure!(
        sorted_of(&got) == ["a1", "b2"],
        "after a nack and an ack, the consumers got {:?}",
        payloads_of(&got)
    );
    for (at, delivery) in &got {
        consumers[*at].ack(delivery).await?;
    }
    // Acked through a batch settlement this time: that path frees the key
    // as a single ack does.
    for expected in ["a2", "a3"] {
        let got = take_from_either(&consumers).await?;
        ensure!(
            payloads_of(&got) == [expected],
            "expected only {expected}, got {:?}",
            payloads_of(&got)
        );
        let (at, delivery) = &got[0];
        for result in consumers[*at]
            .settle(vec![(delivery, Settlement::Ack)])
            .await
        {
            result?;
        }
    }
    Ok(())
}

/// Everything either of `consumers` is handed until both have been quiet
/// for a moment, unsettled, with the index of the consumer that got it.
async fn take_from_either(consumers: &[&dyn Subscription]) -> Result<Vec<(usize, Delivery)>> {
    let mut got = Vec::new();
    loop {
        let before = got.len();
        for (at, consumer) in consumers.iter().enumerate() {
            got.extend(
                take_until_quiet(*consumer)
                    .await?
                    .into_iter()
                    .map(|d| (at, d)),
            );
        }
        if got.len() == before {
            return Ok(got);
        }
    }
}

fn payloads_of(got: &[(usize, Delivery)]) -> Vec<String> {
    got.iter().map(|(_, d)| payload(d)).collect()
}

fn sorted_of(got: &[(usize, Delivery)]) -> Vec<String> {
    let mut payloads = payloads_of(got);
    payloads.sort();
    payloads
}

/// Everything `sub` is handed until it has been quiet for a moment,
/// unsettled, in the order handed.
async fn take_until_quiet(sub: &dyn Subscription) -> Result<Vec<Delivery>> {
    let mut held = Vec::new();
    loop {
        let batch = sub.fetch(10, QUIET).await?;
        if batch.is_empty() {
            return Ok(held);
        }
        held.extend(batch);
    }
}

async fn continue_after_subscriber_closes(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let first = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 50)).await?;
    let mut acked = HashSet::new();
    let batch = first.fetch(10, LIMIT).await?;
    ensure!(!batch.is_empty(), "nothing delivered");
    for d in batch.iter().take(5) {
        first.ack(d).await?;
        acked.insert(d.message.id.clone());
    }
    first.close().await?;
    let second = ctx.subscribe([topic.clone()], "g").await?;
    let rest = consume(second.as_ref(), 50 - acked.len(), LIMIT).await?;
    let rest_ids = distinct_ids(&rest);
    ensure!(
        rest_ids.is_disjoint(&acked),
        "an acknowledged message came back"
    );
    ensure!(rest_ids.len() + acked.len() == 50, "lost messages");
    Ok(())
}

async fn concurrent_close(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let mut subs = Vec::new();
    for _ in 0..10 {
        subs.push(ctx.subscribe([topic.clone()], "g").await?);
    }
    ctx.backend.publish(numbered(&topic, 30)).await?;
    // Some of them hold deliveries when they close.
    for sub in subs.iter().take(3) {
        let _held = sub.fetch(3, Duration::from_millis(500)).await?;
    }
    let closes = subs
        .into_iter()
        .map(|sub| tokio::spawn(async move { sub.close().await }));
    let closed = tokio::time::timeout(LIMIT, futures::future::join_all(closes))
        .await
        .context("closing hung")?;
    for result in closed {
        result??;
    }
    let after = ctx.subscribe([topic.clone()], "g").await?;
    let got = consume(after.as_ref(), 30, LIMIT).await?;
    ensure!(distinct_ids(&got).len() == 30, "lost messages");
    Ok(())
}

async fn continue_after_repeated_errors(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 3)).await?;
    let mut failures = 0;
    let mut done = HashSet::new();
    while done.len() < 3 {
        let batch = sub.fetch(3, LIMIT).await?;
        ensure!(!batch.is_empty(), "stalled");
        for d in batch {
            if payload(&d) == "1" && failures < 3 {
                failures += 1;
                sub.nack(&d, Duration::ZERO).await?;
            } else {
                if payload(&d) == "1" {
                    ensure!(d.attempt == 4, "attempt {} after three nacks", d.attempt);
                }
                sub.ack(&d).await?;
                done.insert(payload(&d));
            }
        }
    }
    expect_nothing(sub.as_ref(), QUIET).await
}

async fn nothing_lost_when_publisher_closes(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    {
        let publisher = ctx.target.open().await?;
        publisher.publish(numbered(&topic, 100)).await?;
        // Dropped right after publishing returns.
    }
    let got = consume(sub.as_ref(), 100, LIMIT).await?;
    ensure!(distinct_ids(&got).len() == 100, "lost messages");
    Ok(())
}

async fn cancelled_subscription_receives_nothing_more(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    let other = ctx.subscribe([topic.clone()], "g").await?;
    sub.close().await?;
    ctx.backend.publish(numbered(&topic, 10)).await?;
    let after_close = sub.fetch(10, QUIET).await;
    if let Ok(deliveries) = &after_close {
        ensure!(
            deliveries.is_empty(),
            "a closed subscription still receives"
        );
    }
    let got = consume(other.as_ref(), 10, LIMIT).await?;
    ensure!(
        distinct_ids(&got).len() == 10,
        "the group's other member lost messages"
    );
    Ok(())
}

async fn new_subscriber_sees_old_messages(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    ctx.backend.publish(numbered(&topic, 10)).await?;
    let sub = ctx.subscribe([topic.clone()], "late").await?;
    consume(sub.as_ref(), 10, LIMIT).await?;
    Ok(())
}

async fn latest_start_skips_old_messages(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    ctx.backend.publish(numbered(&topic, 10)).await?;
    let sub = ctx
        .subscribe_with([topic.clone()], "latest", |o| o.start = StartFrom::Latest)
        .await?;
    ctx.backend
        .publish(vec![Message::new(&topic, "new")])
        .await?;
    let got = consume(sub.as_ref(), 1, LIMIT).await?;
    ensure!(got[0].payload == b"new", "got an old message");
    expect_nothing(sub.as_ref(), QUIET).await
}

async fn every_group_gets_every_message(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let a = ctx.subscribe([topic.clone()], "a").await?;
    let b = ctx.subscribe([topic.clone()], "b").await?;
    ctx.backend.publish(numbered(&topic, 30)).await?;
    for sub in [&a, &b] {
        let got = consume(sub.as_ref(), 30, LIMIT).await?;
        ensure!(distinct_ids(&got).len() == 30, "a group missed messages");
        expect_nothing(sub.as_ref(), Duration::from_millis(100)).await?;
    }
    Ok(())
}

async fn members_of_a_group_split_messages(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let one = ctx.subscribe([topic.clone()], "g").await?;
    let two = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 60)).await?;
    let mut seen = HashSet::new();
    let mut counts = [0usize; 2];
    let give_up = tokio::time::Instant::now() + LIMIT;
    while seen.len() < 60 {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "stalled at {}",
            seen.len()
        );
        for (i, sub) in [&one, &two].into_iter().enumerate() {
            for d in sub.fetch(3, Duration::from_millis(100)).await? {
                ensure!(
                    seen.insert(d.message.id.clone()),
                    "a message reached both members"
                );
                counts[i] += 1;
                sub.ack(&d).await?;
            }
        }
    }
    ensure!(
        counts[0] > 0 && counts[1] > 0,
        "one member got everything: {counts:?}"
    );
    Ok(())
}

async fn nack_delay_is_honoured(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 1)).await?;
    let first = sub.fetch(1, LIMIT).await?.pop().context("no delivery")?;
    let nacked_at = tokio::time::Instant::now();
    sub.nack(&first, Duration::from_millis(700)).await?;
    let early = sub.fetch(1, Duration::from_millis(100)).await?;
    if !early.is_empty() {
        ensure!(
            nacked_at.elapsed() >= Duration::from_millis(700),
            "redelivered after {:?}, before its 700 ms delay",
            nacked_at.elapsed()
        );
    }
    let again = match early.into_iter().next() {
        Some(d) => d,
        None => sub
            .fetch(1, LIMIT)
            .await?
            .pop()
            .context("never redelivered")?,
    };
    ensure!(
        again.message.id == first.message.id && again.attempt == 2,
        "wrong redelivery"
    );
    sub.ack(&again).await?;
    Ok(())
}

async fn abandoned_delivery_returns_after_lease(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let lease = |o: &mut sluice::backend::SubscribeOptions| o.lease = Duration::from_millis(500);
    let doomed = ctx.subscribe_with([topic.clone()], "g", lease).await?;
    ctx.backend.publish(numbered(&topic, 5)).await?;
    let held = fetch_exactly(doomed.as_ref(), 5).await?;
    // The consumer dies: never settles, never closes.
    std::mem::forget(held);
    std::mem::forget(doomed);
    let survivor = ctx.subscribe_with([topic.clone()], "g", lease).await?;
    let mut attempts = Vec::new();
    let give_up = tokio::time::Instant::now() + LIMIT;
    while attempts.len() < 5 {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "only {} came back",
            attempts.len()
        );
        for d in survivor.fetch(5, Duration::from_millis(200)).await? {
            attempts.push(d.attempt);
            survivor.ack(&d).await?;
        }
    }
    ensure!(
        attempts.iter().all(|a| *a == 2),
        "attempts after a lost lease: {attempts:?}"
    );
    Ok(())
}

async fn pattern_subscription_sees_new_topics(ctx: Ctx) -> Result<()> {
    let pattern = format!("{}.orders.*", ctx.topic("w"));
    let sub = ctx.subscribe([pattern], "g").await?;
    let fresh = format!("{}.orders.brand-new", ctx.topic("w"));
    let deeper = format!("{}.orders.eu.paid", ctx.topic("w"));
    ctx.backend
        .publish(vec![Message::new(&fresh, "1"), Message::new(&deeper, "2")])
        .await?;
    let got = consume(sub.as_ref(), 1, LIMIT).await?;
    ensure!(got[0].topic == fresh, "got {}", got[0].topic);
    expect_nothing(sub.as_ref(), QUIET).await
}

/// At-least-once backends lose nothing across a server restart; at-most-once
/// ones (which may drop what is published while they reconnect) must at
/// least reconnect: a message published afterwards arrives.
async fn reconnect_after_server_restart(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 10)).await?;
    ctx.target.restart().await?;
    let give_up = tokio::time::Instant::now() + LIMIT;
    if !ctx.backend.capabilities().at_least_once {
        loop {
            ensure!(
                tokio::time::Instant::now() < give_up,
                "nothing published after the restart arrived"
            );
            let probe = Message::new(&topic, "after the restart");
            if let Err(e) = ctx.backend.publish(vec![probe.clone()]).await {
                tracing::debug!("publish after restart: {e:#}");
            }
            let batch = sub
                .fetch(100, Duration::from_millis(500))
                .await
                .unwrap_or_default();
            if batch.iter().any(|d| d.message.id == probe.id) {
                return Ok(());
            }
        }
    }
    let more = numbered(&topic, 10);
    loop {
        match ctx.backend.publish(more.clone()).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < give_up => {
                tracing::debug!("publish after restart: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("publishing never recovered")),
        }
    }
    let mut ids = HashSet::new();
    while ids.len() < 20 {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "{} of 20 after the restart",
            ids.len()
        );
        match sub.fetch(20, Duration::from_millis(200)).await {
            Ok(batch) => {
                for d in batch {
                    ids.insert(d.message.id.clone());
                    let _ = sub.ack(&d).await;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Ok(())
}

/// Fetches until exactly `n` deliveries arrived (fails after [`LIMIT`]).
async fn fetch_exactly(sub: &dyn Subscription, n: usize) -> Result<Vec<Delivery>> {
    let give_up = tokio::time::Instant::now() + LIMIT;
    let mut held = Vec::new();
    while held.len() < n {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "fetched {} of {n}",
            held.len()
        );
        held.extend(
            sub.fetch(n - held.len(), Duration::from_millis(200))
                .await?,
        );
    }
    ensure!(held.len() == n, "fetched {} for {n}", held.len());
    Ok(held)
}

/// The backlog a backend reports for a group is what was published and
/// not yet delivered to it: N after N are published, N - k once k of them
/// were fetched (N still, until they are acknowledged, where the figure
/// runs from a committed position), N - k once they were acknowledged.
/// Some backends' figures lag (SQS's are
/// estimates that settle later, Kafka's follow the periodic commit), so
/// each figure is awaited; the value, not the time, is checked. A backend
/// without a figure answers `None`, and only those the target names may.
async fn backlog_counts_what_waits(ctx: Ctx) -> Result<()> {
    let declared = ctx.backend.capabilities().backlog;
    ensure!(
        declared == ctx.target.reports_backlog(),
        "the backend declares backlog = {declared}, this target expects {}",
        ctx.target.reports_backlog()
    );
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    let key =
        sluice::backend::SubscribeOptions::new(vec![topic.clone()], ctx.group("g")).group_key();
    let (n, k) = (10, 4);
    ctx.backend.publish(numbered(&topic, n)).await?;
    if !declared {
        let answer = ctx.backend.backlog(&key).await?;
        ensure!(
            answer.is_none(),
            "no figure declared, yet it answers {answer:?}"
        );
        return Ok(());
    }
    await_backlog(&ctx, &key, n as u64).await?;
    let give_up = tokio::time::Instant::now() + LIMIT;
    let mut taken = Vec::new();
    while taken.len() < k {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "fetched {} of {k} within {LIMIT:?}",
            taken.len()
        );
        // Never more than k in all, so no more than k leave the backlog.
        taken.extend(
            sub.fetch(k - taken.len(), Duration::from_millis(200))
                .await?,
        );
    }
    let held = if ctx.target.backlog_counts_held() {
        n
    } else {
        n - k
    };
    await_backlog(&ctx, &key, held as u64).await?;
    for delivery in &taken {
        sub.ack(delivery).await.context("ack")?;
    }
    await_backlog(&ctx, &key, (n - k) as u64).await?;
    sub.close().await?;
    Ok(())
}

/// Waits until the backend reports `want` messages waiting for the group.
async fn await_backlog(ctx: &Ctx, group_key: &str, want: u64) -> Result<()> {
    let give_up = tokio::time::Instant::now() + LIMIT;
    loop {
        let now = ctx.backend.backlog(group_key).await?;
        if now == Some(want) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < give_up,
            "the backlog is {now:?} after {LIMIT:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One `settle` call with acks and nacks mixed: each item takes effect on
/// its own, the acked never come back, the nacked do, once each.
async fn batch_settle_answers_per_item(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 6)).await?;
    let held = fetch_exactly(sub.as_ref(), 6).await?;
    let nacked: HashSet<String> = held.iter().skip(1).step_by(2).map(payload).collect();
    let batch = held
        .iter()
        .map(|d| match nacked.contains(&payload(d)) {
            true => (d, Settlement::Nack(Duration::ZERO)),
            false => (d, Settlement::Ack),
        })
        .collect();
    let results = sub.settle(batch).await;
    ensure!(results.len() == 6, "{} answers for 6 items", results.len());
    for result in results {
        result.context("settling a fresh delivery")?;
    }
    let again = fetch_exactly(sub.as_ref(), nacked.len()).await?;
    let returned: HashSet<String> = again.iter().map(payload).collect();
    ensure!(
        returned == nacked,
        "nacked {nacked:?}, came back {returned:?}"
    );
    ensure!(
        again.iter().all(|d| d.attempt == 2),
        "attempts after one nack: {:?}",
        again.iter().map(|d| d.attempt).collect::<Vec<_>>()
    );
    let batch = again.iter().map(|d| (d, Settlement::Ack)).collect();
    for result in sub.settle(batch).await {
        result.context("acking the redeliveries")?;
    }
    expect_nothing(sub.as_ref(), QUIET).await
}

/// A batch in which one delivery's lease ran out and another consumer took
/// it: the others settle (ack, nack, and on a transactional subscription
/// publish-and-ack), the stale one answers `LeaseLost` and changes nothing:
/// its outputs are not published and the message stays the other
/// consumer's.
async fn batch_settles_around_a_lost_lease(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let out = ctx.topic("out");
    let reader = ctx.subscribe([out.clone()], "reader").await?;
    // Members of a group share a lease, as routes of one config do (on some
    // backends the lease is how long a member waits before taking over).
    let lease = |o: &mut sluice::backend::SubscribeOptions| o.lease = Duration::from_secs(1);
    let slow = ctx.subscribe_with([topic.clone()], "g", lease).await?;
    let other = ctx.subscribe_with([topic.clone()], "g", lease).await?;
    ctx.backend.publish(numbered(&topic, 1)).await?;
    let stale = fetch_exactly(slow.as_ref(), 1).await?.remove(0);
    // `slow` sits on it past its lease, until `other` has it; the rest
    // happens well within `other`'s lease.
    let taken = fetch_exactly(other.as_ref(), 1).await?.remove(0);
    ensure!(taken.message.id == stale.message.id, "another message came");
    ctx.backend.publish(numbered(&topic, 3)).await?;
    let fresh = fetch_exactly(slow.as_ref(), 3).await?;
    let transactional = slow.transactional();
    let handled = |from: &str| match transactional {
        true => Settlement::PublishAndAck(vec![Message::new(out.clone(), from.to_string())]),
        false => Settlement::Ack,
    };
    let results = slow
        .settle(vec![
            (&fresh[0], handled("fresh")),
            (&stale, handled("stale")),
            (&fresh[1], Settlement::Ack),
            (&fresh[2], Settlement::Nack(Duration::ZERO)),
        ])
        .await;
    ensure!(results.len() == 4, "{} answers for 4 items", results.len());
    for i in [0, 2, 3] {
        results[i].as_ref().map_err(|e| anyhow!("item {i}: {e}"))?;
    }
    ensure!(
        matches!(results[1], Err(SettleError::LeaseLost)),
        "the stale settlement answered {:?}",
        results[1]
    );
    if transactional {
        // Only the current claim's output was published.
        let outputs = fetch_exactly(reader.as_ref(), 1).await?;
        ensure!(
            payload(&outputs[0]) == "fresh",
            "output {}",
            payload(&outputs[0])
        );
        reader.ack(&outputs[0]).await?;
    }
    expect_nothing(reader.as_ref(), QUIET).await?;
    // The nacked one comes back once, as its second attempt.
    let back = fetch_exactly(slow.as_ref(), 1).await?.remove(0);
    ensure!(
        back.message.id == fresh[2].message.id && back.attempt == 2,
        "came back: {} (attempt {})",
        payload(&back),
        back.attempt
    );
    slow.ack(&back).await?;
    // The stale settlement changed nothing: the holder's nack brings it back.
    other.nack(&taken, Duration::ZERO).await?;
    let again = fetch_exactly(other.as_ref(), 1).await?.remove(0);
    ensure!(
        again.message.id == stale.message.id,
        "another message came back"
    );
    other.ack(&again).await?;
    expect_nothing(other.as_ref(), QUIET).await?;
    expect_nothing(slow.as_ref(), QUIET).await
}

/// What the backend made on the server for a group (its consumer, consumer
/// group or queue) is deleted under a running subscription: the
/// subscription makes it again and carries on, within the bound the target
/// states. On a backend with history every message published after the
/// loss arrives (some earlier ones may come again); on one without (SQS), a
/// group gets what is published once its queue exists again, so the case
/// publishes until a message gets through.
async fn carries_on_after_its_server_state_is_lost(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 5)).await?;
    consume(sub.as_ref(), 5, LIMIT).await?;
    ctx.target.lose_state(&topic, &ctx.group("g")).await?;
    let bound = ctx.target.restores_within().expect("the case applies");
    if ctx.backend.capabilities().history {
        let later = numbered(&topic, 5);
        ctx.backend.publish(later.clone()).await?;
        return receive_despite_errors(sub.as_ref(), &later, bound)
            .await
            .context("after the group's server-side state was deleted");
    }
    let give_up = tokio::time::Instant::now() + bound;
    let mut last_error = None;
    loop {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "nothing published after the group's server-side state was deleted arrived \
             within {bound:?} (last error: {})",
            last_error.as_deref().unwrap_or("none")
        );
        let probe = Message::new(&topic, "after the loss");
        if let Err(e) = ctx.backend.publish(vec![probe.clone()]).await {
            last_error = Some(format!("publish: {e:#}"));
        }
        match sub.fetch(100, Duration::from_millis(500)).await {
            Ok(batch) => {
                for delivery in &batch {
                    let _ = sub.ack(delivery).await;
                }
                if batch.iter().any(|d| d.message.payload == probe.payload) {
                    return Ok(());
                }
            }
            Err(e) => last_error = Some(format!("fetch: {e:#}")),
        }
    }
}

/// The server restarts with none of its stored state: subscriptions and
/// publishers carry on once it is back, making again what they need.
async fn carries_on_after_the_server_restarts_empty(ctx: Ctx) -> Result<()> {
    let topic = ctx.topic("t");
    let sub = ctx.subscribe([topic.clone()], "g").await?;
    ctx.backend.publish(numbered(&topic, 5)).await?;
    consume(sub.as_ref(), 5, LIMIT).await?;
    ctx.target.restart_empty().await?;
    let give_up = tokio::time::Instant::now() + LIMIT;
    let later = numbered(&topic, 5);
    loop {
        match ctx.backend.publish(later.clone()).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() < give_up => {
                tracing::debug!("publish after an empty restart: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("publish after the server restarted empty")),
        }
    }
    receive_despite_errors(sub.as_ref(), &later, LIMIT)
        .await
        .context("after the server restarted empty")
}

/// Fetches and acks until every one of `wanted` arrived, letting fetches
/// fail meanwhile (the server, or what it keeps, is coming back).
async fn receive_despite_errors(
    sub: &dyn Subscription,
    wanted: &[Message],
    limit: Duration,
) -> Result<()> {
    let give_up = tokio::time::Instant::now() + limit;
    let mut missing: HashSet<&str> = wanted.iter().map(|m| m.id.as_str()).collect();
    let mut last_error = None;
    while !missing.is_empty() {
        ensure!(
            tokio::time::Instant::now() < give_up,
            "{} of {} messages did not arrive within {limit:?} (last fetch error: {})",
            missing.len(),
            wanted.len(),
            last_error.as_deref().unwrap_or("none")
        );
        match sub.fetch(100, Duration::from_millis(200)).await {
            Ok(batch) => {
                for delivery in batch {
                    missing.remove(delivery.message.id.as_str());
                    // A failed ack only brings the message back.
                    if let Err(e) = sub.ack(&delivery).await {
                        last_error = Some(format!("ack: {e:#}"));
                    }
                }
            }
            Err(e) => {
                last_error = Some(format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}
