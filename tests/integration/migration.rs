//! Moving between backends: a route that publishes to several backends at
//! once (dual publish), acking its input only once every one of them has
//! taken the outputs; and bridges (forwarding routes) that carry a topic
//! from one backend to another through SIGKILLs and broker restarts.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice::backend::{self, Backend, Settlement, SubscribeOptions, Subscription};
use sluice::message::{Message, headers};
use sluice::router::{OutputFailure, RouteStats};
#[cfg(any(feature = "kafka", feature = "sqs"))]
use sluice_tests::common::servers::Server;
use sluice_tests::common::{
    Collector, Running, load, quick_retry, route, runtime, settings, text, unique,
};
use sluice_tests::conformance::Target;
#[cfg(feature = "postgres")]
use sluice_tests::conformance::targets::postgres::Postgres;
use sluice_tests::conformance::targets::{Nats, Redis};

use crate::crash::Host;

const LIMIT: Duration = Duration::from_secs(60);

/// A route from SQLite to Redis Streams and JetStream (each on a server of
/// its own, so the test can kill it), uppercasing `dual.in` to `dual.out`.
struct Dual {
    source: Arc<dyn Backend>,
    redis: Arc<dyn Backend>,
    jetstream: Arc<dyn Backend>,
    jetstream_server: Nats,
    _redis_server: Redis,
    _dir: tempfile::TempDir,
}

impl Dual {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?poll_ms=20", dir.path().join("in.db").display());
        let source = backend::connect(&url).await.unwrap();
        let redis_server = Redis::streams();
        let redis = redis_server.open().await.unwrap();
        let jetstream_server = Nats::jetstream();
        // A publish to the dead server gives up after a second.
        let jetstream = backend::connect(&jetstream_server.url("?timeout_ms=1000"))
            .await
            .unwrap();
        Dual {
            source,
            redis,
            jetstream,
            jetstream_server,
            _redis_server: redis_server,
            _dir: dir,
        }
    }

    async fn start(&self, output_failure: OutputFailure) -> Running {
        let runtime = runtime();
        let plugin = load(
            &runtime,
            "uppercase",
            settings("uppercase", &[("output", "dual.out")]),
        );
        let mut route = route("dual", &self.source, "dual.in", plugin, quick_retry(3));
        // Long enough that no input comes back while a backend is down: a
        // second handling would repeat outputs on the backend that is up.
        route.spec.subscribe.lease = Duration::from_secs(120);
        route.spec.concurrency = 4;
        route.spec.output_failure = output_failure;
        route.outputs = vec![self.redis.clone(), self.jetstream.clone()];
        route.dead_letters = Some(self.source.clone());
        Running::start(route).await
    }

    async fn publish(&self, numbers: std::ops::Range<usize>) {
        let messages = numbers
            .map(|n| Message::new("dual.in", format!("message {n}")))
            .collect();
        self.source.publish(messages).await.unwrap();
    }
}

/// Each output's input, once: the count of distinct inputs and of repeats.
fn inputs(outputs: &[Message]) -> (usize, usize) {
    let distinct: BTreeSet<String> = outputs.iter().map(text).collect();
    (distinct.len(), outputs.len() - distinct.len())
}

