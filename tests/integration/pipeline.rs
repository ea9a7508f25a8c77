//! End to end through the host: real plugins built from `plugins/`, run by
//! wasmtime, on the in-memory and SQLite backends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use sluice::Message;
use sluice::backend::memory::MemoryBackend;
use sluice::backend::{
    Backend, Capabilities, Delivery, SettleError, SubscribeOptions, Subscription,
};
use sluice::message::headers;
use sluice_tests::common;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn success_path_transforms_and_publishes() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(
            &runtime,
            "uppercase",
            settings("uppercase", &[("output", "out")]),
        );
        let outputs = Collector::start(&backend, &["out"]).await;
        let running = Running::start(route("upper", &backend, "in", plugin, quick_retry(3))).await;
        let input = Message::new("in", "hello sluice")
            .with_key("k1")
            .with_header("trace", "t-1");
        backend.publish(vec![input.clone()]).await.unwrap();

        let got = outputs.wait_for(1, LIMIT).await.unwrap();
        assert_eq!(got.len(), 1, "{kind}");
        assert_eq!(text(&got[0]), "HELLO SLUICE", "{kind}");
        assert_eq!(got[0].key.as_deref(), Some("k1"), "{kind}");
        assert_eq!(got[0].header("trace"), Some("t-1"), "{kind}");
        assert_eq!(got[0].header("processed-by"), Some("uppercase"), "{kind}");
        assert_eq!(
            got[0].header(headers::CAUSATION_ID),
            Some(input.id.as_str()),
            "{kind}"
        );
        let stats = running.stats.snapshot();
        running.stop().await;
        assert_eq!(
            (stats.succeeded, stats.retried, stats.dead_lettered),
            (1, 0, 0),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn retry_then_success() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "chaos", settings("chaos", &[]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let running = Running::start(route("flaky", &backend, "in", plugin, quick_retry(5))).await;
        backend
            .publish(vec![Message::new("in", "retry:2")])
            .await
            .unwrap();

        let got = outputs.wait_for(1, LIMIT).await.unwrap();
        assert_eq!(got.len(), 1, "{kind}");
        assert_eq!(
            got[0].header("attempt"),
            Some("3"),
            "{kind}: succeeded on the third attempt"
        );
        let stats = running.stats.snapshot();
        running.stop().await;
        assert_eq!(
            (stats.succeeded, stats.retried, stats.dead_lettered),
            (1, 2, 0),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn reject_goes_straight_to_dead_letter_with_reason() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "chaos", settings("chaos", &[]));
        let letters = Collector::start(&backend, &["strict.dead-letter"]).await;
        let outputs = Collector::start(&backend, &["out"]).await;
        let running =
            Running::start(route("strict", &backend, "orders", plugin, quick_retry(5))).await;
        let input = Message::new("orders", "reject").with_key("order-7");
        backend.publish(vec![input.clone()]).await.unwrap();

        let got = letters.wait_for(1, LIMIT).await.unwrap();
        let letter = &got[0];
        assert_eq!(text(letter), "reject", "{kind}: payload kept");
        assert_eq!(letter.key.as_deref(), Some("order-7"), "{kind}");
        assert_eq!(
            letter.header(headers::DEAD_LETTER_CAUSE),
            Some("rejected"),
            "{kind}"
        );
        assert_eq!(
            letter.header(headers::DEAD_LETTER_REASON),
            Some("asked to reject"),
            "{kind}"
        );
        assert_eq!(
            letter.header(headers::ORIGINAL_TOPIC),
            Some("orders"),
            "{kind}"
        );
        assert_eq!(
            letter.header(headers::ORIGINAL_ID),
            Some(input.id.as_str()),
            "{kind}"
        );
        assert_eq!(letter.header(headers::ATTEMPTS), Some("1"), "{kind}");
        assert_eq!(letter.header(headers::ROUTE), Some("strict"), "{kind}");
        assert!(
            outputs.now().is_empty(),
            "{kind}: no output for a rejected message"
        );
        let stats = running.stats.snapshot();
        running.stop().await;
        assert_eq!((stats.retried, stats.dead_lettered), (0, 1), "{kind}");
    }
}

