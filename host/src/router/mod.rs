//! The router: runs one route's delivery loop.
//!
//! Three stages, each its own task(s), joined by queues:
//!
//! 1. The fetcher (`fetch.rs`) pulls batches from the subscription and hands
//!    each delivery to a worker lane; with `ordered`, all messages of one key
//!    go to the same lane, so they are handled one at a time in order.
//! 2. Workers (`work.rs`) call the handler and decide each delivery's fate:
//!    publish its outputs and ack it; nack it with an exponential backoff
//!    (retry, trap, timeout, memory cap); or dead-letter it (reject, or the
//!    attempts are used up): publish it to the dead-letter topic with headers
//!    saying why, and ack it. A worker hands that decision to the settler
//!    and takes the next message at once.
//! 3. The settler (`settle.rs`) settles whatever has gathered, in as few
//!    round trips as the backend allows: the outputs of the whole batch
//!    published together, *then* the inputs acked together (at least once
//!    end to end: a crash between the two repeats outputs, never loses an
//!    input); when the route reads from and writes to one transactional
//!    backend, each delivery's outputs and ack go in one transaction instead
//!    (exactly once within that backend).
//!
//! At most `max_in_flight` deliveries are between fetched and settled, so
//! memory and the redelivery after a crash stay bounded. On shutdown the
//! fetcher stops, workers finish what was fetched, the settler settles all
//! of it, and the subscription is closed.

mod fetch;
mod forward;
mod handler;
mod retry;
mod settle;
mod stats;
mod trace;
mod work;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use forward::{Forward, Rename};
pub use handler::{FnHandler, MessageHandler, WasmHandler, Worker};
pub use retry::RetryPolicy;
pub use stats::{Histogram, LATENCY_BUCKETS, RouteStats, StatsSnapshot};

use crate::backend::{Backend, Delivery, SubscribeOptions, Subscription};
use crate::message::Message;

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
    /// Deliveries between fetched and settled, at most.
    pub max_in_flight: usize,
    /// Messages a worker hands to its handler in one call (the plugin's
    /// `handle-batch` export, where it has one).
    pub batch_size: usize,
    /// Hops past which a message is dead-lettered instead of handled.
    pub max_hops: u32,
    /// Largest message handled; a larger one is dead-lettered unhandled.
    pub max_message_bytes: usize,
    /// Messages per second the route takes from its backend, at most.
    pub max_rate: Option<f64>,
    /// The route reads redriven dead letters: each is handled under the
    /// topic it was dead-lettered from (`sluice-original-topic`).
    pub redriven: bool,
    /// What becomes of a message whose outputs an output backend refuses.
    pub output_failure: OutputFailure,
}

/// What becomes of a message whose outputs an output backend refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFailure {
    /// Try again after the route's backoff for as long as it takes: in
    /// place, and only on the backends that refused, where the route has
    /// several output backends or is ordered (so neither a backend that
    /// took the outputs gets them twice nor a key's later message
    /// overtakes); otherwise the input comes back (nack) and is handled
    /// again.
    #[default]
    Wait,
    /// As `Wait`, until the route's `retry.max_attempts` are used up; then
    /// the input is dead-lettered (cause `output-failed`) and acked.
    DeadLetter,
}

impl RouteSpec {
    /// Default value of [`RouteSpec::max_in_flight`].
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 512;
    /// Default value of [`RouteSpec::max_hops`].
    pub const DEFAULT_MAX_HOPS: u32 = 16;

    /// A route over `subscribe` with the defaults a config file has:
    /// concurrency 1, unordered, the default retry policy, dead letters to
    /// `<name>.dead-letter`.
    pub fn new(name: impl Into<String>, subscribe: SubscribeOptions) -> Self {
        let name = name.into();
        RouteSpec {
            dead_letter_topic: format!("{name}.dead-letter"),
            name,
            subscribe,
            concurrency: 1,
            ordered: false,
            retry: RetryPolicy::default(),
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
            batch_size: 1,
            max_hops: Self::DEFAULT_MAX_HOPS,
            max_message_bytes: crate::runtime::OutputLimits::default().max_message_bytes,
            max_rate: None,
            redriven: false,
            output_failure: OutputFailure::Wait,
        }
    }
}

