//! Kafka-specific behaviour on a private tansu broker: what the
//! conformance suite cannot see from outside the backend.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use sluice::Message;
use sluice::backend::{
    self, Backend, Delivery, SettleError, Settlement, SubscribeOptions, Subscription,
};

use common::servers::Server;
use sluice_tests::common;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sluice=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn drain(sub: &dyn Subscription, want: usize) -> Result<Vec<u32>> {
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut attempts = Vec::new();
    while attempts.len() < want {
        ensure!(Instant::now() < give_up, "got {} of {want}", attempts.len());
        for d in sub.fetch(100, Duration::from_millis(200)).await? {
            attempts.push(d.attempt);
            sub.ack(&d).await?;
        }
    }
    Ok(attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_survive_a_handover_to_another_member() -> Result<()> {
    init_tracing();
    let tansu = Server::tansu();
    let backend =
        backend::connect(&tansu.kafka_url("?partitions=2&session_timeout_ms=2000")).await?;
    let started = Instant::now();
    let first = backend
        .subscribe(SubscribeOptions::new(vec!["handover".into()], "g"))
        .await?;
    tracing::info!("subscribed in {:?}", started.elapsed());
    let messages: Vec<Message> = (0..6)
        .map(|i| Message::new("handover", format!("{i}")))
        .collect();
    backend.publish(messages).await?;
    tracing::info!("published at {:?}", started.elapsed());
    let mut held = Vec::new();
    while held.len() < 6 {
        held.extend(first.fetch(6, Duration::from_secs(10)).await?);
    }
    tracing::info!("fetched at {:?}", started.elapsed());
    // Two are nacked once more, one is settled; then the member leaves.
    for d in &held[..2] {
        first.nack(d, Duration::ZERO).await?;
    }
    let again = first.fetch(2, Duration::from_secs(10)).await?;
    ensure!(again.iter().all(|d| d.attempt == 2), "second attempts");
    first.ack(&held[5]).await?;
    first.close().await?;
    tracing::info!("closed at {:?}", started.elapsed());

    let second = backend
        .subscribe(SubscribeOptions::new(vec!["handover".into()], "g"))
        .await?;
    let mut attempts = drain(second.as_ref(), 5).await?;
    attempts.sort();
    // Settled before the close: never again. Nacked ones: third attempts.
    ensure!(
        attempts == [2, 2, 2, 3, 3],
        "attempts after the handover: {attempts:?}"
    );
    let extra = second.fetch(10, Duration::from_millis(500)).await?;
    ensure!(extra.is_empty(), "a settled message came back");
    second.close().await.context("close")?;
    tracing::info!("done at {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_start_is_fixed_when_the_group_is_born() -> Result<()> {
    init_tracing();
    let tansu = Server::tansu();
    let backend = backend::connect(&tansu.kafka_url("?session_timeout_ms=2000")).await?;
    let old: Vec<Message> = (0..10)
        .map(|i| Message::new("late", format!("{i}")))
        .collect();
    backend.publish(old).await?;
    let mut options = SubscribeOptions::new(vec!["late".into()], "latest");
    options.start = sluice::backend::StartFrom::Latest;
    let sub = backend.subscribe(options.clone()).await?;
    backend.publish(vec![Message::new("late", "new")]).await?;
    let got = sub.fetch(10, Duration::from_secs(10)).await?;
    let payloads: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
        .collect();
    ensure!(payloads == ["new"], "a latest group got {payloads:?}");
    // Unsettled when the member leaves: the next one starts there, not at
    // the end again.
    sub.close().await?;
    backend.publish(vec![Message::new("late", "newer")]).await?;
    let again = backend.subscribe(options).await?;
    let mut seen = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 && Instant::now() < give_up {
        for d in again.fetch(10, Duration::from_millis(200)).await? {
            seen.push(String::from_utf8_lossy(&d.message.payload).into_owned());
            again.ack(&d).await?;
        }
    }
    // The two may sit in different partitions: no order between them.
    seen.sort();
    ensure!(seen == ["new", "newer"], "after a handover: {seen:?}");
    again.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_members_closing_at_once_hand_everything_back() -> Result<()> {
    init_tracing();
    let tansu = Server::tansu();
    let backend = backend::connect(&tansu.kafka_url("?session_timeout_ms=2000")).await?;
    let started = Instant::now();
    let mut subs = Vec::new();
    for _ in 0..6 {
        subs.push(
            backend
                .subscribe(SubscribeOptions::new(vec!["crowd".into()], "g"))
                .await?,
        );
    }
    tracing::info!("6 members joined in {:?}", started.elapsed());
    let messages: Vec<Message> = (0..30)
        .map(|i| Message::new("crowd", format!("{i}")))
        .collect();
    backend.publish(messages).await?;
    for sub in subs.iter().take(3) {
        let held = sub.fetch(3, Duration::from_millis(500)).await?;
        tracing::info!("held {}", held.len());
    }
    let closes = subs
        .into_iter()
        .map(|sub| tokio::spawn(async move { sub.close().await }));
    for closed in futures::future::join_all(closes).await {
        closed??;
    }
    tracing::info!("closed at {:?}", started.elapsed());
    let after = backend
        .subscribe(SubscribeOptions::new(vec!["crowd".into()], "g"))
        .await?;
    tracing::info!("joined again at {:?}", started.elapsed());
    let attempts = drain(after.as_ref(), 30).await?;
    tracing::info!("drained at {:?}", started.elapsed());
    ensure!(attempts.len() == 30, "{} deliveries", attempts.len());
    Ok(())
}

/// A member whose buffer fills stops taking records and carries on where
/// it stopped, usually inside a record batch: nothing of that batch may be
/// skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_skips_nothing() -> Result<()> {
    const TOTAL: u32 = 3_000;
    init_tracing();
    let tansu = Server::tansu();
    let backend = backend::connect(&tansu.kafka_url("?partitions=1&buffer=10")).await?;
    let sub = backend
        .subscribe(SubscribeOptions::new(vec!["slow".into()], "g"))
        .await?;
    // One publish: large record batches, more than the member takes from
    // librdkafka at once.
    let messages: Vec<Message> = (0..TOTAL)
        .map(|i| Message::new("slow", format!("{i}")))
        .collect();
    backend.publish(messages).await?;
    let mut seen = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    while seen.len() < TOTAL as usize && Instant::now() < give_up {
        for d in sub.fetch(100, Duration::from_millis(200)).await? {
            seen.push(String::from_utf8_lossy(&d.message.payload).parse::<u32>()?);
            sub.ack(&d).await?;
        }
    }
    let expected: Vec<u32> = (0..TOTAL).collect();
    ensure!(seen == expected, "{} of {TOTAL} in order", seen.len());
    sub.close().await?;
    Ok(())
}

/// An ordered member whose line is mostly messages waiting behind their
/// keys' earlier ones keeps taking records until what it could hand out
/// fills its buffer: every message comes, each key's in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_member_with_a_small_buffer_keeps_each_keys_order() -> Result<()> {
    const TOTAL: usize = 2_000;
    const KEYS: usize = 40;
    init_tracing();
    let tansu = Server::tansu();
    let backend = backend::connect(&tansu.kafka_url("?partitions=1&buffer=10")).await?;
    let mut options = SubscribeOptions::new(vec!["keyed".into()], "g");
    options.ordered = true;
    let sub = backend.subscribe(options).await?;
    let messages: Vec<Message> = (0..TOTAL)
        .map(|i| Message::new("keyed", format!("{i}")).with_key(format!("k{}", i % KEYS)))
        .collect();
    backend.publish(messages).await?;
    let mut seen: Vec<Vec<usize>> = vec![Vec::new(); KEYS];
    let mut count = 0;
    let give_up = Instant::now() + Duration::from_secs(60);
    while count < TOTAL && Instant::now() < give_up {
        let batch = sub.fetch(100, Duration::from_millis(200)).await?;
        for d in &batch {
            let n: usize = String::from_utf8_lossy(&d.message.payload).parse()?;
            seen[n % KEYS].push(n);
        }
        count += batch.len();
        let acks = batch.iter().map(|d| (d, Settlement::Ack)).collect();
        for result in sub.settle(acks).await {
            result?;
        }
    }
    ensure!(count == TOTAL, "{count} of {TOTAL} delivered");
    for (key, numbers) in seen.iter().enumerate() {
        let expected: Vec<usize> = (key..TOTAL).step_by(KEYS).collect();
        ensure!(*numbers == expected, "key k{key} out of order: {numbers:?}");
    }
    sub.close().await?;
    Ok(())
}

/// Fetches until `count` deliveries are in hand.
async fn fetch_all(sub: &dyn Subscription, count: usize) -> Result<Vec<Delivery>> {
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut held = Vec::new();
    while held.len() < count {
        ensure!(
            Instant::now() < give_up,
            "fetched {} of {count}",
            held.len()
        );
        held.extend(
            sub.fetch(count - held.len(), Duration::from_millis(200))
                .await?,
        );
    }
    Ok(held)
}

/// A new member of `options`' group, after everything was settled and the
/// last member left, gets a message published now and nothing older.
async fn only_new_messages_come(backend: &dyn Backend, options: SubscribeOptions) -> Result<()> {
    let sub = backend.subscribe(options.clone()).await?;
    backend
        .publish(vec![Message::new(&options.topics[0], "marker")])
        .await?;
    let mut seen = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut linger_until = None;
    while linger_until.is_none_or(|until| Instant::now() < until) {
        ensure!(Instant::now() < give_up, "no marker, got {seen:?}");
        for d in sub.fetch(100, Duration::from_millis(200)).await? {
            let payload = String::from_utf8_lossy(&d.message.payload).into_owned();
            if payload == "marker" {
                // Older offsets of other partitions may still be on their way.
                linger_until = Some(Instant::now() + Duration::from_secs(1));
            }
            seen.push(payload);
            sub.ack(&d).await?;
        }
    }
    ensure!(seen == ["marker"], "settled messages came back: {seen:?}");
    sub.close().await
}

fn all_ok(results: &[Result<(), SettleError>]) -> Result<()> {
    for (i, result) in results.iter().enumerate() {
        ensure!(result.is_ok(), "item {i}: {result:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settle_commits_every_delivery() -> Result<()> {
    const COUNT: usize = 600;
    init_tracing();
    let tansu = Server::tansu();
    let backend = backend::connect(&tansu.kafka_url("?session_timeout_ms=2000")).await?;
    let options = SubscribeOptions::new(vec!["batch".into()], "g");
    let sub = backend.subscribe(options.clone()).await?;
    let messages: Vec<Message> = (0..COUNT)
        .map(|i| Message::new("batch", format!("{i}")))
        .collect();
    backend.publish(messages).await?;
    let held = fetch_all(sub.as_ref(), COUNT).await?;
    let results = sub
        .settle(held.iter().map(|d| (d, Settlement::Ack)).collect())
        .await;
    ensure!(results.len() == COUNT, "{} answers", results.len());
    all_ok(&results)?;
    // The member commits as it leaves; the next one starts past them all.
    sub.close().await?;
    only_new_messages_come(backend.as_ref(), options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_settles_each_item_and_refuses_stale_ones() -> Result<()> {
    init_tracing();
    let tansu = Server::tansu();
    let backend = backend::connect(&tansu.kafka_url("?session_timeout_ms=2000")).await?;
    let options = |lease| {
        let mut options = SubscribeOptions::new(vec!["mixed".into()], "g");
        options.lease = lease;
        options
    };
    // Two subscriptions share the process's member; the first is taken for
    // dead once it stops fetching for its short lease.
    let short = backend.subscribe(options(Duration::from_secs(1))).await?;
    let long = backend.subscribe(options(Duration::from_secs(60))).await?;
    let messages: Vec<Message> = (0..10)
        .map(|i| Message::new("mixed", format!("{i}")))
        .collect();
    backend.publish(messages).await?;
    let held = fetch_all(short.as_ref(), 10).await?;
    // Even ones acked, odd ones nacked, one of them with a delay.
    let batch: Vec<(&Delivery, Settlement)> = held
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let settlement = match i {
                _ if i % 2 == 0 => Settlement::Ack,
                9 => Settlement::Nack(Duration::from_millis(300)),
                _ => Settlement::Nack(Duration::ZERO),
            };
            (d, settlement)
        })
        .collect();
    all_ok(&short.settle(batch).await)?;
    let mut nacked: Vec<String> = held
        .iter()
        .skip(1)
        .step_by(2)
        .map(|d| d.message.id.clone())
        .collect();
    nacked.sort();
    let again = fetch_all(short.as_ref(), 5).await?;
    let mut ids: Vec<String> = again.iter().map(|d| d.message.id.clone()).collect();
    ids.sort();
    ensure!(ids == nacked, "the nacked ones came back, and only they");
    ensure!(again.iter().all(|d| d.attempt == 2), "second attempts");

    // The short one stops fetching: past its lease, the long one gets them.
    let taken_over = fetch_all(long.as_ref(), 5).await?;
    ensure!(
        taken_over.iter().all(|d| d.attempt == 3),
        "third attempts after the takeover"
    );
    let stale = short
        .settle(again.iter().map(|d| (d, Settlement::Ack)).collect())
        .await;
    ensure!(
        stale
            .iter()
            .all(|r| matches!(r, Err(SettleError::LeaseLost))),
        "settling deliveries handed out again since: {stale:?}"
    );
    all_ok(
        &long
            .settle(taken_over.iter().map(|d| (d, Settlement::Ack)).collect())
            .await,
    )?;
    short.close().await?;
    long.close().await?;
    only_new_messages_come(backend.as_ref(), options(Duration::from_secs(30))).await
}

/// The probe of `check --connect` reads the cluster's metadata, and names
/// a broker that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_read_the_metadata_or_name_the_broker() -> Result<()> {
    let tansu = Server::tansu();
    let found = backend::probe(&tansu.kafka_url("")).await?;
    ensure!(found.contains("broker(s)"), "{found}");
    let err = backend::probe("kafka://127.0.0.1:1?timeout_ms=1000")
        .await
        .err()
        .context("a closed port answered")?;
    ensure!(
        format!("{err:#}").contains("no Kafka broker answered"),
        "{err:#}"
    );
    Ok(())
}

/// A subscription that settles is alive even when it fetches nothing for
/// longer than its lease (a busy route whose workers' queues are full):
/// what it still holds is not put back in line for the group's other
/// subscription, and its settlements stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_settles_keeps_what_it_holds_past_its_lease() -> Result<()> {
    let tansu = Server::tansu();
    let backend = backend::connect(&tansu.kafka_url("")).await?;
    let lease = Duration::from_secs(2);
    let options = || {
        let mut options = SubscribeOptions::new(vec!["busy".into()], "g");
        options.lease = lease;
        options
    };
    let busy = backend.subscribe(options()).await?;
    let other = backend.subscribe(options()).await?;
    let messages: Vec<Message> = (0..4)
        .map(|i| Message::new("busy", format!("{i}")))
        .collect();
    backend.publish(messages).await?;
    let give_up = Instant::now() + Duration::from_secs(20);
    let mut held = Vec::new();
    while held.len() < 4 {
        ensure!(Instant::now() < give_up, "fetched {} of 4", held.len());
        held.extend(
            busy.fetch(4 - held.len(), Duration::from_millis(500))
                .await?,
        );
    }
    // One settlement per half lease and no fetch, for twice the lease,
    // while the other subscription fetches all along.
    for delivery in &held {
        let taken = other.fetch(10, lease / 2).await?;
        ensure!(
            taken.is_empty(),
            "held deliveries went to the other subscription: {:?}",
            taken.iter().map(|d| &d.message.payload).collect::<Vec<_>>()
        );
        let settled = busy.settle(vec![(delivery, Settlement::Ack)]).await;
        ensure!(settled.iter().all(Result::is_ok), "{settled:?}");
    }
    busy.close().await?;
    other.close().await
}
