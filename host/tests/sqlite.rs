//! SQLite backend specifics, each test on a file of its own: a settled
//! batch answers per item when one delivery's lease has passed to another
//! consumer, and two backends sharing one file (as two processes do)
//! settle batches side by side without losing or repeating a message.
#![cfg(feature = "sqlite")]

use std::collections::HashSet;
use std::time::Duration;

use sluice::Message;
use sluice::backend::{self, Delivery, SettleError, Settlement, SubscribeOptions, Subscription};

/// Fetches until exactly `n` deliveries arrived.
async fn fetch_exactly(sub: &dyn Subscription, n: usize) -> Vec<Delivery> {
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    let mut held = Vec::new();
    while held.len() < n {
        assert!(
            std::time::Instant::now() < give_up,
            "fetched {}",
            held.len()
        );
        held.extend(
            sub.fetch(n - held.len(), Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    assert_eq!(held.len(), n);
    held
}

fn text(delivery: &Delivery) -> String {
    String::from_utf8(delivery.message.payload.clone()).unwrap()
}

/// One settle call in which one delivery's lease passed to another
/// consumer: the others take effect (an output published with its ack, an
/// ack, a nack), the stale one answers `LeaseLost`, publishes nothing and
/// leaves the other consumer's claim standing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settles_around_a_lost_lease() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("lease.db").display()
    );
    let backend = backend::connect(&url).await.unwrap();
    assert!(backend.capabilities().lease_checked);
    let reader = backend
        .subscribe(SubscribeOptions::new(vec!["out".into()], "reader"))
        .await
        .unwrap();
    let mut short = SubscribeOptions::new(vec!["in".into()], "g");
    short.lease = Duration::from_millis(500);
    let slow = backend.subscribe(short).await.unwrap();
    // In a backend of its own on the same file, as another process.
    let elsewhere = backend::connect(&url).await.unwrap();
    let other = elsewhere
        .subscribe(SubscribeOptions::new(vec!["in".into()], "g"))
        .await
        .unwrap();
    backend
        .publish(vec![Message::new("in", "stale")])
        .await
        .unwrap();
    let stale = fetch_exactly(slow.as_ref(), 1).await.remove(0);
    // `slow` sits on it past its lease, until `other` has it.
    let taken = fetch_exactly(other.as_ref(), 1).await.remove(0);
    assert_eq!(text(&taken), "stale");
    backend
        .publish(vec![
            Message::new("in", "a"),
            Message::new("in", "b"),
            Message::new("in", "c"),
        ])
        .await
        .unwrap();
    let fresh = fetch_exactly(slow.as_ref(), 3).await;
    let by_text = |t: &str| fresh.iter().find(|d| text(d) == t).unwrap();

    let results = slow
        .settle(vec![
            (
                by_text("a"),
                Settlement::PublishAndAck(vec![Message::new("out", "from a")]),
            ),
            (
                &stale,
                Settlement::PublishAndAck(vec![Message::new("out", "from stale")]),
            ),
            (by_text("b"), Settlement::Ack),
            (by_text("c"), Settlement::Nack(Duration::ZERO)),
        ])
        .await;
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(SettleError::LeaseLost)),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert!(results[3].is_ok(), "{:?}", results[3]);

    // Only the current claim's output was published.
    let outputs = fetch_exactly(reader.as_ref(), 1).await;
    assert_eq!(text(&outputs[0]), "from a");
    assert!(
        reader
            .fetch(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    // The other consumer's claim is intact: its ack is the current one.
    let results = other.settle(vec![(&taken, Settlement::Ack)]).await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    // The nacked one comes back, and nothing else is left.
    let back = fetch_exactly(slow.as_ref(), 1).await.remove(0);
    assert_eq!((text(&back).as_str(), back.attempt), ("c", 2));
    assert!(slow.settle(vec![(&back, Settlement::Ack)]).await[0].is_ok());
    let group = SubscribeOptions::new(vec!["in".into()], "g").group_key();
    assert_eq!(backend.pending(&group).await.unwrap(), Some(0));
    for sub in [slow, other, reader] {
        sub.close().await.unwrap();
    }
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