#[tokio::test]
async fn exhausted_attempts_go_to_dead_letter() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "chaos", settings("chaos", &[]));
        let letters = Collector::start(&backend, &["stubborn.dead-letter"]).await;
        let running =
            Running::start(route("stubborn", &backend, "in", plugin, quick_retry(3))).await;
        backend
            .publish(vec![Message::new("in", "retry")])
            .await
            .unwrap();

        let got = letters.wait_for(1, LIMIT).await.unwrap();
        assert_eq!(got.len(), 1, "{kind}");
        assert_eq!(
            got[0].header(headers::DEAD_LETTER_CAUSE),
            Some("attempts-exhausted"),
            "{kind}"
        );
        assert_eq!(got[0].header(headers::ATTEMPTS), Some("3"), "{kind}");
        let reason = got[0].header(headers::DEAD_LETTER_REASON).unwrap();
        assert!(reason.contains("asked to retry"), "{kind}: {reason}");
        let stats = running.stats.snapshot();
        running.stop().await;
        assert_eq!(
            (stats.received, stats.retried, stats.dead_lettered),
            (3, 2, 1),
            "{kind}"
        );
    }
}

/// A plugin failure of each kind is retried, then dead-lettered; the host
/// keeps running and the next message succeeds on a fresh instance.
async fn plugin_failure_is_contained(command: &str, expected_reason: &str) {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let mut plugin_settings = settings("chaos", &[]);
        plugin_settings.timeout = Duration::from_millis(200);
        plugin_settings.memory_limit = 16 << 20;
        let plugin = load(&runtime, "chaos", plugin_settings);
        let letters = Collector::start(&backend, &["fragile.dead-letter"]).await;
        let outputs = Collector::start(&backend, &["out"]).await;
        let running =
            Running::start(route("fragile", &backend, "in", plugin, quick_retry(2))).await;
        backend
            .publish(vec![Message::new("in", command), Message::new("in", "ok")])
            .await
            .unwrap();

        let got = letters.wait_for(1, LIMIT).await.unwrap();
        let reason = got[0].header(headers::DEAD_LETTER_REASON).unwrap();
        assert!(
            reason.contains(expected_reason),
            "{kind}/{command}: {reason}"
        );
        assert_eq!(
            got[0].header(headers::ATTEMPTS),
            Some("2"),
            "{kind}/{command}"
        );
        let ok = outputs.wait_for(1, LIMIT).await.unwrap();
        assert_eq!(
            text(&ok[0]),
            "ok",
            "{kind}/{command}: host alive after the failure"
        );
        let stats = running.stats.snapshot();
        running.stop().await;
        assert_eq!(
            stats.plugin_errors, 2,
            "{kind}/{command}: one error per attempt"
        );
        assert_eq!(stats.succeeded, 1, "{kind}/{command}");
    }
}

#[tokio::test]
async fn trapping_plugin_is_retried_and_host_stays_up() {
    plugin_failure_is_contained("panic", "trap").await;
}

#[tokio::test]
async fn infinite_loop_is_stopped_at_the_deadline() {
    plugin_failure_is_contained("loop", "deadline").await;
}

#[tokio::test]
async fn memory_bomb_is_stopped_at_the_cap() {
    plugin_failure_is_contained("oom", "memory limit of 16 MiB").await;
}

#[tokio::test]
async fn plugins_have_no_ambient_authority() {
    let runtime = runtime();
    let backend = sluice::backend::connect("memory://").await.unwrap();
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("SLUICE_TEST_SECRET", "hunter2") };
    let outputs = Collector::start(&backend, &["out"]).await;
    let plugin = load(&runtime, "chaos", settings("chaos", &[]));
    let running = Running::start(route("probe", &backend, "in", plugin, quick_retry(1))).await;
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    backend
        .publish(vec![
            Message::new("in", "env:SLUICE_TEST_SECRET"),
            Message::new("in", format!("read:{manifest}")),
        ])
        .await
        .unwrap();
    let got = outputs.wait_for(2, LIMIT).await.unwrap();
    assert_eq!(text(&got[0]), "<unset>", "host environment is not visible");
    assert!(
        text(&got[1]).starts_with("<denied"),
        "host files are not visible: {}",
        text(&got[1])
    );
    running.stop().await;

    // Granted explicitly, both become visible.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("greeting.txt"), "hello from the host").unwrap();
    let mut granted = settings("chaos", &[]);
    granted.env.insert("GRANTED".into(), "yes".into());
    granted
        .read_dirs
        .insert("/data".into(), dir.path().to_path_buf());
    let outputs = Collector::start(&backend, &["out"]).await;
    let plugin = load(&runtime, "chaos", granted);
    let running = Running::start(route("probe2", &backend, "in2", plugin, quick_retry(1))).await;
    backend
        .publish(vec![
            Message::new("in2", "env:GRANTED"),
            Message::new("in2", "read:/data/greeting.txt"),
        ])
        .await
        .unwrap();
    let got = outputs.wait_for(2, LIMIT).await.unwrap();
    assert_eq!(text(&got[0]), "yes");
    assert_eq!(text(&got[1]), "hello from the host");
    running.stop().await;
}

