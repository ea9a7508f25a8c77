//! The host cases: the full router with a real WebAssembly plugin on the
//! backend under test.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use async_trait::async_trait;
use sluice::Message;
use sluice::backend::{Backend, Capabilities, Delivery, SubscribeOptions, Subscription};
use sluice::dlq::{DeadLetters, Filter};
use sluice::message::headers;
use sluice::replay::Replay;
use sluice::router::{DEAD_LETTER_GROUP, Route};

use crate::case;
use crate::common::{Collector, Running, load, quick_retry, route, runtime, settings, text};
use crate::conformance::harness::{Case, Ctx};

const LIMIT: Duration = Duration::from_secs(30);

pub fn all() -> Vec<Case> {
    vec![
        case!(host_retry_with_backoff_then_success),
        case!(host_dead_letter_after_max_attempts),
        case!(host_reject_goes_straight_to_dead_letter),
        case!(
            host_dead_letters_are_kept_before_anyone_reads_them,
            crate::conformance::cases::needs_at_least_once
        ),
        case!(
            host_a_redrive_goes_back_through_its_route_only,
            crate::conformance::cases::needs_at_least_once
        ),
        case!(
            host_a_replay_sends_history_back_through_its_route_only,
            crate::conformance::cases::needs_history
        ),
        case!(host_trapping_plugin_is_retried_then_dead_lettered),
        case!(
            host_outputs_published_before_ack,
            crate::conformance::cases::needs_at_least_once
        ),
        case!(
            host_graceful_shutdown_settles_in_flight,
            crate::conformance::cases::needs_at_least_once
        ),
        case!(
            host_ordered_route_keeps_key_order_while_batching,
            crate::conformance::cases::needs_order
        ),
    ]
}

/// A route of the `chaos` plugin from `in` to `out` in this case's namespace.
fn chaos_route(ctx: &Ctx, name: &str, max_attempts: u32) -> Route {
    let runtime = runtime();
    let output = ctx.topic("out");
    let plugin = load(
        &runtime,
        "chaos",
        settings("chaos", &[("output", output.as_str())]),
    );
    let mut route = route(
        &ctx.group(name),
        &ctx.backend,
        &ctx.topic("in"),
        plugin,
        quick_retry(max_attempts),
    );
    route.spec.dead_letter_topic = ctx.topic("dead");
    route
}

async fn host_retry_with_backoff_then_success(ctx: Ctx) -> Result<()> {
    let outputs = Collector::start(&ctx.backend, &[&ctx.topic("out")]).await;
    let running = Running::start(chaos_route(&ctx, "r", 5)).await;
    ctx.backend
        .publish(vec![Message::new(ctx.topic("in"), "retry:2")])
        .await?;
    let got = outputs.wait_for(1, LIMIT).await?;
    ensure!(
        got[0].header("attempt") == Some("3"),
        "succeeded on attempt {:?}",
        got[0].header("attempt")
    );
    let stats = running.stats.snapshot();
    running.stop().await;
    ensure!(stats.retried == 2 && stats.succeeded == 1, "{stats}");
    Ok(())
}

async fn host_dead_letter_after_max_attempts(ctx: Ctx) -> Result<()> {
    let letters = Collector::start(&ctx.backend, &[&ctx.topic("dead")]).await;
    let running = Running::start(chaos_route(&ctx, "r", 3)).await;
    let input = Message::new(ctx.topic("in"), "retry");
    ctx.backend.publish(vec![input.clone()]).await?;
    let got = letters.wait_for(1, LIMIT).await?;
    running.stop().await;
    let letter = &got[0];
    ensure!(
        letter.header(headers::DEAD_LETTER_CAUSE) == Some("attempts-exhausted"),
        "{letter:?}"
    );
    ensure!(letter.header(headers::ATTEMPTS) == Some("3"), "{letter:?}");
    ensure!(
        letter.header(headers::ORIGINAL_ID) == Some(input.id.as_str()),
        "{letter:?}"
    );
    ensure!(
        letter.header(headers::ORIGINAL_TOPIC) == Some(input.topic.as_str()),
        "{letter:?}"
    );
    let reason = letter.header(headers::DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("asked to retry"), "reason: {reason}");
    Ok(())
}

