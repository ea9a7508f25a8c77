//! The router: runs one route's delivery loop.
//!
//! A fetcher task pulls batches from the subscription and hands each delivery
//! to a worker; with `ordered`, all messages of one key go to the same worker
//! lane, so they are handled one at a time in order. For each delivery a
//! worker calls the handler, then settles:
//!
//! - outputs → publish them, *then* ack the input (at-least-once end to end:
//!   a crash between the two repeats outputs, never loses the input); when
//!   the route reads from and writes to one transactional backend, both
//!   happen in one transaction instead (exactly once within that backend);
//! - retry, trap, timeout, memory cap → nack with an exponential backoff,
//!   or dead-letter once the attempts are used up;
//! - reject → dead-letter at once.
//!
//! Dead-lettering publishes the input unchanged to the route's dead-letter
//! topic with headers saying why, then acks it.
//!
//! On shutdown the fetcher stops, workers finish what was fetched, settle it,
//! and the subscription is closed.

mod handler;
mod retry;
mod stats;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;

pub use handler::{FnHandler, MessageHandler, WasmHandler, Worker};
pub use retry::RetryPolicy;
pub use stats::{Histogram, LATENCY_BUCKETS, RouteStats, StatsSnapshot};

use crate::backend::{Backend, Delivery, SubscribeOptions, Subscription};
use crate::message::{Message, headers};
use crate::runtime::Outcome;

/// The smallest batch the fetcher asks for.
const FETCH_BATCH_MIN: usize = 32;

/// How long one fetch waits before the fetcher checks for shutdown again.
const FETCH_WAIT: Duration = Duration::from_millis(250);

/// Everything a route needs besides its backends and handler.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub name: String,
    pub subscribe: SubscribeOptions,
    /// Workers handling messages at once.
    pub concurrency: usize,
    /// One worker per key: messages of a key are handled in order.
    pub ordered: bool,
    pub retry: RetryPolicy,
    pub dead_letter_topic: String,
}

/// A route ready to run.
pub struct Route {
    pub spec: RouteSpec,
    pub source: Arc<dyn Backend>,
    pub sink: Arc<dyn Backend>,
    pub handler: Arc<dyn MessageHandler>,
    pub stats: Arc<RouteStats>,
}

/// How a failed attempt ends.
struct Failure {
    /// `retry`, `trap`, `timeout`, `memory-limit`, `publish-failed`.
    cause: &'static str,
    reason: String,
}

struct Context {
    spec: RouteSpec,
    subscription: Box<dyn Subscription>,
    sink: Arc<dyn Backend>,
    /// Outputs and the input's ack go in one transaction: the route's sink
    /// is its source and that backend can do it.
    atomic: bool,
    stats: Arc<RouteStats>,
    shutdown: CancellationToken,
    control: Arc<RouteControl>,
}

impl Route {
    /// Subscribes, then runs until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        self.subscribe().await?.run(shutdown).await
    }

    /// Joins the consumer group. Done before running so that, on a backend
    /// that keeps no history, nothing published after this call is missed.
    pub async fn subscribe(self) -> Result<Subscribed> {
        let subscription = self.source.subscribe(self.spec.subscribe.clone()).await?;
        tracing::info!(
            route = %self.spec.name,
            topics = ?self.spec.subscribe.topics,
            group = %self.spec.subscribe.group,
            handler = %self.handler.describe(),
            backend = self.source.kind(),
            "route subscribed"
        );
        Ok(Subscribed {
            route: self,
            subscription,
        })
    }
}

/// Operator controls of a running route.
#[derive(Debug)]
pub struct RouteControl {
    paused: tokio::sync::watch::Sender<bool>,
    /// Set by the fetcher once it has seen a pause and stopped fetching.
    halted: tokio::sync::watch::Sender<bool>,
}