#[tokio::test]
async fn host_publish_is_limited_to_granted_topics() {
    let runtime = runtime();
    let backend = sluice::backend::connect("memory://").await.unwrap();
    let mut limited = settings("chaos", &[]);
    limited.publish_to = vec!["out".into(), "side.*".into()];
    let plugin = load(&runtime, "chaos", limited);
    let outputs = Collector::start(&backend, &["out", "side.*", "elsewhere"]).await;
    let letters = Collector::start(&backend, &["pub.dead-letter"]).await;
    let running = Running::start(route("pub", &backend, "in", plugin, quick_retry(1))).await;
    backend
        .publish(vec![
            Message::new("in", "publish:side.a"),
            Message::new("in", "publish:elsewhere"),
        ])
        .await
        .unwrap();
    let got = outputs.wait_for(2, LIMIT).await.unwrap();
    let mut topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    topics.sort();
    assert_eq!(topics, ["out", "side.a"]);
    let letters = letters.wait_for(1, LIMIT).await.unwrap();
    let reason = letters[0].header(headers::DEAD_LETTER_REASON).unwrap();
    assert!(
        reason.contains("may not publish to `elsewhere`"),
        "{reason}"
    );
    running.stop().await;
}

#[tokio::test]
async fn ordered_route_keeps_per_key_order() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "echo", settings("echo", &[("output", "out")]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let mut ordered = route("ordered", &backend, "in", plugin, quick_retry(3));
        ordered.spec.ordered = true;
        ordered.spec.concurrency = 4;
        let running = Running::start(ordered).await;
        let mut batch = Vec::new();
        for i in 0..50 {
            for key in ["a", "b", "c", "d", "e"] {
                batch.push(Message::new("in", format!("{key}:{i}")).with_key(key));
            }
        }
        backend.publish(batch).await.unwrap();
        let got = outputs.wait_for(250, LIMIT).await.unwrap();
        for key in ["a", "b", "c", "d", "e"] {
            let seen: Vec<String> = got
                .iter()
                .filter(|m| m.key.as_deref() == Some(key))
                .map(text)
                .collect();
            let expected: Vec<String> = (0..50).map(|i| format!("{key}:{i}")).collect();
            assert_eq!(seen, expected, "{kind}: key {key} out of order");
        }
        running.stop().await;
    }
}

/// At shutdown an ordered route sends a retried message back to the
/// backend, and with it the later messages of its key it already holds,
/// unhandled: on a backend that hands out several messages of a key at
/// once, none of them overtakes the retry.
#[tokio::test]
async fn a_retry_sent_back_at_shutdown_takes_its_keys_later_messages_with_it() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let outputs = Collector::start(&backend, &["out"]).await;
        let ordered_route = || {
            let plugin = load(&runtime, "chaos", settings("chaos", &[]));
            let mut retry = quick_retry(10);
            retry.initial_backoff = Duration::from_millis(300);
            retry.max_backoff = retry.initial_backoff;
            let mut ordered = route("held", &backend, "in", plugin, retry);
            ordered.spec.ordered = true;
            ordered.spec.concurrency = 1;
            ordered
        };
        let running = Running::start(ordered_route()).await;
        let keyed = |text: &str| Message::new("in", text.to_string()).with_key("k");
        backend
            .publish(vec![keyed("retry:1"), keyed("after-1"), keyed("after-2")])
            .await
            .unwrap();
        let give_up = tokio::time::Instant::now() + LIMIT;
        while running.stats.snapshot().retried == 0 {
            assert!(tokio::time::Instant::now() < give_up, "{kind}: no retry");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Stopped during the retry's backoff.
        running.stop().await;

        let running = Running::start(ordered_route()).await;
        let got = outputs.wait_for(3, LIMIT).await.unwrap();
        running.stop().await;
        let order: Vec<String> = got.iter().map(text).collect();
        assert_eq!(order, ["retry:1", "after-1", "after-2"], "{kind}");
    }
}