async fn host_reject_goes_straight_to_dead_letter(ctx: Ctx) -> Result<()> {
    let letters = Collector::start(&ctx.backend, &[&ctx.topic("dead")]).await;
    let running = Running::start(chaos_route(&ctx, "r", 5)).await;
    ctx.backend
        .publish(vec![Message::new(ctx.topic("in"), "reject")])
        .await?;
    let got = letters.wait_for(1, LIMIT).await?;
    let stats = running.stats.snapshot();
    running.stop().await;
    ensure!(
        got[0].header(headers::DEAD_LETTER_CAUSE) == Some("rejected"),
        "{:?}",
        got[0]
    );
    ensure!(
        got[0].header(headers::ATTEMPTS) == Some("1"),
        "{:?}",
        got[0]
    );
    ensure!(stats.retried == 0, "a rejected message was retried");
    Ok(())
}

/// Nobody reads the dead-letter topic while the route runs; the dead
/// letter is there afterwards for the group the host keeps them for.
async fn host_dead_letters_are_kept_before_anyone_reads_them(ctx: Ctx) -> Result<()> {
    let running = Running::start(chaos_route(&ctx, "r", 5)).await;
    let input = Message::new(ctx.topic("in"), "reject");
    ctx.backend.publish(vec![input.clone()]).await?;
    let give_up = tokio::time::Instant::now() + LIMIT;
    while running.stats.dead_lettered.load(Ordering::Relaxed) == 0 {
        ensure!(tokio::time::Instant::now() < give_up, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
    let options = SubscribeOptions::new(vec![ctx.topic("dead")], DEAD_LETTER_GROUP);
    let letters = ctx.backend.subscribe(options).await?;
    let mut got = Vec::new();
    while got.is_empty() && tokio::time::Instant::now() < give_up {
        for delivery in letters.fetch(10, Duration::from_millis(250)).await? {
            letters.ack(&delivery).await?;
            got.push(delivery.message);
        }
    }
    letters.close().await?;
    ensure!(got.len() == 1, "dead letters read: {got:?}");
    ensure!(
        got[0].header(headers::ORIGINAL_ID) == Some(input.id.as_str()),
        "{:?}",
        got[0]
    );
    Ok(())
}

/// A dead letter redriven goes to the route's redrive topic, which only
/// the route's group reads: the route hands it to its plugin under its
/// original topic (here the plugin rejects it again, so it comes back to
/// the dead-letter topic with one step of history), and another group of
/// the original topic gets nothing. A purge then drops it.
async fn host_a_redrive_goes_back_through_its_route_only(ctx: Ctx) -> Result<()> {
    let bystander = Collector::start(&ctx.backend, &[&ctx.topic("in")]).await;
    let route = chaos_route(&ctx, "r", 1);
    let redrive_topic = ctx.topic("redrive");
    let mut redriven = chaos_route(&ctx, "r", 1);
    redriven.spec.subscribe.topics = vec![redrive_topic.clone()];
    redriven.spec.redriven = true;
    let running = Running::start(route).await;
    let running_redriven = Running::start(redriven).await;
    let input = Message::new(ctx.topic("in"), "reject");
    ctx.backend.publish(vec![input.clone()]).await?;
    let dead = DeadLetters {
        route: "r".into(),
        backend: ctx.backend.clone(),
        topic: ctx.topic("dead"),
        redrive: Some((ctx.backend.clone(), redrive_topic)),
    };
    let give_up = tokio::time::Instant::now() + LIMIT;
    let mut sent = 0;
    while sent == 0 {
        ensure!(tokio::time::Instant::now() < give_up, "nothing to redrive");
        sent = dead.redrive(&Filter::default(), None, |_| {}).await?;
    }
    ensure!(sent == 1, "redrove {sent}");
    let again = loop {
        let letters = dead.peek(&Filter::default()).await?;
        if let Some(letter) = letters.into_iter().next() {
            break letter;
        }
        ensure!(
            tokio::time::Instant::now() < give_up,
            "never dead-lettered again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    running_redriven.stop().await;
    running.stop().await;
    ensure!(
        again.header(headers::ORIGINAL_TOPIC) == Some(input.topic.as_str()),
        "handled under `{:?}`",
        again.header(headers::ORIGINAL_TOPIC)
    );
    let history = again.header(headers::REDRIVE_HISTORY).unwrap_or("[]");
    ensure!(
        history.contains(&input.id) && history.contains("rejected"),
        "history: {history}"
    );
    let seen = bystander.now();
    ensure!(
        seen.len() == 1 && seen[0].id == input.id,
        "another group of the topic saw {seen:?}"
    );
    // Purged, it is gone for good.
    let purged = dead.purge(&Filter::default(), |_| {}).await?;
    ensure!(purged == 1, "purged {purged}");
    let left = dead.peek(&Filter::default()).await?;
    ensure!(left.is_empty(), "left after a purge: {left:?}");
    Ok(())
}

/// Stored messages from a time on go back through the route alone: its
/// plugin handles them again, and another group of the topic gets nothing
/// more.
async fn host_a_replay_sends_history_back_through_its_route_only(ctx: Ctx) -> Result<()> {
    let outputs = Collector::start(&ctx.backend, &[&ctx.topic("out")]).await;
    let bystander = Collector::start(&ctx.backend, &[&ctx.topic("in")]).await;
    let redrive_topic = ctx.topic("redrive");
    let mut redriven = chaos_route(&ctx, "r", 5);
    redriven.spec.subscribe.topics = vec![redrive_topic.clone()];
    redriven.spec.redriven = true;
    let running = Running::start(chaos_route(&ctx, "r", 5)).await;
    let running_redriven = Running::start(redriven).await;
    ctx.backend
        .publish(vec![Message::new(ctx.topic("in"), "before")])
        .await?;
    outputs.wait_for(1, LIMIT).await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let from = sluice::message::now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let later = vec![
        Message::new(ctx.topic("in"), "after-1"),
        Message::new(ctx.topic("in"), "after-2"),
    ];
    ctx.backend.publish(later).await?;
    outputs.wait_for(3, LIMIT).await?;
    let replay = Replay {
        route: "r".into(),
        backend: ctx.backend.clone(),
        topics: vec![ctx.topic("in")],
        redrive_topic: Some(redrive_topic),
    };
    let sent = replay.run(from, None, None, |_| {}).await?;
    ensure!(sent == 2, "replayed {sent}");
    let got = outputs.wait_for(5, LIMIT).await?;
    running_redriven.stop().await;
    running.stop().await;
    let mut again: Vec<String> = got[3..].iter().map(text).collect();
    again.sort();
    ensure!(again == ["after-1", "after-2"], "handled again: {again:?}");
    let seen = bystander.now().len();
    ensure!(seen == 3, "another group of the topic saw {seen} messages");
    Ok(())
}

async fn host_trapping_plugin_is_retried_then_dead_lettered(ctx: Ctx) -> Result<()> {
    let letters = Collector::start(&ctx.backend, &[&ctx.topic("dead")]).await;
    let outputs = Collector::start(&ctx.backend, &[&ctx.topic("out")]).await;
    let running = Running::start(chaos_route(&ctx, "r", 3)).await;
    ctx.backend
        .publish(vec![
            Message::new(ctx.topic("in"), "panic"),
            Message::new(ctx.topic("in"), "ok"),
        ])
        .await?;
    let got = letters.wait_for(1, LIMIT).await?;
    outputs.wait_for(1, LIMIT).await?;
    let stats = running.stats.snapshot();
    running.stop().await;
    let reason = got[0].header(headers::DEAD_LETTER_REASON).unwrap_or("");
    ensure!(reason.contains("trap"), "reason: {reason}");
    ensure!(stats.plugin_errors == 3, "{stats}");
    Ok(())
}

/// The process "dies" between publishing outputs and acking (every ack it
/// tries fails, retries included): the output may be published twice, the
/// input is never lost.
async fn host_outputs_published_before_ack(ctx: Ctx) -> Result<()> {
    const FAILING: usize = 1_000;
    let outputs = Collector::start(&ctx.backend, &[&ctx.topic("out")]).await;
    let mut first = chaos_route(&ctx, "r", 3);
    let failing_acks = Arc::new(AtomicUsize::new(FAILING));
    first.source = Arc::new(AckFails {
        inner: ctx.backend.clone(),
        remaining: failing_acks.clone(),
    });
    first.spec.subscribe.lease = Duration::from_secs(1);
    let running = Running::start(first).await;
    let input = Message::new(ctx.topic("in"), "ok");
    ctx.backend.publish(vec![input.clone()]).await?;
    outputs.wait_for(1, LIMIT).await?;
    ensure!(
        failing_acks.load(Ordering::SeqCst) < FAILING,
        "the ack was never attempted"
    );
    running.stop().await;

    // A new consumer of the group gets the unacknowledged input again.
    let mut second = chaos_route(&ctx, "r", 3);
    second.spec.subscribe.lease = Duration::from_secs(1);
    let running = Running::start(second).await;
    let got = outputs.wait_for(2, LIMIT).await?;
    let stats = running.stats.snapshot();
    running.stop().await;
    let from_input = got
        .iter()
        .filter(|m| m.header(headers::CAUSATION_ID) == Some(input.id.as_str()))
        .count();
    ensure!(
        from_input == 2,
        "outputs of the input: {from_input} (expected a repeat)"
    );
    ensure!(
        stats.succeeded == 1,
        "the input was not handled again: {stats}"
    );
    Ok(())
}

async fn host_graceful_shutdown_settles_in_flight(ctx: Ctx) -> Result<()> {
    let outputs = Collector::start(&ctx.backend, &[&ctx.topic("out")]).await;
    // A lease longer than the test: anything left leased would never return.
    let mut first = chaos_route(&ctx, "r", 3);
    first.spec.concurrency = 4;
    first.spec.subscribe.lease = Duration::from_secs(600);
    let running = Running::start(first).await;
    let inputs: Vec<Message> = (0..200)
        .map(|i| Message::new(ctx.topic("in"), format!("ok-{i}")))
        .collect();
    for chunk in inputs.chunks(20) {
        ctx.backend.publish(chunk.to_vec()).await?;
    }
    outputs.wait_for(10, LIMIT).await?;
    let stats = running.stats.clone();
    running.stop().await;
    let after_stop = stats.snapshot();
    ensure!(
        after_stop.in_flight == 0,
        "unsettled after shutdown: {after_stop}"
    );
    ensure!(
        after_stop.received == after_stop.succeeded,
        "fetched but not settled: {after_stop}"
    );

    let mut second = chaos_route(&ctx, "r", 3);
    second.spec.subscribe.lease = Duration::from_secs(600);
    second.spec.concurrency = 4;
    let running = Running::start(second).await;
    let got = outputs.wait_for(200, LIMIT).await?;
    running.stop().await;
    let distinct: std::collections::HashSet<String> = got.iter().map(text).collect();
    ensure!(distinct.len() == 200, "{} of 200 handled", distinct.len());
    Ok(())
}

/// A backend whose subscriptions fail their first `remaining` acks, as if
/// the process died right after publishing a message's outputs.
struct AckFails {
    inner: Arc<dyn Backend>,
    remaining: Arc<AtomicUsize>,
}

#[async_trait]
impl Backend for AckFails {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.inner.publish(messages).await
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        Ok(Box::new(AckFailsSubscription {
            inner: self.inner.subscribe(options).await?,
            remaining: self.remaining.clone(),
        }))
    }
}

struct AckFailsSubscription {
    inner: Box<dyn Subscription>,
    remaining: Arc<AtomicUsize>,
}

#[async_trait]
impl Subscription for AckFailsSubscription {
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        self.inner.fetch(max, wait).await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let failed = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            return Err(anyhow::anyhow!("simulated crash before the ack")).context("ack");
        }
        self.inner.ack(delivery).await
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<()> {
        self.inner.nack(delivery, delay).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// An ordered route with several workers settles in batches, and a retry
/// held in place in the middle of a key's run: every key's outputs still
/// come out in the order its inputs were published, each once.
async fn host_ordered_route_keeps_key_order_while_batching(ctx: Ctx) -> Result<()> {
    const KEYS: [&str; 5] = ["a", "b", "c", "d", "e"];
    let per_key = ctx.volume(60);
    let outputs = Collector::start_ordered(&ctx.backend, &[&ctx.topic("out")]).await;
    let mut ordered = chaos_route(&ctx, "r", 3);
    ordered.spec.ordered = true;
    ordered.spec.concurrency = 4;
    let running = Running::start(ordered).await;
    let mut inputs = Vec::new();
    for i in 0..per_key {
        for key in KEYS {
            // The chaos plugin fails `retry:1` once, then echoes it.
            let command = if i % 20 == 10 { "retry:1" } else { "ok" };
            inputs.push(Message::new(ctx.topic("in"), command).with_key(key));
        }
    }
    ctx.backend.publish(inputs.clone()).await?;
    let got = outputs.wait_while_arriving(inputs.len(), LIMIT).await;
    running.stop().await;
    let got = got.with_context(|| {
        let seen = outputs.now();
        let per_key: Vec<String> = KEYS
            .iter()
            .map(|key| {
                let n = seen
                    .iter()
                    .filter(|m| m.key.as_deref() == Some(key))
                    .count();
                format!("{key}: {n}")
            })
            .collect();
        format!("outputs per key: {}", per_key.join(", "))
    })?;
    for key in KEYS {
        let published: Vec<&str> = inputs
            .iter()
            .filter(|m| m.key.as_deref() == Some(key))
            .map(|m| m.id.as_str())
            .collect();
        let handled: Vec<&str> = got
            .iter()
            .filter(|m| m.key.as_deref() == Some(key))
            .filter_map(|m| m.header(headers::CAUSATION_ID))
            .collect();
        ensure!(
            handled == published,
            "key {key}: outputs of {} inputs out of order or repeated (their publish \
             positions: {})",
            handled.len(),
            handled
                .iter()
                .map(|h| published
                    .iter()
                    .position(|p| p == h)
                    .map_or("?".to_string(), |i| i.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