async fn wait_until(stats: &RouteStats, what: &str, done: impl Fn(&RouteStats) -> bool) {
    let give_up = tokio::time::Instant::now() + LIMIT;
    while !done(stats) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "{what} within {LIMIT:?}: {}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With JetStream killed, the inputs stay unacked; once JetStream is back,
/// it gets every output it missed and the inputs are acked. Nothing is
/// lost, and Redis, which stayed up, gets nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_publish_waits_out_a_killed_backend_and_loses_nothing() {
    let dual = Dual::new().await;
    let on_redis = Collector::start(&dual.redis, &["dual.out"]).await;
    let running = dual.start(OutputFailure::Wait).await;
    let stats = running.stats.clone();

    dual.publish(0..100).await;
    wait_until(&stats, "100 acked", |s| s.snapshot().succeeded == 100).await;

    dual.jetstream_server.kill();
    dual.publish(100..200).await;
    // JetStream cannot take their outputs: the inputs must wait.
    wait_until(&stats, "the new inputs handled", |s| {
        s.snapshot().received >= 200
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stats.snapshot().succeeded,
        100,
        "inputs acked before every output backend took their outputs"
    );

    dual.jetstream_server.start_again();
    wait_until(&stats, "200 acked once JetStream is back", |s| {
        s.snapshot().succeeded == 200
    })
    .await;
    let on_jetstream = Collector::start(&dual.jetstream, &["dual.out"]).await;
    let (distinct, _) = inputs(&on_jetstream.wait_for(200, LIMIT).await.unwrap());
    assert_eq!(distinct, 200, "JetStream lost outputs");
    let (distinct, repeats) = inputs(&on_redis.wait_for(200, LIMIT).await.unwrap());
    assert_eq!(
        (distinct, repeats),
        (200, 0),
        "Redis, up throughout, lost outputs or got some twice"
    );
    running.stop().await;
}

/// With `output_failure = dead-letter`, inputs whose outputs JetStream
/// keeps refusing are dead-lettered once their attempts are used up (cause
/// `output-failed`), and acked; Redis keeps the outputs it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_publish_dead_letters_what_a_dead_backend_refuses() {
    let dual = Dual::new().await;
    let on_redis = Collector::start(&dual.redis, &["dual.out"]).await;
    let letters = Collector::start(&dual.source, &["dual.dead-letter"]).await;
    dual.jetstream_server.kill();
    let running = dual.start(OutputFailure::DeadLetter).await;

    dual.publish(0..20).await;
    let letters = letters.wait_for(20, LIMIT).await.unwrap();
    assert_eq!(inputs(&letters), (20, 0));
    for letter in &letters {
        assert_eq!(
            letter.header(headers::DEAD_LETTER_CAUSE),
            Some("output-failed")
        );
        let reason = letter.header(headers::DEAD_LETTER_REASON).unwrap();
        assert!(reason.contains("jetstream"), "{reason}");
    }
    assert_eq!(inputs(&on_redis.wait_for(20, LIMIT).await.unwrap()).0, 20);
    let stats = running.stats.snapshot();
    assert_eq!((stats.succeeded, stats.dead_lettered), (0, 20), "{stats}");
    running.stop().await;
}

/// An ordered route with one output backend waits out that backend's
/// death in place (`output_failure = wait`): no input is acked while
/// JetStream is down, and once it is back every key's outputs are all
/// there, in publish order: no later output of a key overtook a refused
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ordered_route_retries_a_refused_publish_in_place() {
    const KEYS: usize = 10;
    let dual = Dual::new().await;
    let runtime = runtime();
    let plugin = load(
        &runtime,
        "uppercase",
        settings("uppercase", &[("output", "ordered.out")]),
    );
    let mut route = route(
        "ordered",
        &dual.source,
        "ordered.in",
        plugin,
        quick_retry(3),
    );
    route.spec.subscribe.lease = Duration::from_secs(120);
    route.spec.concurrency = 4;
    route.spec.ordered = true;
    route.outputs = vec![dual.jetstream.clone()];
    route.dead_letters = Some(dual.source.clone());
    let running = Running::start(route).await;
    let stats = running.stats.clone();
    let publish = |numbers: std::ops::Range<usize>| {
        let messages: Vec<Message> = numbers
            .map(|n| {
                Message::new("ordered.in", format!("key {} message {n:04}", n % KEYS))
                    .with_key(format!("key-{}", n % KEYS))
            })
            .collect();
        let source = dual.source.clone();
        async move { source.publish(messages).await.unwrap() }
    };

    publish(0..100).await;
    wait_until(&stats, "100 acked", |s| s.snapshot().succeeded == 100).await;
    dual.jetstream_server.kill();
    publish(100..200).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stats.snapshot().succeeded,
        100,
        "inputs acked while their outputs were refused"
    );
    dual.jetstream_server.start_again();
    wait_until(&stats, "200 acked once JetStream is back", |s| {
        s.snapshot().succeeded == 200
    })
    .await;
    assert_eq!(stats.snapshot().dead_lettered, 0);

    let on_jetstream = Collector::start(&dual.jetstream, &["ordered.out"]).await;
    let outputs = on_jetstream.wait_for(200, LIMIT).await.unwrap();
    assert_eq!(inputs(&outputs), (200, 0), "outputs lost or repeated");
    let mut last: HashMap<String, String> = HashMap::new();
    for output in &outputs {
        let payload = text(output);
        let (key, number) = payload.split_once(" MESSAGE ").unwrap();
        if let Some(before) = last.insert(key.to_owned(), number.to_owned()) {
            assert!(before.as_str() < number, "{key}: {number} after {before}");
        }
    }
    running.stop().await;
}