#[tokio::test]
async fn concurrent_workers_lose_nothing() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "echo", settings("echo", &[("output", "out")]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let mut wide = route("wide", &backend, "in", plugin, quick_retry(3));
        wide.spec.concurrency = 4;
        let running = Running::start(wide).await;
        let inputs: Vec<Message> = (0..500)
            .map(|i| Message::new("in", format!("m{i}")))
            .collect();
        backend.publish(inputs).await.unwrap();
        let got = outputs.wait_for(500, LIMIT).await.unwrap();
        let mut payloads: Vec<String> = got.iter().map(text).collect();
        payloads.sort();
        payloads.dedup();
        assert_eq!(payloads.len(), 500, "{kind}: every message exactly once");
        let stats = running.stats.snapshot();
        running.stop().await;
        assert_eq!(stats.succeeded, 500, "{kind}");
        assert_eq!(running_in_flight_after_stop(&stats), 0, "{kind}");
    }
}

fn running_in_flight_after_stop(stats: &sluice::router::StatsSnapshot) -> i64 {
    stats.in_flight
}

/// Slow handlers and a short lease: the router fetches no more than its
/// workers can start within the lease, so no delivery waits in a lane until
/// its lease runs out and comes back while the first copy is still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_never_outlasts_the_lease() {
    const MESSAGES: usize = 150;
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "chaos", settings("chaos", &[]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let mut slow = route("slow", &backend, "in", plugin, quick_retry(3));
        slow.spec.concurrency = 2;
        slow.spec.subscribe.lease = Duration::from_millis(1_500);
        let running = Running::start(slow).await;
        // 150 × 30 ms over 2 workers: about twice the lease in all.
        let inputs: Vec<Message> = (0..MESSAGES)
            .map(|_| Message::new("in", "sleep:30"))
            .collect();
        backend.publish(inputs).await.unwrap();
        let got = outputs.wait_for(MESSAGES, LIMIT).await.unwrap();
        // Anything handled twice would show up within a lease.
        tokio::time::sleep(Duration::from_millis(1_600)).await;
        let stats = running.stats.snapshot();
        running.stop().await;
        let mut inputs: Vec<&str> = got
            .iter()
            .filter_map(|m| m.header(headers::CAUSATION_ID))
            .collect();
        inputs.sort();
        inputs.dedup();
        assert_eq!(inputs.len(), MESSAGES, "{kind}: every input handled");
        assert_eq!(
            stats.received, MESSAGES as u64,
            "{kind}: deliveries came back while queued ({stats})"
        );
    }
}

/// A settlement the backend calls fatal stops the route by itself, with
/// that error, while the rest of the host (here: the caller) carries on.
#[tokio::test]
async fn a_fatal_settlement_stops_the_route_with_its_error() {
    let runtime = runtime();
    let backend: Arc<dyn Backend> =
        Arc::new(FailingAcks(Arc::new(MemoryBackend::new(100)), || {
            SettleError::Fatal(anyhow::anyhow!("permission denied"))
        }));
    let plugin = load(&runtime, "chaos", settings("chaos", &[]));
    let doomed = route("doomed", &backend, "in", plugin, quick_retry(3));
    let subscribed = doomed.subscribe().await.unwrap();
    backend
        .publish(vec![Message::new("in", "ok")])
        .await
        .unwrap();
    let outcome = tokio::time::timeout(LIMIT, subscribed.run(CancellationToken::new()))
        .await
        .expect("the route stops by itself");
    let error = format!("{:#}", outcome.expect_err("a fatal error"));
    assert!(
        error.contains("doomed") && error.contains("permission denied"),
        "{error}"
    );
}

