//! PostgreSQL backend specifics on the shared server (127.0.0.1:5432,
//! database `test`), each test in a schema of its own: NOTIFY wakes a
//! waiting consumer, settled messages are deleted after their retention,
//! migrations run once, a version 1 schema is upgraded with its messages
//! and a newer schema is refused, and a settled batch
//! answers per item when the database refuses one output (a batch around a
//! lost lease is a conformance case).
use std::time::Duration;

use sluice::Message;
use sluice::backend::{self, Delivery, SettleError, Settlement, SubscribeOptions, Subscription};
use sluice_tests::common::postgres::PostgresSchema;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_wakes_a_waiting_consumer_without_polling() {
    let schema = PostgresSchema::new();
    // Polling once a minute: only a notification can deliver within the wait.
    let url = schema.url("poll_ms=60000");
    let consumer_side = backend::connect(&url).await.unwrap();
    let publisher_side = backend::connect(&url).await.unwrap();
    let sub = consumer_side
        .subscribe(SubscribeOptions::new(vec!["wake".into()], "g"))
        .await
        .unwrap();
    let waiting = tokio::spawn(async move {
        let got = sub.fetch(10, Duration::from_secs(30)).await.unwrap();
        (sub, got)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher_side
        .publish(vec![Message::new("wake", "up")])
        .await
        .unwrap();
    let (sub, got) = waiting.await.unwrap();
    assert_eq!(got.len(), 1, "the waiting fetch was not woken");
    sub.ack(&got[0]).await.unwrap();
    sub.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_messages_are_deleted_after_their_retention() {
    let schema = PostgresSchema::new();
    let backend = backend::connect(&schema.url("retention_ms=0&cleanup_ms=100"))
        .await
        .unwrap();
    let sub = backend
        .subscribe(SubscribeOptions::new(vec!["kept".into()], "g"))
        .await
        .unwrap();
    backend
        .publish(vec![Message::new("kept", "a"), Message::new("kept", "b")])
        .await
        .unwrap();
    let got = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 2);
    // One settled, one still held: only the settled one may go.
    sub.ack(&got[0]).await.unwrap();
    let pool = schema.pool().await;
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    let remaining = loop {
        let payloads: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT payload FROM sluice_messages ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        if payloads.len() < 2 || std::time::Instant::now() > give_up {
            break payloads;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(remaining, vec![got[1].message.payload.clone()]);
    sub.ack(&got[1]).await.unwrap();
    sub.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_and_a_newer_schema_is_refused() {
    let schema = PostgresSchema::new();
    let url = schema.url("pool=2");
    drop(backend::connect(&url).await.unwrap());
    drop(backend::connect(&url).await.unwrap());
    let pool = schema.pool().await;
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM sluice_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, vec![1, 2, 3]);

    sqlx::query("INSERT INTO sluice_migrations (version) VALUES (99)")
        .execute(&pool)
        .await
        .unwrap();
    let error = format!("{:#}", backend::connect(&url).await.err().expect("refused"));
    assert!(
        error.contains("version 99, newer than this build"),
        "{error}"
    );
}

/// A database made by a build that knew only migration 1 (its indexes,
/// no fill factor, no keys with deliveries) keeps its unsettled messages
/// through the upgrade, their deliveries gain their keys, and it ends with
/// the indexes of migrations 2 and 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_is_upgraded_with_its_messages() {
    let schema = PostgresSchema::new();
    let url = schema.url("pool=2");
    let backend = backend::connect(&url).await.unwrap();
    drop(
        backend
            .subscribe(SubscribeOptions::new(vec!["old".into()], "g"))
            .await
            .unwrap(),
    );
    let keyed = |payload: &str, key: &str| {
        let mut message = Message::new("old", payload.to_string());
        message.key = Some(key.into());
        message
    };
    backend
        .publish(vec![keyed("a", "k1"), keyed("b", "k2")])
        .await
        .unwrap();
    drop(backend);
    let pool = schema.pool().await;
    sqlx::raw_sql(
        "DELETE FROM sluice_migrations WHERE version >= 2; \
         DROP INDEX sluice_deliveries_key; \
         ALTER TABLE sluice_deliveries DROP COLUMN msg_key; \
         DROP INDEX sluice_messages_published; \
         CREATE INDEX sluice_messages_topic ON sluice_messages (topic, seq); \
         CREATE INDEX sluice_messages_published ON sluice_messages (published_at); \
         CREATE INDEX sluice_deliveries_visible ON sluice_deliveries (group_key, visible_at); \
         CREATE INDEX sluice_deliveries_seq ON sluice_deliveries (seq); \
         ALTER TABLE sluice_deliveries RESET (fillfactor);",
    )
    .execute(&pool)
    .await
    .unwrap();

    let backend = backend::connect(&url).await.unwrap();
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT msg_key FROM sluice_deliveries ORDER BY seq")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(keys, vec!["k1", "k2"]);
    let sub = backend
        .subscribe(SubscribeOptions::new(vec!["old".into()], "g"))
        .await
        .unwrap();
    let got = fetch_exactly(sub.as_ref(), 2).await;
    let payloads: Vec<&[u8]> = got.iter().map(|d| d.message.payload.as_slice()).collect();
    assert_eq!(payloads, vec![b"a".as_slice(), b"b".as_slice()]);
    for delivery in &got {
        sub.ack(delivery).await.unwrap();
    }
    sub.close().await.unwrap();

    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM sluice_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, vec![1, 2, 3]);
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes \
         WHERE schemaname = current_schema() ORDER BY indexname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        vec![
            "sluice_deliveries_key",
            "sluice_deliveries_pkey",
            "sluice_groups_pkey",
            "sluice_messages_pkey",
            "sluice_messages_published",
            "sluice_migrations_pkey",
        ]
    );
    let fill: Option<Vec<String>> = sqlx::query_scalar(
        "SELECT reloptions::text[] FROM pg_class WHERE oid = 'sluice_deliveries'::regclass",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(fill, Some(vec!["fillfactor=50".to_string()]));
}

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

/// An output PostgreSQL refuses to store (text with a NUL byte) fails its
/// own publish-and-ack only: the rest of the batch is settled, and the
/// refused delivery stays claimed, its outputs unpublished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_the_database_refuses_fails_only_its_own_item() {
    let schema = PostgresSchema::new();
    let backend = backend::connect(&schema.url("")).await.unwrap();
    let reader = backend
        .subscribe(SubscribeOptions::new(vec!["out".into()], "reader"))
        .await
        .unwrap();
    let sub = backend
        .subscribe(SubscribeOptions::new(vec!["in".into()], "g"))
        .await
        .unwrap();
    backend
        .publish(vec![
            Message::new("in", "a"),
            Message::new("in", "b"),
            Message::new("in", "c"),
        ])
        .await
        .unwrap();
    let held = fetch_exactly(sub.as_ref(), 3).await;
    let refused = Message::new("out", "bad").with_key("nul\0key");
    let results = sub
        .settle(vec![
            (
                &held[0],
                Settlement::PublishAndAck(vec![Message::new("out", "from a")]),
            ),
            (&held[1], Settlement::PublishAndAck(vec![refused])),
            (&held[2], Settlement::Ack),
        ])
        .await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(SettleError::Unavailable(_))),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    let outputs = fetch_exactly(reader.as_ref(), 1).await;
    assert_eq!(text(&outputs[0]), "from a");
    assert!(
        reader
            .fetch(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    // Still this consumer's: a nack of its claim takes effect.
    sub.nack(&held[1], Duration::ZERO).await.unwrap();
    let back = fetch_exactly(sub.as_ref(), 1).await.remove(0);
    assert_eq!((text(&back).as_str(), back.attempt), ("b", 2));
    sub.ack(&back).await.unwrap();
    sub.close().await.unwrap();
    reader.close().await.unwrap();
}