/// A config with one forwarding route, `bridge`, from backend `from` to
/// backend `to`: `<ns>.orders.>` forwarded as `<ns>.moved.>`.
fn bridge_config(ns: &str, dir: &Path, from: &str, to: &str) -> PathBuf {
    let body = format!(
        r#"[backends.from]
url = "{from}"

[backends.to]
url = "{to}"

[runtime]
cache_dir = "{cache}"

[[routes]]
name = "bridge"
topics = ["{ns}.orders.>"]
backend = "from"
output_backend = "to"
forward = true
rename = [{{ from = "{ns}.orders.>", to = "{ns}.moved.>" }}]
concurrency = 4
lease_ms = 5000
"#,
        cache = dir.join("cache").display(),
    );
    let path = dir.join("bridge.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// Reads what a bridge forwards to `pattern`, as a throwaway group of its
/// own, subscribed before anything is forwarded (SQS keeps messages only
/// for the groups it has).
async fn watch(backend: &Arc<dyn Backend>, pattern: &str, group: &str) -> Box<dyn Subscription> {
    let mut options = SubscribeOptions::new(vec![pattern.to_string()], group);
    options.ephemeral = true;
    backend.subscribe(options).await.unwrap()
}

/// Each forwarded message's id, with the topics it arrived under (one per
/// arrival), once nothing more has come for ten seconds (an emulator on a
/// loaded machine can answer a few receives in a row with nothing).
async fn arrived(watching: Box<dyn Subscription>) -> HashMap<String, Vec<String>> {
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut quiet_since = tokio::time::Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(10) {
        let batch = watching
            .fetch(1000, Duration::from_millis(200))
            .await
            .unwrap();
        if !batch.is_empty() {
            quiet_since = tokio::time::Instant::now();
        }
        for delivery in &batch {
            let message = &delivery.message;
            seen.entry(message.id.clone())
                .or_default()
                .push(message.topic.clone());
        }
        let settlements = batch.iter().map(|d| (d, Settlement::Ack)).collect();
        for result in watching.settle(settlements).await {
            result.unwrap();
        }
    }
    watching.close().await.unwrap();
    seen
}

/// Waits until at least `count` messages have arrived; how many had.
async fn wait_for_some(watching: Box<dyn Subscription>, count: usize) -> usize {
    let give_up = tokio::time::Instant::now() + LIMIT;
    let mut seen = 0;
    while seen < count {
        assert!(
            tokio::time::Instant::now() < give_up,
            "{seen} of {count} messages arrived within {LIMIT:?}"
        );
        let batch = watching
            .fetch(1000, Duration::from_millis(100))
            .await
            .unwrap();
        seen += batch.len();
        let acks = batch.iter().map(|d| (d, Settlement::Ack)).collect();
        watching.settle(acks).await;
    }
    watching.close().await.unwrap();
    seen
}

/// `total` messages on `<ns>.orders.eu` and `.us`, and the topic each must
/// arrive under, by id.
fn orders(ns: &str, total: usize) -> (Vec<Message>, HashMap<String, String>) {
    let messages: Vec<Message> = (0..total)
        .map(|i| {
            let region = ["eu", "us"][i % 2];
            Message::new(format!("{ns}.orders.{region}"), format!("order {i}"))
        })
        .collect();
    let renamed = messages
        .iter()
        .map(|m| (m.id.clone(), m.topic.replace(".orders.", ".moved.")))
        .collect();
    (messages, renamed)
}

async fn publish(backend: &Arc<dyn Backend>, messages: &[Message]) {
    for chunk in messages.chunks(1000) {
        backend.publish(chunk.to_vec()).await.unwrap();
    }
}

/// Checks that every message of `sent` arrived, under its renamed topic;
/// how many of those arrived more than once.
fn every_one_arrived(sent: &HashMap<String, String>, got: &HashMap<String, Vec<String>>) -> usize {
    let missing = sent.keys().filter(|id| !got.contains_key(*id)).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} messages never forwarded",
        sent.len()
    );
    for (id, expected) in sent {
        let topics = &got[id];
        assert!(
            topics.iter().all(|t| t == expected),
            "{id}: {topics:?}, not {expected}"
        );
    }
    sent.keys().map(|id| got[id].len() - 1).sum()
}

/// A bridge from `from` to `to` forwards `total` messages although its
/// host is SIGKILLed part way and started again, and each broker that can
/// be restarted is, the source's while the host is down, the target's
/// while the second host forwards. Every message arrives, under its
/// renamed topic, with its id; returns how many arrived more than once.
async fn bridge_survives_kills_and_restarts(
    total: usize,
    from: (&str, Option<&dyn Target>),
    to: (&str, Option<&dyn Target>),
) -> usize {
    let ns = unique("bridge");
    let dir = tempfile::tempdir().unwrap();
    let config = bridge_config(&ns, dir.path(), from.0, to.0);
    let source = backend::connect(from.0).await.unwrap();
    let (messages, sent) = orders(&ns, total);
    publish(&source, &messages).await;
    let target = backend::connect(to.0).await.unwrap();
    let moved = format!("{ns}.moved.>");
    let (counting, peeking) = (
        watch(&target, &moved, "count").await,
        watch(&target, &moved, "peek").await,
    );

    let host = Host::start(&config);
    host.wait_subscribed(1);
    // Killed mid-run: once a tenth has arrived.
    let before_kill = wait_for_some(peeking, total / 10).await;
    host.kill();
    if let Some(server) = from.1 {
        server.restart().await.unwrap();
    }
    // Idle for longer than the lease, so that what the killed host held
    // has come back and been forwarded before the second one exits.
    let host = Host::start_with(&config, &["--exit-when-idle", "8"]);
    host.wait_subscribed(1);
    if let Some(server) = to.1 {
        std::thread::sleep(Duration::from_millis(500));
        server.restart().await.unwrap();
    }
    host.wait(Duration::from_secs(600));

    let got = arrived(counting).await;
    assert!(before_kill < total, "the bridge was done before the kill");
    let duplicates = every_one_arrived(&sent, &got);
    assert_eq!(got.len(), total, "only what was sent arrives");
    println!(
        "bridge {} -> {}: {total} messages, {before_kill} before SIGKILL, none lost, \
         {duplicates} duplicate(s)",
        from.0, to.0
    );
    duplicates
}