/// A lost lease is counted and dropped: the plugin is not run again for
/// it, nor is it retried, and the route carries on.
#[tokio::test]
async fn a_lost_lease_is_counted_and_not_handled_again() {
    let runtime = runtime();
    let backend: Arc<dyn Backend> =
        Arc::new(FailingAcks(Arc::new(MemoryBackend::new(100)), || {
            SettleError::LeaseLost
        }));
    let plugin = load(&runtime, "chaos", settings("chaos", &[]));
    let outputs = Collector::start(&backend, &["out"]).await;
    let running = Running::start(route("late", &backend, "in", plugin, quick_retry(3))).await;
    backend
        .publish(vec![Message::new("in", "ok")])
        .await
        .unwrap();
    outputs.wait_for(1, LIMIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = running.stats.snapshot();
    running.stop().await;
    assert_eq!(
        (
            stats.received,
            stats.lease_lost,
            stats.succeeded,
            stats.retried
        ),
        (1, 1, 0, 0),
        "{stats}"
    );
    assert_eq!(outputs.wait_for(1, LIMIT).await.unwrap().len(), 1);
}

/// A backend whose acks all fail with one error.
struct FailingAcks(Arc<dyn Backend>, fn() -> SettleError);

#[async_trait]
impl Backend for FailingAcks {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    async fn publish(&self, messages: Vec<Message>) -> anyhow::Result<()> {
        self.0.publish(messages).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> anyhow::Result<Box<dyn Subscription>> {
        Ok(Box::new(FailingAcksSubscription(
            self.0.subscribe(options).await?,
            self.1,
        )))
    }
}

struct FailingAcksSubscription(Box<dyn Subscription>, fn() -> SettleError);

#[async_trait]
impl Subscription for FailingAcksSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> anyhow::Result<Vec<Delivery>> {
        self.0.fetch(max, wait).await
    }

    async fn ack(&self, _: &Delivery) -> anyhow::Result<()> {
        Err((self.1)().into())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> anyhow::Result<()> {
        self.0.nack(delivery, delay).await
    }

    async fn close(&self) -> anyhow::Result<()> {
        self.0.close().await
    }
}

/// However many messages wait, no more than `max_in_flight` are between
/// fetched and settled at any moment.
#[tokio::test]
async fn in_flight_deliveries_stay_within_max_in_flight() {
    const MAX_IN_FLIGHT: usize = 6;
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "chaos", settings("chaos", &[]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let mut bounded = route("bounded", &backend, "in", plugin, quick_retry(3));
        bounded.spec.concurrency = 3;
        bounded.spec.max_in_flight = MAX_IN_FLIGHT;
        let running = Running::start(bounded).await;
        let inputs: Vec<Message> = (0..60).map(|_| Message::new("in", "sleep:5")).collect();
        backend.publish(inputs).await.unwrap();
        let watch = running.stats.clone();
        let most = tokio::spawn(async move {
            let mut most = 0;
            while watch.succeeded.load(Ordering::Relaxed) < 60 {
                most = most.max(watch.in_flight.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            most
        });
        outputs.wait_for(60, LIMIT).await.unwrap();
        let most = most.await.unwrap();
        running.stop().await;
        assert!(most > 0, "{kind}: never saw a delivery in flight");
        assert!(
            most <= MAX_IN_FLIGHT as i64,
            "{kind}: {most} in flight with max_in_flight {MAX_IN_FLIGHT}"
        );
    }
}

#[tokio::test]
async fn invalid_and_wrong_world_components_are_refused() {
    let runtime = runtime();
    let not_wasm = runtime.load(b"this is not wasm", settings("junk", &[]));
    let error = format!("{:#}", not_wasm.err().expect("refused"));
    assert!(
        error.contains("not a valid WebAssembly component"),
        "{error}"
    );

    let wrong = runtime.load_file(&plugin_path("wrong_world"), settings("wrong", &[]));
    let error = format!("{:#}", wrong.err().expect("refused"));
    assert!(
        error.contains("does not implement the `sluice:plugin/handler@0.2.0` world"),
        "{error}"
    );
    assert!(
        error.contains("handle"),
        "names the missing export: {error}"
    );
    assert!(
        error.contains("process"),
        "names what it exports instead: {error}"
    );
}

#[tokio::test]
async fn graceful_stop_settles_in_flight_work() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "echo", settings("echo", &[("output", "out")]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let mut wide = route("drain", &backend, "in", plugin, quick_retry(3));
        wide.spec.concurrency = 2;
        let stats = wide.stats.clone();
        let running = Running::start(wide).await;
        let inputs: Vec<Message> = (0..200)
            .map(|i| Message::new("in", format!("m{i}")))
            .collect();
        backend.publish(inputs).await.unwrap();
        outputs.wait_for(1, LIMIT).await.unwrap();
        running.stop().await;
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.in_flight, 0, "{kind}: nothing left unsettled");
        assert_eq!(
            snapshot.received, snapshot.succeeded,
            "{kind}: every fetched message settled"
        );
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
    }
}

/// Publishes `inputs` to a subscribed route before it runs, so its fetcher
/// finds them waiting and its workers gather batches; runs it until
/// `collectors` have their counts, then stops it.
async fn run_over(
    route: sluice::router::Route,
    backend: &std::sync::Arc<dyn sluice::backend::Backend>,
    inputs: Vec<Message>,
    collectors: &[(&Collector, usize)],
) -> Vec<Vec<Message>> {
    let subscribed = route.subscribe().await.expect("route subscribes");
    backend.publish(inputs).await.unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(subscribed.run(token.clone()));
    let mut got = Vec::new();
    for (collector, count) in collectors {
        got.push(collector.wait_for(*count, LIMIT).await.unwrap());
    }
    token.cancel();
    task.await.unwrap().expect("route ran");
    got
}

#[tokio::test]
async fn a_batch_handler_settles_each_message_by_its_own_result() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "batch", settings("batch", &[]));
        assert!(plugin.batches());
        let outputs = Collector::start(&backend, &["out"]).await;
        let letters = Collector::start(&backend, &["mixed.dead-letter"]).await;
        let mut mixed = route("mixed", &backend, "in", plugin, quick_retry(3));
        mixed.spec.batch_size = 8;
        mixed.spec.concurrency = 4;
        let stats = mixed.stats.clone();
        let mut payloads: Vec<String> = (0..10).map(|i| format!("ok-{i}")).collect();
        for (at, special) in [
            (1, "retry"),
            (3, "reject"),
            (5, "trap"),
            (7, "retry"),
            (9, "reject"),
        ] {
            payloads.insert(at, special.to_string());
        }
        let inputs: Vec<Message> = payloads
            .iter()
            .map(|p| Message::new("in", p.as_str()))
            .collect();
        let ids: std::collections::HashMap<String, Vec<String>> =
            inputs.iter().fold(Default::default(), |mut ids, m| {
                ids.entry(text(m)).or_default().push(m.id.clone());
                ids
            });
        let got = run_over(mixed, &backend, inputs, &[(&outputs, 12), (&letters, 3)]).await;
        let (outs, dead) = (&got[0], &got[1]);

        // Every output was published once, caused by its own input.
        let mut published: Vec<String> = outs.iter().map(text).collect();
        published.sort();
        let mut expected: Vec<String> = (0..10).map(|i| format!("ok-{i}")).collect();
        expected.extend(["retry".to_string(), "retry".to_string()]);
        expected.sort();
        assert_eq!(published, expected, "{kind}");
        for out in outs.iter() {
            let cause = out.header(headers::CAUSATION_ID).unwrap_or_default();
            assert!(
                ids[&text(out)].iter().any(|id| id == cause),
                "{kind}: {out:?}"
            );
        }
        let widest = outs
            .iter()
            .filter_map(|m| m.header("batch")?.split_once('/')?.1.parse::<usize>().ok())
            .max();
        assert!(
            widest.is_some_and(|n| n > 1),
            "{kind}: no message was handled in a batch: {outs:?}"
        );

        // Rejects were dead-lettered at once; the trap only after its own
        // attempts, without taking its batch with it.
        let mut letters: Vec<(String, String, String)> = dead
            .iter()
            .map(|m| {
                let header = |name| m.header(name).unwrap_or_default().to_string();
                (
                    text(m),
                    header(headers::DEAD_LETTER_CAUSE),
                    header(headers::ATTEMPTS),
                )
            })
            .collect();
        letters.sort();
        let letter = |p: &str, c: &str, a: &str| (p.to_string(), c.to_string(), a.to_string());
        assert_eq!(
            letters,
            vec![
                letter("reject", "rejected", "1"),
                letter("reject", "rejected", "1"),
                letter("trap", "attempts-exhausted", "3"),
            ],
            "{kind}"
        );
        let stats = stats.snapshot();
        assert_eq!(
            (stats.succeeded, stats.retried, stats.dead_lettered),
            (12, 4, 3),
            "{kind}: two retries, and the trap's two"
        );
    }
}

