//! SQS-specific behaviour, each test on a private moto server (`moto_server`
//! from PyPI's `moto[server]`; a missing one fails the test, naming it):
//! the dead-letter queue behind `max_receive`, the heartbeat that keeps held
//! deliveries and lets a stalled consumer's go, messages sent by other
//! tools, pending counts, publishers finding groups by listing queues,
//! topic patterns across processes, ephemeral groups removing their queues
//! and subscriptions, and clear refusals.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aws_sdk_sqs::types::MessageAttributeValue;
use sluice::Message;
use sluice::backend::sqs::names::Names;
use sluice::backend::{self, SubscribeOptions, Subscription};

use common::servers::Server;
use sluice_tests::common;

const LIMIT: Duration = Duration::from_secs(20);

/// A plain SDK client of the emulator, as another tool would use.
async fn client(moto: &Server) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(format!("http://127.0.0.1:{}", moto.port))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "tool", "secret", None, None, "test",
        ))
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

fn options(topic: &str, group: &str, lease: Duration) -> SubscribeOptions {
    let mut options = SubscribeOptions::new(vec![topic.to_string()], group);
    options.lease = lease;
    options
}

async fn queue_url(sqs: &aws_sdk_sqs::Client, name: &str) -> Result<String> {
    sqs.get_queue_url()
        .queue_name(name)
        .send()
        .await
        .with_context(|| format!("GetQueueUrl {name}"))?
        .queue_url
        .context("no URL")
}

async fn queues_named(sqs: &aws_sdk_sqs::Client, prefix: &str) -> Result<Vec<String>> {
    Ok(sqs
        .list_queues()
        .queue_name_prefix(prefix)
        .send()
        .await?
        .queue_urls
        .unwrap_or_default())
}

