//! Request-reply through Rust plugins (`plugins/rpc`) on every backend that
//! keeps a route's messages for it: an asking route's plugin sends a request
//! with the host's `request` and waits; a responding route's plugin answers
//! with `reply`; the host ties the two together with a reply topic and a
//! correlation id. A request nobody answers, one to a topic the plugin may
//! not ask, and a reply that comes too late each give the asker a clear
//! result.

use std::sync::Arc;
use std::time::Duration;

use sluice::backend::{self, Backend};
use sluice::message::Message;
use sluice::router::Route;
#[cfg(feature = "kafka")]
use sluice_tests::common::servers::Server;
use sluice_tests::common::{Collector, Running, plugin_path, rpc, runtime, text, unique};
#[cfg(feature = "nats")]
use sluice_tests::conformance::targets::Nats;

const LIMIT: Duration = Duration::from_secs(60);

/// An asking route of the Rust `rpc` plugin (see `common::rpc::asker`).
fn asker(backend: &Arc<dyn Backend>, ns: &str, input: &str, ask: &str, timeout_ms: &str) -> Route {
    let plugin = plugin_path("rpc");
    rpc::asker(&runtime(), backend, &plugin, ns, input, ask, timeout_ms)
}

/// A responding route of the Rust `rpc` plugin: replies with the payload
/// uppercased.
fn answerer(backend: &Arc<dyn Backend>, ns: &str, input: &str) -> Route {
    rpc::answerer(&runtime(), backend, &plugin_path("rpc"), ns, input)
}

async fn publish(backend: &Arc<dyn Backend>, topic: String, payloads: &[&str]) {
    let messages = payloads
        .iter()
        .map(|p| Message::new(topic.clone(), *p))
        .collect();
    backend.publish(messages).await.unwrap();
}

fn failed(answer: &Message) -> bool {
    answer.header("failed") == Some("true")
}

/// Three requests answered, in a round trip each through the backend, and
/// one to a topic nobody reads, which times out.
async fn requests_are_answered_on(url: &str) {
    let ns = unique("rr");
    let backend = backend::connect(url).await.unwrap();
    let answers = Collector::start(&backend, &[&format!("{ns}.answers")]).await;
    let routes = [
        answerer(&backend, &ns, "questions"),
        asker(&backend, &ns, "asks", "questions", "15000"),
        asker(&backend, &ns, "lonely", "nobody", "500"),
    ];
    let mut running = Vec::new();
    for route in routes {
        running.push(Running::start(route).await);
    }
    publish(&backend, format!("{ns}.asks"), &["one", "two", "three"]).await;
    publish(&backend, format!("{ns}.lonely"), &["anyone?"]).await;

    let got = answers.wait_for(4, LIMIT).await.unwrap();
    let mut answered: Vec<String> = got.iter().filter(|a| !failed(a)).map(text).collect();
    answered.sort();
    assert_eq!(answered, ["ONE", "THREE", "TWO"], "{url}: {got:?}");
    let unanswered: Vec<String> = got.iter().filter(|a| failed(a)).map(text).collect();
    assert_eq!(unanswered.len(), 1, "{url}: {got:?}");
    assert!(
        unanswered[0].starts_with("timeout: no reply"),
        "{url}: {}",
        unanswered[0]
    );
    for route in running {
        route.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_memory() {
    requests_are_answered_on("memory://").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    requests_are_answered_on(&format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("rr.db").display()
    ))
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_redis_streams() {
    let prefix = unique("rr");
    requests_are_answered_on(&format!("redis://127.0.0.1:6379/0?prefix={prefix}:")).await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_nats_core() {
    let nats = Nats::core();
    requests_are_answered_on(&nats.url("")).await;
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_jetstream() {
    let jetstream = Nats::jetstream();
    requests_are_answered_on(&jetstream.url("")).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_postgres() {
    let schema = sluice_tests::common::postgres::PostgresSchema::new();
    requests_are_answered_on(&schema.url("")).await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_on_kafka() {
    let tansu = Server::tansu();
    requests_are_answered_on(&tansu.kafka_url("")).await;
}

/// A request to a topic the plugin's `request_to` does not grant fails at
/// once, naming the grant; nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_an_ungranted_topic_is_denied() {
    let backend = backend::connect("memory://").await.unwrap();
    let ns = "denied";
    let answers = Collector::start(&backend, &[&format!("{ns}.answers")]).await;
    let forbidden = Collector::start(&backend, &[&format!("{ns}.forbidden")]).await;
    let running = Running::start(asker(&backend, ns, "asks", "forbidden", "1000")).await;
    publish(&backend, format!("{ns}.asks"), &["may I?"]).await;
    let got = answers.wait_for(1, LIMIT).await.unwrap();
    let reason = text(&got[0]);
    assert!(failed(&got[0]), "{reason}");
    assert!(
        reason.starts_with("denied: plugin `rpc` may not send requests to `denied.forbidden`"),
        "{reason}"
    );
    assert!(forbidden.now().is_empty(), "a denied request went out");
    running.stop().await;
}

/// A reply that comes after its request gave up is dropped: the asker has
/// its timeout and nothing more, although the responder did reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("late.db").display()
    );
    let backend = backend::connect(&url).await.unwrap();
    let ns = "late";
    let answers = Collector::start(&backend, &[&format!("{ns}.answers")]).await;
    let asking = Running::start(asker(&backend, ns, "asks", "late", "300")).await;
    publish(&backend, format!("{ns}.asks"), &["still there?"]).await;
    let got = answers.wait_for(1, LIMIT).await.unwrap();
    assert!(
        text(&got[0]).starts_with("timeout: no reply to `late.late`"),
        "{got:?}"
    );

    // The responder comes up late, finds the request kept, and answers it.
    let answering = Running::start(answerer(&backend, ns, "late")).await;
    let give_up = tokio::time::Instant::now() + LIMIT;
    while answering.stats.snapshot().succeeded < 1 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the late responder never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(answers.now().len(), 1, "{:?}", answers.now());
    asking.stop().await;
    answering.stop().await;
}