#[tokio::test]
async fn components_built_against_the_0_1_0_world_still_run() {
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "handler_v0_1", settings("old", &[]));
        assert_eq!(plugin.world(), sluice::runtime::WORLD_0_1);
        assert!(!plugin.batches());
        let outputs = Collector::start(&backend, &["out"]).await;
        let sides = Collector::start(&backend, &["side"]).await;
        let letters = Collector::start(&backend, &["old.dead-letter"]).await;
        // A batch size means nothing to a plugin without `handle-batch`.
        let mut old = route("old", &backend, "in", plugin, quick_retry(3));
        old.spec.batch_size = 8;
        let inputs = ["a", "retry", "reject", "publish:side", "b"]
            .map(|p| Message::new("in", p))
            .to_vec();
        let got = run_over(
            old,
            &backend,
            inputs,
            &[(&outputs, 4), (&sides, 1), (&letters, 1)],
        )
        .await;
        let mut published: Vec<String> = got[0].iter().map(text).collect();
        published.sort();
        assert_eq!(published, ["a", "b", "publish:side", "retry"], "{kind}");
        assert!(
            got[0].iter().all(|m| m.header("world") == Some("0.1.0")),
            "{kind}"
        );
        assert_eq!(text(&got[1][0]), "side", "{kind}: the host's publish");
        assert_eq!(text(&got[2][0]), "reject", "{kind}");
    }
}