/// Fetches until a delivery comes or `limit` passes.
async fn next(sub: &dyn Subscription, limit: Duration) -> Result<sluice::backend::Delivery> {
    sub.fetch(1, limit)
        .await?
        .pop()
        .context("nothing delivered in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_move_to_the_dead_letter_queue_after_max_receive() -> Result<()> {
    let moto = Server::moto();
    let sqs = client(&moto).await;
    let backend = backend::connect(&moto.aws_url("sqs", "a", "&max_receive=2")).await?;
    let options = options("jobs", "workers", Duration::from_secs(5));
    let queue = Names::new("sluice-").queue("jobs", "workers", &options.group_key(), false);
    let sub = backend.subscribe(options).await?;
    let poison = Message::new("jobs", "crash me");
    backend.publish(vec![poison.clone()]).await?;
    for attempt in 1..=2 {
        let delivery = next(sub.as_ref(), LIMIT).await?;
        ensure!(delivery.attempt == attempt, "attempt {}", delivery.attempt);
        // As if the consumer died: the message is received, never settled.
        sub.nack(&delivery, Duration::ZERO).await?;
    }
    let third = sub.fetch(1, Duration::from_secs(2)).await?;
    ensure!(third.is_empty(), "delivered a third time");
    let dead_letters = queue_url(&sqs, &Names::dead_letter_queue(&queue)).await?;
    let moved = sqs
        .receive_message()
        .queue_url(&dead_letters)
        .message_attribute_names("All")
        .wait_time_seconds(2)
        .send()
        .await?
        .messages
        .unwrap_or_default();
    ensure!(
        moved.len() == 1,
        "{} messages in the dead-letter queue",
        moved.len()
    );
    let meta = moved[0]
        .message_attributes
        .as_ref()
        .and_then(|a| a.get("sluice"))
        .and_then(|v| v.string_value.clone())
        .context("the sluice attribute travelled along")?;
    ensure!(meta.contains(&poison.id), "{meta}");
    sub.close().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_deliveries_are_kept_alive_and_a_stalled_consumers_return() -> Result<()> {
    let moto = Server::moto();
    let backend = backend::connect(&moto.aws_url("sqs", "a", "")).await?;
    let lease = Duration::from_secs(1);
    let slow = backend.subscribe(options("work", "g", lease)).await?;
    let other = backend.subscribe(options("work", "g", lease)).await?;
    backend
        .publish(vec![Message::new("work", "long job")])
        .await?;
    let held = next(slow.as_ref(), LIMIT).await?;
    // Three leases of handling; the consumer stays alive (it keeps
    // fetching), so the heartbeat keeps the delivery its own.
    let until = tokio::time::Instant::now() + 3 * lease;
    while tokio::time::Instant::now() < until {
        ensure!(
            other.fetch(1, Duration::from_millis(300)).await?.is_empty(),
            "another member got a delivery still held"
        );
        ensure!(
            slow.fetch(1, Duration::from_millis(100)).await?.is_empty(),
            "the held delivery was redelivered"
        );
    }
    slow.ack(&held).await?;
    slow.close().await?;
    ensure!(
        other.fetch(1, 2 * lease).await?.is_empty(),
        "came back after the ack"
    );
    other.close().await?;

    // A consumer that stops calling is stalled: its delivery returns.
    let stalled = backend.subscribe(options("work", "g", lease)).await?;
    backend.publish(vec![Message::new("work", "again")]).await?;
    let _held = next(stalled.as_ref(), LIMIT).await?;
    let survivor = backend.subscribe(options("work", "g", lease)).await?;
    let back = next(survivor.as_ref(), LIMIT).await?;
    ensure!(back.attempt == 2, "attempt {}", back.attempt);
    survivor.ack(&back).await?;
    survivor.close().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_other_tools_are_read_and_pending_is_counted() -> Result<()> {
    let moto = Server::moto();
    let sqs = client(&moto).await;
    let backend = backend::connect(&moto.aws_url("sqs", "a", "")).await?;
    let options = options("inbox", "readers", Duration::from_secs(30));
    let group_key = options.group_key();
    let queue = Names::new("sluice-").queue("inbox", "readers", &group_key, false);
    let sub = backend.subscribe(options).await?;
    let sent = sqs
        .send_message()
        .queue_url(queue_url(&sqs, &queue).await?)
        .message_body("hello from elsewhere")
        .message_attributes(
            "colour",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("red")
                .build()?,
        )
        .send()
        .await?;
    let delivery = next(sub.as_ref(), LIMIT).await?;
    ensure!(
        Some(delivery.message.id.as_str()) == sent.message_id(),
        "id {}",
        delivery.message.id
    );
    ensure!(delivery.message.payload == b"hello from elsewhere");
    ensure!(delivery.message.topic == "inbox");
    ensure!(
        delivery.message.header("colour") == Some("red"),
        "{:?}",
        delivery.message.headers
    );
    ensure!(delivery.message.timestamp_ms > 0);
    ensure!(
        backend.pending(&group_key).await? == Some(1),
        "pending {:?}",
        backend.pending(&group_key).await?
    );
    sub.ack(&delivery).await?;
    sub.close().await?;
    ensure!(backend.pending(&group_key).await? == Some(0));
    ensure!(backend.pending("unknown[x]").await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_elsewhere_find_groups_by_listing_queues() -> Result<()> {
    let moto = Server::moto();
    let consumers = backend::connect(&moto.aws_url("sqs", "consumers", "")).await?;
    // Other credentials: another directory, as in another process.
    let publisher = backend::connect(&moto.aws_url("sqs", "publisher", "&discover_ms=300")).await?;
    let first = consumers
        .subscribe(options("news", "first", Duration::from_secs(30)))
        .await?;
    publisher.publish(vec![Message::new("news", "one")]).await?;
    let got = next(first.as_ref(), LIMIT).await?;
    ensure!(got.message.payload == b"one");
    first.ack(&got).await?;

    let second = consumers
        .subscribe(options("news", "second", Duration::from_secs(30)))
        .await?;
    // Once the publisher's listing is older than discover_ms it lists again
    // and finds the new group.
    tokio::time::sleep(Duration::from_millis(400)).await;
    publisher.publish(vec![Message::new("news", "two")]).await?;
    for sub in [&first, &second] {
        let got = next(sub.as_ref(), LIMIT).await?;
        ensure!(got.message.payload == b"two", "{:?}", got.message);
        sub.ack(&got).await?;
    }
    first.close().await?;
    second.close().await
}

/// A group subscribed to patterns gets, from a publisher in another
/// process, the messages of every topic they match (each with its own
/// topic), and no others; on SNS the publisher subscribes the group's
/// pattern queue to each matching topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_elsewhere_send_to_the_groups_of_matching_patterns() -> Result<()> {
    let moto = Server::moto();
    for scheme in ["sqs", "sns+sqs"] {
        let prefix = format!("&prefix={}-", scheme.replace('+', ""));
        let consumers = backend::connect(&moto.aws_url(scheme, "consumers", &prefix)).await?;
        // Other credentials: another directory, as in another process.
        let publisher = backend::connect(&moto.aws_url(scheme, "publisher", &prefix)).await?;
        let mut patterns = SubscribeOptions::new(
            vec!["orders.*".into(), "audit.>".into(), "exact".into()],
            "watch",
        );
        patterns.lease = Duration::from_secs(30);
        let watch = consumers.subscribe(patterns).await?;
        publisher
            .publish(vec![
                Message::new("orders.eu", "1"),
                Message::new("orders.eu.paid", "not matched"),
                Message::new("audit.a.b", "2"),
                Message::new("exact", "3"),
                Message::new("other", "not matched"),
            ])
            .await?;
        let mut got = Vec::new();
        while got.len() < 3 {
            let delivery = next(watch.as_ref(), LIMIT)
                .await
                .with_context(|| format!("{scheme}: after {got:?}"))?;
            watch.ack(&delivery).await?;
            got.push((
                delivery.message.topic.clone(),
                String::from_utf8(delivery.message.payload.clone())?,
            ));
        }
        got.sort();
        let want = [("audit.a.b", "2"), ("exact", "3"), ("orders.eu", "1")]
            .map(|(t, p)| (t.to_string(), p.to_string()));
        ensure!(got == want, "{scheme}: {got:?}");
        let extra = watch.fetch(10, Duration::from_secs(1)).await?;
        ensure!(
            extra.is_empty(),
            "{scheme}: unmatched topics arrived: {:?}",
            extra.iter().map(|d| &d.message.topic).collect::<Vec<_>>()
        );
        watch.close().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_groups_remove_their_queues_and_subscriptions() -> Result<()> {
    let moto = Server::moto();
    let sqs = client(&moto).await;
    for scheme in ["sqs", "sns+sqs"] {
        let backend = backend::connect(&moto.aws_url(scheme, "a", "")).await?;
        let topic = format!("tail.{}", scheme.replace('+', "_"));
        let mut tail = options(&topic, "tail-1", Duration::from_secs(30));
        tail.ephemeral = true;
        let durable = backend
            .subscribe(options(&topic, "durable", Duration::from_secs(30)))
            .await?;
        let sub = backend.subscribe(tail).await?;
        let prefix = Names::new("sluice-").topic_queue_prefix(&topic);
        // The durable group's queue and dead-letter queue, and the tail's.
        ensure!(
            queues_named(&sqs, &prefix).await?.len() == 3,
            "{scheme}: queues before close"
        );
        backend.publish(vec![Message::new(&topic, "x")]).await?;
        let got = next(sub.as_ref(), LIMIT).await?;
        sub.ack(&got).await?;
        sub.close().await?;
        let left = queues_named(&sqs, &prefix).await?;
        ensure!(left.len() == 2, "{scheme}: left after close: {left:?}");
        // Publishing goes on, to the groups that are left.
        backend.publish(vec![Message::new(&topic, "y")]).await?;
        let kept = durable.fetch(10, LIMIT).await?;
        ensure!(!kept.is_empty(), "{scheme}: the durable group got nothing");
        durable.close().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_patterns_and_oversized_messages_are_refused_clearly() -> Result<()> {
    let moto = Server::moto();
    for scheme in ["sqs", "sns+sqs"] {
        let backend = backend::connect(&moto.aws_url(scheme, "a", "")).await?;
        let long = format!("{}.*", "o".repeat(200));
        let err = backend
            .subscribe(options(&long, "g", Duration::from_secs(30)))
            .await
            .err()
            .context("an overlong pattern was accepted")?;
        ensure!(
            format!("{err:#}").contains(&format!("pattern `{long}`")),
            "{err:#}"
        );
        let _sub = backend
            .subscribe(options("big", "g", Duration::from_secs(30)))
            .await?;
        let big = Message::new("big", vec![b'x'; 300 * 1024]);
        let err = backend
            .publish(vec![big.clone()])
            .await
            .err()
            .context("an oversized message was accepted")?;
        ensure!(format!("{err:#}").contains(&big.id), "{err:#}");
        backend
            .publish(vec![Message::new("big", vec![b'x'; 200 * 1024])])
            .await
            .context("a 200 KiB message")?;
    }
    let err = backend::connect(&format!("sqs://127.0.0.1:{}?max_receive=many", moto.port))
        .await
        .err()
        .context("a bad parameter was accepted")?;
    ensure!(err.to_string().contains("max_receive"), "{err}");
    Ok(())
}

/// The probe of `check --connect` reaches SQS (and SNS) with the URL's
/// credentials, and names an endpoint that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_reach_the_endpoint_or_name_it() -> Result<()> {
    let moto = Server::moto();
    let found = backend::probe(&moto.aws_url("sqs", "a", "")).await?;
    ensure!(found.contains("SQS answers"), "{found}");
    let found = backend::probe(&moto.aws_url("sns+sqs", "a", "")).await?;
    ensure!(found.contains("SNS"), "{found}");
    let err = backend::probe("sqs://a:b@127.0.0.1:1?region=us-east-1")
        .await
        .err()
        .context("a closed port answered")?;
    ensure!(format!("{err:#}").contains("cannot reach SQS"), "{err:#}");
    Ok(())
}
