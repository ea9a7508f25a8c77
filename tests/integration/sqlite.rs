//! SQLite backend specifics, each test on a file of its own: two backends
//! sharing one file (as two processes do) settle batches side by side
//! without losing or repeating a message. (A batch around a lost lease is
//! a conformance case.) A claim crosses the batch of log rows it turns into
//! deliveries at once without a gap.
use std::collections::HashSet;
use std::time::Duration;

use sluice::Message;
use sluice::backend::{self, Delivery, Settlement, SubscribeOptions};

fn text(delivery: &Delivery) -> String {
    String::from_utf8(delivery.message.payload.clone()).unwrap()
}

/// Two backends on one file, each with a consumer of one group that
/// publishes an output and acks its input in one settle call per batch,
/// while both publish more: every input is handled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backends_on_one_file_settle_batches_exactly_once() {
    const PER_SIDE: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("shared.db").display()
    );
    let sides = [
        backend::connect(&url).await.unwrap(),
        backend::connect(&url).await.unwrap(),
    ];
    let reader = sides[0]
        .subscribe(SubscribeOptions::new(vec!["out".into()], "reader"))
        .await
        .unwrap();
    let mut workers = Vec::new();
    for (side, backend) in sides.iter().enumerate() {
        let backend = backend.clone();
        workers.push(tokio::spawn(async move {
            let sub = backend
                .subscribe(SubscribeOptions::new(vec!["in".into()], "g"))
                .await
                .unwrap();
            let publishing = async {
                for chunk in 0..PER_SIDE / 100 {
                    let batch = (0..100)
                        .map(|i| Message::new("in", format!("{side}-{}", chunk * 100 + i)))
                        .collect();
                    backend.publish(batch).await.unwrap();
                }
            };
            let working = async {
                let mut idle = 0;
                while idle < 10 {
                    let batch = sub.fetch(64, Duration::from_millis(100)).await.unwrap();
                    idle = if batch.is_empty() { idle + 1 } else { 0 };
                    let items = batch
                        .iter()
                        .map(|d| {
                            let output = Message::new("out", d.message.payload.clone());
                            (d, Settlement::PublishAndAck(vec![output]))
                        })
                        .collect();
                    for result in sub.settle(items).await {
                        result.unwrap();
                    }
                }
            };
            tokio::join!(publishing, working);
            sub.close().await.unwrap();
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let mut seen = HashSet::new();
    let mut repeated = 0;
    loop {
        let batch = reader.fetch(500, Duration::from_millis(300)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for d in &batch {
            if !seen.insert(text(d)) {
                repeated += 1;
            }
            reader.ack(d).await.unwrap();
        }
    }
    assert_eq!(repeated, 0, "outputs repeated");
    assert_eq!(seen.len(), 2 * PER_SIDE, "inputs handled");
    reader.close().await.unwrap();
}

/// A database made before deliveries carried their message's key gains the
/// column when opened, filled from the log, so ordered claims hold the keys
/// of messages already waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_made_before_keys_were_kept_gain_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let url = format!("sqlite://{}", path.display());
    let backend = backend::connect(&url).await.unwrap();
    let sub = backend
        .subscribe(SubscribeOptions::new(vec!["old".into()], "g"))
        .await
        .unwrap();
    let keyed = |text: &str, key: &str| {
        let mut message = Message::new("old", text.to_string());
        message.key = Some(key.into());
        message
    };
    backend
        .publish(vec![keyed("a1", "a"), keyed("a2", "a"), keyed("b1", "b")])
        .await
        .unwrap();
    // A claim makes the deliveries; closing hands them back unsettled.
    assert_eq!(
        sub.fetch(10, Duration::from_secs(5)).await.unwrap().len(),
        3
    );
    sub.close().await.unwrap();
    drop(sub);
    drop(backend);

    // The layout of an older build: no key with deliveries.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "DROP INDEX sluice_deliveries_key; ALTER TABLE sluice_deliveries DROP COLUMN msg_key;",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let backend = backend::connect(&url).await.unwrap();
    let mut options = SubscribeOptions::new(vec!["old".into()], "g");
    options.ordered = true;
    let sub = backend.subscribe(options).await.unwrap();
    let first = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    let heads: HashSet<String> = first.iter().map(text).collect();
    assert_eq!(heads, HashSet::from(["a1".to_string(), "b1".to_string()]));
    for delivery in &first {
        sub.ack(delivery).await.unwrap();
    }
    let next = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(next.iter().map(text).collect::<Vec<_>>(), ["a2"]);
    sub.ack(&next[0]).await.unwrap();
    sub.close().await.unwrap();
}

/// An ordered claim parks the deliveries it passed because their keys were
/// held, so later claims do not read them again; settling a key's holder,
/// by a single ack or in a batch, brings its next delivery back at once,
/// not when the parking runs out (two seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_claim_parks_held_deliveries_and_settling_frees_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("parked.db").display());
    let backend = backend::connect(&url).await.unwrap();
    let mut options = SubscribeOptions::new(vec!["t".into()], "g");
    options.ordered = true;
    let sub = backend.subscribe(options).await.unwrap();
    let keyed = |text: &str, key: &str| Message::new("t", text.to_string()).with_key(key);
    backend
        .publish(vec![
            keyed("a1", "a"),
            keyed("a2", "a"),
            keyed("b1", "b"),
            keyed("a3", "a"),
        ])
        .await
        .unwrap();
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let parked = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT CAST(m.payload AS TEXT) FROM sluice_deliveries d JOIN sluice_messages m ON m.seq = d.seq \
             WHERE d.attempt = 0 AND d.visible_at > unixepoch('subsec') * 1000 ORDER BY d.seq",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };

    let heads = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    let texts: HashSet<String> = heads.iter().map(text).collect();
    assert_eq!(texts, HashSet::from(["a1".to_string(), "b1".to_string()]));
    assert_eq!(parked().await, ["a2", "a3"]);

    let a1 = heads.iter().find(|d| text(d) == "a1").unwrap();
    sub.ack(a1).await.unwrap();
    let next = sub.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(next.iter().map(text).collect::<Vec<_>>(), ["a2"]);
    assert_eq!(parked().await, ["a3"]);

    for result in sub.settle(vec![(&next[0], Settlement::Ack)]).await {
        result.unwrap();
    }
    let last = sub.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(last.iter().map(text).collect::<Vec<_>>(), ["a3"]);
    assert!(parked().await.is_empty());
    sub.close().await.unwrap();
}

/// A claim turns at most 2,000 log rows past a group's cursor into
/// deliveries at a time. With 2,500 messages on each of two topics,
/// interleaved, a group of one topic and a group of a pattern each get all
/// of theirs, once and in publish order, across that boundary, and nothing
/// of the other topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_cross_the_materializing_batch_in_order() {
    const PER_TOPIC: usize = 2_500;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("long.db").display());
    let backend = backend::connect(&url).await.unwrap();
    let by_topic = backend
        .subscribe(SubscribeOptions::new(vec!["t.a".into()], "topic"))
        .await
        .unwrap();
    let by_pattern = backend
        .subscribe(SubscribeOptions::new(vec!["*.a".into()], "pattern"))
        .await
        .unwrap();
    for chunk in 0..PER_TOPIC / 100 {
        let batch = (0..100)
            .flat_map(|i| {
                let n = chunk * 100 + i;
                [
                    Message::new("t.a", format!("{n}")),
                    Message::new("t.b", format!("{n}")),
                ]
            })
            .collect();
        backend.publish(batch).await.unwrap();
    }
    for sub in [&by_topic, &by_pattern] {
        let mut texts = Vec::new();
        loop {
            let batch = sub.fetch(300, Duration::from_millis(500)).await.unwrap();
            if batch.is_empty() {
                break;
            }
            assert!(batch.iter().all(|d| d.message.topic == "t.a"));
            texts.extend(batch.iter().map(text));
            let acks = batch.iter().map(|d| (d, Settlement::Ack)).collect();
            for result in sub.settle(acks).await {
                result.unwrap();
            }
        }
        let expected: Vec<String> = (0..PER_TOPIC).map(|n| n.to_string()).collect();
        assert_eq!(texts.len(), PER_TOPIC);
        assert!(texts == expected, "deliveries out of publish order");
    }
    by_topic.close().await.unwrap();
    by_pattern.close().await.unwrap();
}