/// SQLite to JetStream: JetStream drops what the bridge sends twice,
/// since the forwarded message keeps its id (`Nats-Msg-Id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_from_sqlite_to_jetstream_loses_nothing_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!(
        "sqlite://{}?poll_ms=20",
        dir.path().join("old.db").display()
    );
    let jetstream = Nats::jetstream();
    let duplicates = bridge_survives_kills_and_restarts(
        20_000,
        (&sqlite, None),
        (&jetstream.url(""), Some(&jetstream)),
    )
    .await;
    assert_eq!(duplicates, 0, "JetStream kept a repeated id");
}

/// Redis Streams (its append-only file fsynced on every write) to
/// PostgreSQL, both servers restarted.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_from_redis_streams_to_postgres_loses_nothing() {
    let redis = Redis::streams();
    let postgres = Postgres::new();
    bridge_survives_kills_and_restarts(
        20_000,
        (&redis.url(), Some(&redis)),
        (&postgres.url(), Some(&postgres)),
    )
    .await;
}

/// JetStream to Kafka; JetStream restarted while the bridge is down (the
/// broker here keeps Kafka's messages in memory, so restarting it would
/// lose them whatever the bridge did).
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_from_jetstream_to_kafka_loses_nothing() {
    let jetstream = Nats::jetstream();
    let kafka = Server::tansu();
    bridge_survives_kills_and_restarts(
        20_000,
        (&jetstream.url(""), Some(&jetstream)),
        (&kafka.kafka_url(""), None),
    )
    .await;
}

/// NATS core to SQS. NATS core keeps nothing: what reaches a subscriber
/// that dies with it is gone, as is what is published while nobody
/// subscribes. So: a first host killed while it forwards, NATS restarted,
/// a second host, and a second lot published once it subscribed, all of
/// which must arrive; of the first lot, what the killed host held is lost
/// and counted.
#[cfg(feature = "sqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_from_nats_core_to_sqs_loses_only_what_nats_core_cannot_keep() {
    let nats = Nats::core();
    let moto = Server::moto();
    let ns = unique("bridge");
    let dir = tempfile::tempdir().unwrap();
    let to = moto.aws_url("sqs", "bridge", "");
    let config = bridge_config(&ns, dir.path(), &nats.url(""), &to);
    let target = backend::connect(&to).await.unwrap();
    let moved = format!("{ns}.moved.>");
    let (counting, peeking) = (
        watch(&target, &moved, "count").await,
        watch(&target, &moved, "peek").await,
    );

    let host = Host::start(&config);
    host.wait_subscribed(1);
    // Few: the SQS emulator slows down as its queues fill.
    let (first, first_sent) = orders(&ns, 300);
    publish(&nats.open().await.unwrap(), &first).await;
    let before_kill = wait_for_some(peeking, 30).await;
    host.kill();
    nats.restart().await.unwrap();

    // The host's idle clock starts when it subscribes, and NATS core
    // drops what is published once it has gone: the publisher connects
    // first, and the host waits long enough for a loaded machine.
    let publisher = nats.open().await.unwrap();
    let host = Host::start_with(&config, &["--exit-when-idle", "20"]);
    host.wait_subscribed(1);
    let (second, second_sent) = orders(&ns, 300);
    publish(&publisher, &second).await;
    host.wait(Duration::from_secs(600));

    let got = arrived(counting).await;
    let duplicates = every_one_arrived(&second_sent, &got);
    let lost = first_sent
        .keys()
        .filter(|id| !got.contains_key(*id))
        .count();
    println!(
        "bridge nats -> sqs: {} published before SIGKILL ({before_kill} forwarded by then), \
         {lost} of them lost with the killed host; {} published after, none lost; \
         {duplicates} duplicate(s)",
        first.len(),
        second.len()
    );
}