/// A route ready to run.
pub struct Route {
    pub spec: RouteSpec,
    pub source: Arc<dyn Backend>,
    /// Where outputs go: every one of these (at least one).
    pub outputs: Vec<Arc<dyn Backend>>,
    /// Where dead letters go, if not to the first of `outputs`.
    pub dead_letters: Option<Arc<dyn Backend>>,
    pub handler: Arc<dyn MessageHandler>,
    pub stats: Arc<RouteStats>,
}

/// What a route's tasks share.
struct Context {
    spec: RouteSpec,
    subscription: Box<dyn Subscription>,
    /// Where outputs go: every one of these.
    outputs: Vec<Arc<dyn Backend>>,
    /// Where dead letters go, when not with the outputs (always, where
    /// there are several output backends).
    dead_letters: Option<Arc<dyn Backend>>,
    /// Outputs and the input's ack go in one transaction: the route's one output backend
    /// is its source and that backend can do it.
    atomic: bool,
    stats: Arc<RouteStats>,
    /// Cancelled on shutdown, or when the route must stop on its own.
    shutdown: CancellationToken,
    control: Arc<RouteControl>,
    /// A permit per delivery that may be between fetched and settled.
    in_flight: Semaphore,
    /// How fast the workers go, so the fetcher fetches no more than they
    /// can start within a lease.
    pace: fetch::Pace,
    /// Why the route stopped on its own, if it did.
    fatal: Mutex<Option<anyhow::Error>>,
}

impl Context {
    /// Stops the route because of an error retrying cannot fix.
    fn stop_with(&self, error: anyhow::Error) {
        tracing::error!("stopping the route: {error:#}");
        self.fatal.lock().unwrap().get_or_insert(error);
        self.shutdown.cancel();
    }
}

/// Where a route's dead letters go: their own backend, or the first output
/// backend.
fn dead_letter_backend<'a>(
    dead_letters: Option<&'a Arc<dyn Backend>>,
    outputs: &'a [Arc<dyn Backend>],
) -> &'a Arc<dyn Backend> {
    dead_letters.unwrap_or(&outputs[0])
}

/// The durable group the host makes for every dead-letter topic, so that
/// dead letters are kept before anyone reads them.
pub const DEAD_LETTER_GROUP: &str = "sluice-dead-letters";

impl Route {
    /// The backend this route's dead letters go to.
    pub fn dead_letter_backend(&self) -> &Arc<dyn Backend> {
        dead_letter_backend(self.dead_letters.as_ref(), &self.outputs)
    }

    /// Makes sure the dead-letter topic's messages are kept from the first
    /// one on: where the backend keeps messages only for groups that exist
    /// (SQS, SNS+SQS, memory), joins [`DEAD_LETTER_GROUP`] to it and leaves
    /// again, which leaves the group (its queue) in place. A backend that
    /// keeps history needs nothing; one that keeps nothing for an absent
    /// reader (NATS core, Redis pub/sub) cannot be helped, and is reported.
    pub async fn keep_dead_letters(&self) -> Result<()> {
        let backend = self.dead_letter_backend();
        let capabilities = backend.capabilities();
        if !capabilities.at_least_once {
            tracing::warn!(
                route = %self.spec.name,
                backend = backend.kind(),
                "dead letters go to a backend that keeps no message nobody is subscribed to; \
                 they are lost unless something reads `{}` (set `dead_letter_backend`)",
                self.spec.dead_letter_topic
            );
            return Ok(());
        }
        if capabilities.history {
            return Ok(());
        }
        let options =
            SubscribeOptions::new(vec![self.spec.dead_letter_topic.clone()], DEAD_LETTER_GROUP);
        let subscription = backend.subscribe(options).await.with_context(|| {
            format!(
                "making the group that keeps dead letters of `{}`",
                self.spec.dead_letter_topic
            )
        })?;
        subscription.close().await
    }