#[tokio::test]
async fn a_batch_call_may_not_publish_and_must_answer_every_message() {
    use sluice::router::{MessageHandler, WasmHandler};
    use sluice::runtime::{CallError, Outcome};

    let runtime = runtime();
    let handler = WasmHandler::new(load(&runtime, "batch", settings("batch", &[])));
    let mut worker = handler.worker();
    let publishing = Message::new("in", "publish:side");
    let plain = Message::new("in", "x");

    let results = worker.handle_batch(&[(&publishing, 1), (&plain, 1)]).await;
    assert!(
        matches!(&results[0], Ok(Outcome::Reject(reason))
            if reason.contains("`publish` is not available during `handle-batch`")),
        "{results:?}"
    );
    assert!(
        matches!(&results[1], Ok(Outcome::Outputs(o)) if o.len() == 1),
        "{results:?}"
    );
    // One message per call, the same plugin may publish.
    let Ok(Outcome::Outputs(outputs)) = worker.handle(&publishing, 1).await else {
        panic!("publishing alone succeeds");
    };
    let topics: Vec<&str> = outputs.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["side", "out"]);

    let short = Message::new("in", "short");
    let results = worker.handle_batch(&[(&plain, 1), (&short, 1)]).await;
    assert_eq!(results.len(), 2);
    for result in &results {
        assert!(
            matches!(result, Err(CallError::Trap(reason))
                if reason.contains("returned 1 result(s) for 2 messages")),
            "{results:?}"
        );
    }
}

/// The trace id and parent id of a `traceparent`.
fn trace_parts(message: &Message) -> (String, String) {
    let value = message
        .header(headers::TRACEPARENT)
        .unwrap_or_else(|| panic!("no traceparent on {message:?}"));
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!((parts[0], parts[3]), ("00", "01"), "{value}");
    (parts[1].to_string(), parts[2].to_string())
}