impl Default for RouteControl {
    fn default() -> Self {
        RouteControl {
            paused: tokio::sync::watch::Sender::new(false),
            halted: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl RouteControl {
    /// Stops fetching; messages already fetched are finished and settled.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Pauses, then waits (at most `limit`) until the fetcher has stopped:
    /// a fetch already waiting when the pause came may still bring messages,
    /// and only after this returns does nothing more arrive. `false` if the
    /// fetcher did not confirm in time (e.g. the route is not running).
    pub async fn pause_and_wait(&self, limit: Duration) -> bool {
        let mut halted = self.halted.subscribe();
        self.pause();
        tokio::time::timeout(limit, halted.wait_for(|h| *h))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }
}

/// A route whose subscription is open, ready to run.
pub struct Subscribed {
    route: Route,
    subscription: Box<dyn Subscription>,
}

impl Subscribed {
    pub fn stats(&self) -> &Arc<RouteStats> {
        &self.route.stats
    }

    /// Runs until `shutdown` is cancelled, then finishes and settles what
    /// was fetched and closes the subscription.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        self.run_with(shutdown, Arc::new(RouteControl::default()))
            .await
    }

    /// [`Subscribed::run`], obeying `control` (pause and resume).
    pub async fn run_with(
        self,
        shutdown: CancellationToken,
        control: Arc<RouteControl>,
    ) -> Result<()> {
        let Subscribed {
            route,
            subscription,
        } = self;
        let handler = route.handler;
        let atomic = subscription.transactional()
            && std::ptr::addr_eq(Arc::as_ptr(&route.source), Arc::as_ptr(&route.sink));
        let context = Arc::new(Context {
            spec: route.spec,
            subscription,
            sink: route.sink,
            atomic,
            stats: route.stats,
            shutdown,
            control,
        });
        context.stats.backend_ok.store(true, Ordering::Relaxed);
        let workers = context.spec.concurrency.max(1);
        // Unordered: one queue all workers share. Ordered: a queue per worker.
        let lanes = if context.spec.ordered { workers } else { 1 };
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = tokio::task::JoinSet::new();
        let mut receivers = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = async_channel::bounded::<Delivery>(workers.div_ceil(lanes).max(1));
            senders.push(tx);
            receivers.push(rx);
        }
        for index in 0..workers {
            let rx = receivers[index % lanes].clone();
            let context = context.clone();
            let mut worker = handler.worker();
            tasks.spawn(async move {
                while let Ok(delivery) = rx.recv().await {
                    context.process(worker.as_mut(), delivery).await;
                }
            });
        }
        drop(receivers);

        context.fetch_loop(&senders).await;
        drop(senders);
        while tasks.join_next().await.is_some() {}
        if let Err(e) = context.subscription.close().await {
            tracing::warn!(route = %context.spec.name, "closing the subscription failed: {e:#}");
        }
        tracing::info!(route = %context.spec.name, stats = %context.stats.snapshot(), "route stopped");
        Ok(())
    }
}

impl Context {
    async fn fetch_loop(&self, lanes: &[async_channel::Sender<Delivery>]) {
        // Fetch well ahead of the workers: a round trip to the broker per
        // couple of messages would cap a route far below what it can do.
        // Fetched messages wait in the lanes, leased, until a worker is free.
        let batch = (self.spec.concurrency * 2).clamp(FETCH_BATCH_MIN, 256);
        let mut next_lane = 0usize;
        let mut failures = 0u32;
        let mut paused = self.control.paused.subscribe();
        while !self.shutdown.is_cancelled() {
            if *paused.borrow_and_update() {
                self.control.halted.send_replace(true);
                tokio::select! {
                    _ = paused.changed() => {}
                    _ = self.shutdown.cancelled() => {}
                }
                self.control.halted.send_replace(false);
                continue;
            }
            let deliveries = match self.subscription.fetch(batch, FETCH_WAIT).await {
                Ok(deliveries) => {
                    failures = 0;
                    self.stats.backend_ok.store(true, Ordering::Relaxed);
                    deliveries
                }
                Err(e) => {
                    failures += 1;
                    self.stats.backend_ok.store(false, Ordering::Relaxed);
                    RouteStats::add(&self.stats.backend_errors, 1);
                    let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tracing::warn!(route = %self.spec.name, "fetch failed, retrying in {pause:?}: {e:#}");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            if deliveries.is_empty() {
                continue;
            }
            self.stats.touch();
            RouteStats::add(&self.stats.received, deliveries.len() as u64);
            self.stats
                .in_flight
                .fetch_add(deliveries.len() as i64, Ordering::Relaxed);
            for delivery in deliveries {
                let lane = if lanes.len() == 1 {
                    0
                } else if self.spec.ordered {
                    let mut hasher = DefaultHasher::new();
                    match &delivery.message.key {
                        Some(key) => key.hash(&mut hasher),
                        None => delivery.message.id.hash(&mut hasher),
                    }
                    (hasher.finish() % lanes.len() as u64) as usize
                } else {
                    next_lane = (next_lane + 1) % lanes.len();
                    next_lane
                };
                // Only fails if every worker is gone, which happens only
                // after this loop ends.
                let _ = lanes[lane].send(delivery).await;
            }
        }
    }

    async fn process(&self, worker: &mut dyn Worker, delivery: Delivery) {
        let mut attempt = delivery.attempt;
        loop {
            let started = std::time::Instant::now();
            let result = worker.handle(&delivery.message, attempt).await;
            self.stats.handler_latency.observe(started.elapsed());
            let failure = match result {
                Ok(Outcome::Outputs(outputs)) => {
                    match self.publish_and_settle(&delivery, outputs).await {
                        Ok(()) => {
                            RouteStats::add(&self.stats.succeeded, 1);
                            break;
                        }
                        Err(e) => Failure {
                            cause: "publish-failed",
                            reason: format!("publishing outputs failed: {e:#}"),
                        },
                    }
                }
                Ok(Outcome::Retry(reason)) => Failure {
                    cause: "retry",
                    reason,
                },
                Ok(Outcome::Reject(reason)) => {
                    self.dead_letter(&delivery, attempt, "rejected", &reason)
                        .await;
                    break;
                }
                Err(error) => {
                    RouteStats::add(&self.stats.plugin_errors, 1);
                    Failure {
                        cause: error.cause(),
                        reason: error.to_string(),
                    }
                }
            };
            if !self.spec.retry.may_retry(attempt) {
                let reason = format!("{} (after {attempt} attempts)", failure.reason);
                self.dead_letter(&delivery, attempt, "attempts-exhausted", &reason)
                    .await;
                break;
            }
            RouteStats::add(&self.stats.retried, 1);
            let delay = self.spec.retry.backoff(attempt);
            tracing::debug!(route = %self.spec.name, message = %delivery.message.id, attempt, cause = failure.cause, ?delay, "{}", failure.reason);
            if self.spec.ordered && !self.shutdown.is_cancelled() {
                // Hold the key's lane: later messages of this key must wait.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {
                        attempt += 1;
                        continue;
                    }
                    _ = self.shutdown.cancelled() => {}
                }
            }
            self.nack(&delivery, delay).await;
            break;
        }
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats.touch();
    }