    /// Subscribes, then runs until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        self.subscribe().await?.run(shutdown).await
    }

    /// Joins the consumer group. Done before running so that, on a backend
    /// that keeps no history, nothing published after this call is missed;
    /// for the same reason, makes sure dead letters will be kept.
    pub async fn subscribe(self) -> Result<Subscribed> {
        self.keep_dead_letters().await?;
        // An ordered route asks the backend to keep each key with one
        // consumer of the group at a time, where it can.
        let options = SubscribeOptions {
            ordered: self.spec.ordered,
            ..self.spec.subscribe.clone()
        };
        let subscription = self.source.subscribe(options).await?;
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
        assert!(!route.outputs.is_empty(), "a route has an output backend");
        let atomic = subscription.transactional()
            && route.outputs.len() == 1
            && std::ptr::addr_eq(Arc::as_ptr(&route.source), Arc::as_ptr(&route.outputs[0]));
        let dead_letters = match route.dead_letters {
            None if route.outputs.len() > 1 => Some(route.outputs[0].clone()),
            dead_letters => dead_letters,
        };
        // A route stopping on its own must not stop the rest of the host.
        let shutdown = shutdown.child_token();
        let max_in_flight = route.spec.max_in_flight.max(1);
        let context = Arc::new(Context {
            spec: route.spec,
            subscription,
            outputs: route.outputs,
            dead_letters,
            atomic,
            stats: route.stats,
            shutdown,
            control,
            in_flight: Semaphore::new(max_in_flight),
            pace: fetch::Pace::default(),
            fatal: Mutex::new(None),
        });
        context.stats.fetch_succeeded();
        let workers = context.spec.concurrency.max(1);
        // Unordered: one queue all workers share. Ordered: a queue per worker.
        let lanes = if context.spec.ordered { workers } else { 1 };
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = tokio::task::JoinSet::new();
        let mut receivers = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = async_channel::bounded::<Vec<Delivery>>(workers.div_ceil(lanes).max(1));
            senders.push(tx);
            receivers.push(rx);
        }
        // Every event of the route's tasks carries the route's name.
        let span = tracing::info_span!("route", route = %context.spec.name);
        let (finished, settler_queue) = tokio::sync::mpsc::unbounded_channel();
        for index in 0..workers {
            let lane = receivers[index % lanes].clone();
            let context = context.clone();
            let finished = finished.clone();
            let mut worker = handler.worker();
            tasks.spawn(
                async move { context.work(worker.as_mut(), lane, finished).await }
                    .instrument(span.clone()),
            );
        }
        drop(receivers);
        drop(finished);
        let settler = tokio::spawn({
            let context = context.clone();
            async move { context.settle_loop(settler_queue).await }.instrument(span.clone())
        });

        context.fetch_loop(&senders).instrument(span).await;
        drop(senders);
        while tasks.join_next().await.is_some() {}
        // Every worker is gone, so the settler's queue ends once drained.
        let _ = settler.await;
        if let Err(e) = context.subscription.close().await {
            tracing::warn!(route = %context.spec.name, "closing the subscription failed: {e:#}");
        }
        tracing::info!(route = %context.spec.name, stats = %context.stats.snapshot(), "route stopped");
        match context.fatal.lock().unwrap().take() {
            Some(error) => Err(anyhow!("route `{}` stopped: {error:#}", context.spec.name)),
            None => Ok(()),
        }
    }
}

/// A delivery a worker is done with, and what is to become of it.
struct Finished {
    delivery: Delivery,
    verdict: Verdict,
    /// The delivery's span; it ends once the delivery is settled.
    span: tracing::Span,
}

enum Verdict {
    /// Publish these (the handler's outputs, or the dead letter), then ack.
    Publish {
        outputs: Vec<Message>,
        /// Dead letter rather than outputs, for the counters.
        dead_letter: bool,
    },
    /// Deliver again after the delay.
    Nack(Duration),
}

impl Verdict {
    /// Publish `letter`, the input's dead letter, then ack.
    fn dead_letter(letter: Message) -> Self {
        Verdict::Publish {
            outputs: vec![letter],
            dead_letter: true,
        }
    }
}