/// W3C trace context follows a message through two routes and into a dead
/// letter: every hop stays in the input's trace, with a parent of its own.
#[tokio::test]
async fn trace_context_follows_a_message_through_two_routes_and_a_dead_letter() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let runtime = runtime();
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new(1000));
    let upper = |output| {
        load(
            &runtime,
            "uppercase",
            settings("uppercase", &[("output", output)]),
        )
    };
    let middle = Collector::start(&backend, &["mid"]).await;
    let outputs = Collector::start(&backend, &["out"]).await;
    let letters = Collector::start(&backend, &["strict.dead-letter"]).await;
    let first = Running::start(route("first", &backend, "in", upper("mid"), quick_retry(3))).await;
    let second = Running::start(route(
        "second",
        &backend,
        "mid",
        upper("out"),
        quick_retry(3),
    ))
    .await;
    let chaos = load(&runtime, "chaos", settings("chaos", &[]));
    let strict = Running::start(route("strict", &backend, "orders", chaos, quick_retry(3))).await;

    let traced = |topic: &str, payload: &str| {
        Message::new(topic, payload)
            .with_header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .with_header("tracestate", "vendor=1")
    };
    backend
        .publish(vec![
            traced("in", "hello"),
            traced("orders", "reject"),
            Message::new("in", "untraced"),
        ])
        .await
        .unwrap();

    let mid = middle.wait_for(2, LIMIT).await.unwrap();
    let out = outputs.wait_for(2, LIMIT).await.unwrap();
    let letter = &letters.wait_for(1, LIMIT).await.unwrap()[0];
    let find = |messages: &[Message], payload: &str| {
        messages
            .iter()
            .find(|m| text(m) == payload)
            .cloned()
            .unwrap_or_else(|| panic!("no {payload} in {messages:?}"))
    };
    let (mid_trace, mid_parent) = trace_parts(&find(&mid, "HELLO"));
    let (out_trace, out_parent) = trace_parts(&find(&out, "HELLO"));
    assert_eq!((mid_trace.as_str(), out_trace.as_str()), (TRACE, TRACE));
    assert!(mid_parent != PARENT && out_parent != PARENT && mid_parent != out_parent);
    assert_eq!(find(&out, "HELLO").header("tracestate"), Some("vendor=1"));
    let (letter_trace, letter_parent) = trace_parts(letter);
    assert_eq!(letter_trace, TRACE);
    assert_ne!(letter_parent, PARENT);

    // A message that came without a trace starts one, which the next
    // route continues.
    let (new_trace, _) = trace_parts(&find(&mid, "UNTRACED"));
    assert_ne!(new_trace, TRACE);
    assert_eq!(trace_parts(&find(&out, "UNTRACED")).0, new_trace);

    for running in [first, second, strict] {
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_holds_a_route_to_its_rate() {
    const RATE: f64 = 200.0;
    const COUNT: usize = 300;
    let runtime = runtime();
    for (kind, backend, _dir) in embedded_backends().await {
        let plugin = load(&runtime, "chaos", settings("chaos", &[]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let mut limited = route("limited", &backend, "in", plugin, quick_retry(3));
        limited.spec.concurrency = 4;
        limited.spec.max_rate = Some(RATE);
        let inputs: Vec<Message> = (0..COUNT).map(|_| Message::new("in", "ok")).collect();
        let started = std::time::Instant::now();
        run_over(limited, &backend, inputs, &[(&outputs, COUNT)]).await;
        let elapsed = started.elapsed().as_secs_f64();
        // The bucket starts with a tenth of a second's worth; the rest
        // comes at the rate. Within a tenth above it, however fast the
        // machine is.
        let burst = RATE / 10.0;
        let fastest = (COUNT as f64 - burst) / (RATE * 1.1);
        assert!(
            elapsed >= fastest,
            "{kind}: {COUNT} messages in {elapsed:.2} s at max_rate {RATE}: {:.0}/s",
            (COUNT as f64 - burst) / elapsed
        );
    }
}

/// A dead letter is kept before anyone reads its topic (in memory, which
/// keeps messages only for groups that exist), and goes to the route's
/// `dead_letters` backend when it has one, whether or not the route settles
/// in transactions.
#[tokio::test]
async fn dead_letters_are_kept_unread_and_go_where_the_route_says() {
    let runtime = runtime();
    let memory = sluice::backend::connect("memory://").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}?poll_ms=20", dir.path().join("s.db").display());
    let sqlite = sluice::backend::connect(&sqlite_url).await.unwrap();
    let read_dead_letters = |backend: Arc<dyn Backend>, topic: &'static str| async move {
        let options =
            SubscribeOptions::new(vec![topic.to_string()], sluice::router::DEAD_LETTER_GROUP);
        let subscription = backend.subscribe(options).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..20 {
            for delivery in subscription
                .fetch(10, Duration::from_millis(100))
                .await
                .unwrap()
            {
                subscription.ack(&delivery).await.unwrap();
                got.push(delivery.message);
            }
            if !got.is_empty() {
                break;
            }
        }
        subscription.close().await.unwrap();
        got
    };
    // (source and sink, dead letters) and the route's name.
    let cases = [
        (memory.clone(), None, "alone"),
        (memory.clone(), Some(sqlite.clone()), "apart"),
        (sqlite.clone(), Some(memory.clone()), "atomic"),
    ];
    for (backend, dead_letters, name) in cases {
        let plugin = load(&runtime, "chaos", settings("chaos", &[]));
        let outputs = Collector::start(&backend, &["out"]).await;
        let topic: &'static str = format!("{name}.dead-letter").leak();
        // Watches the output backend's dead-letter topic from the start.
        let strays = Collector::start(&backend, &[topic]).await;
        let input = format!("{name}.in");
        let mut route = route(name, &backend, &input, plugin, quick_retry(1));
        route.dead_letters = dead_letters.clone();
        let kept_in = route.dead_letter_backend().clone();
        let inputs = vec![Message::new(&input, "reject"), Message::new(&input, "ok")];
        run_over(route, &backend, inputs, &[(&outputs, 1)]).await;
        let letters = read_dead_letters(kept_in, topic).await;
        assert_eq!(letters.len(), 1, "{name}: {letters:?}");
        assert_eq!(letters[0].payload, b"reject", "{name}");
        assert_eq!(
            letters[0].header(headers::DEAD_LETTER_CAUSE),
            Some("rejected")
        );
        if dead_letters.is_some() {
            let strays = strays
                .wait_for(0, Duration::from_millis(300))
                .await
                .unwrap();
            assert!(
                strays.is_empty(),
                "{name}: a dead letter went to the output backend: {strays:?}"
            );
        }
    }
}