    /// Publishes a handled message's outputs and acks it; an error means
    /// the outputs were not (all) published and the input is not settled.
    async fn publish_and_settle(&self, input: &Delivery, mut outputs: Vec<Message>) -> Result<()> {
        for output in &mut outputs {
            output.set_header(headers::CAUSATION_ID, input.message.id.clone());
        }
        let count = outputs.len() as u64;
        if self.atomic {
            self.subscription.publish_and_ack(input, outputs).await?;
        } else {
            if !outputs.is_empty() {
                self.sink.publish(outputs).await?;
            }
            self.ack(input).await;
        }
        RouteStats::add(&self.stats.published, count);
        Ok(())
    }

    async fn dead_letter(&self, delivery: &Delivery, attempt: u32, cause: &str, reason: &str) {
        let original = &delivery.message;
        let mut letter = Message::new(
            self.spec.dead_letter_topic.clone(),
            original.payload.clone(),
        );
        letter.key = original.key.clone();
        letter.headers = original.headers.clone();
        letter.set_header(headers::DEAD_LETTER_CAUSE, cause);
        letter.set_header(headers::DEAD_LETTER_REASON, reason);
        letter.set_header(headers::ORIGINAL_TOPIC, original.topic.clone());
        letter.set_header(headers::ORIGINAL_ID, original.id.clone());
        letter.set_header(headers::ATTEMPTS, attempt.to_string());
        letter.set_header(headers::ROUTE, self.spec.name.clone());
        tracing::warn!(route = %self.spec.name, message = %original.id, topic = %self.spec.dead_letter_topic, cause, "dead-lettering: {reason}");
        let settled = if self.atomic {
            self.subscription
                .publish_and_ack(delivery, vec![letter])
                .await
        } else {
            let published = self.sink.publish(vec![letter]).await;
            if published.is_ok() {
                self.ack(delivery).await;
            }
            published
        };
        match settled {
            Ok(()) => {
                RouteStats::add(&self.stats.dead_lettered, 1);
            }
            Err(e) => {
                // Keep the message: it comes back and is dead-lettered again.
                RouteStats::add(&self.stats.backend_errors, 1);
                tracing::error!(route = %self.spec.name, "publishing to the dead-letter topic failed: {e:#}");
                self.nack(delivery, self.spec.retry.backoff(attempt)).await;
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) {
        if let Err(e) = self.subscription.ack(delivery).await {
            // The message comes back after its lease; its outputs may repeat.
            RouteStats::add(&self.stats.backend_errors, 1);
            tracing::error!(route = %self.spec.name, message = %delivery.message.id, "ack failed: {e:#}");
        }
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) {
        if let Err(e) = self.subscription.nack(delivery, delay).await {
            RouteStats::add(&self.stats.backend_errors, 1);
            tracing::error!(route = %self.spec.name, message = %delivery.message.id, "nack failed: {e:#}");
        }
    }
}
