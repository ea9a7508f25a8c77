//! Workers: call the handler for each delivery and decide what becomes of
//! it, then hand that to the settler and take the next message at once.
//!
//! Each delivery gets its span here (see [`crate::telemetry`]), with a
//! child span around each handler call, so the plugin's log lines land in
//! the delivery they belong to.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{Instrument, Span};

use super::trace::Trace;
use super::{Context, Finished, RouteStats, Verdict, Worker};
use crate::backend::Delivery;
use crate::message::{Message, headers};
use crate::runtime::{CallError, Outcome};
use crate::telemetry::DELIVERY;

/// A delivery's span, and its trace context once known (at once when the
/// span is exported, whose ids it must carry; else only if it publishes).
struct Traced {
    span: Span,
    trace: Option<Trace>,
}

impl Traced {
    fn new(context: &Context, delivery: &Delivery, worker: &dyn Worker) -> Self {
        let span = tracing::debug_span!(
            target: DELIVERY,
            "delivery",
            route = %context.spec.name,
            message_id = %delivery.message.id,
            attempt = delivery.attempt,
            plugin = tracing::field::Empty,
            version = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if span.is_disabled() {
            return Traced { span, trace: None };
        }
        let (plugin, version) = worker.plugin();
        span.record("plugin", plugin);
        span.record("version", version);
        let trace = Trace::exported(&delivery.message, &span);
        Traced { span, trace }
    }

    /// The span of one handler call for this delivery.
    fn handling(&self, attempt: u32) -> Span {
        tracing::debug_span!(target: DELIVERY, parent: &self.span, "handle", attempt)
    }

    /// The trace context of what this delivery publishes.
    fn trace(&mut self, input: &Message) -> Trace {
        self.trace.take().unwrap_or_else(|| Trace::of(input))
    }

    fn ended(self, outcome: &str) -> Span {
        self.span.record("outcome", outcome);
        self.span
    }
}

/// How long finished deliveries may wait in a worker for company before
/// they go to the settler.
const HAND_IN_AFTER: Duration = Duration::from_millis(1);

impl Context {
    /// Takes chunks of deliveries from `lane` until the fetcher closes it,
    /// calling the handler for up to the route's batch size at a time.
    pub(super) async fn work(
        &self,
        worker: &mut dyn Worker,
        lane: async_channel::Receiver<Vec<Delivery>>,
        settler: UnboundedSender<Vec<Finished>>,
    ) {
        let batch_size = self.spec.batch_size.max(1);
        // On an ordered route, the keys whose message went back to the
        // backend (a retry at shutdown) with its delay: their later
        // messages go back too, unhandled, so that none overtakes it on a
        // backend that had handed out several messages of the key.
        let mut sent_back: HashMap<String, Duration> = HashMap::new();
        while let Ok(chunk) = lane.recv().await {
            let mut finished = Vec::with_capacity(chunk.len());
            let mut handed_in = Instant::now();
            let mut chunk = chunk.into_iter().peekable();
            while chunk.peek().is_some() {
                let mut batch = Vec::with_capacity(batch_size.min(chunk.len()));
                let mut taken = 0;
                for delivery in chunk.by_ref() {
                    taken += 1;
                    let mut traced = Traced::new(self, &delivery, worker);
                    let held_back = delivery.message.key.as_ref().and_then(|k| sent_back.get(k));
                    if let Some(&delay) = held_back {
                        let span = traced.ended("retry");
                        finished.push(Finished {
                            delivery,
                            verdict: Verdict::Nack(delay),
                            span,
                        });
                        continue;
                    }
                    match self.unfit(&delivery.message) {
                        Some((cause, reason)) => {
                            let trace = traced.trace(&delivery.message);
                            let verdict = Verdict::dead_letter(traced.span.in_scope(|| {
                                self.dead_letter(
                                    &delivery.message,
                                    delivery.attempt,
                                    cause,
                                    &reason,
                                    trace,
                                )
                            }));
                            let span = traced.ended("dead-lettered");
                            finished.push(Finished {
                                delivery,
                                verdict,
                                span,
                            });
                        }
                        None => batch.push((delivery, traced)),
                    }
                    if batch.len() == batch_size {
                        break;
                    }
                }
                // Taken as each starts, not as the chunk leaves the lane: the
                // rest of a chunk in hand waits as long as one in the lane.
                self.pace.took(taken);
                if batch.is_empty() {
                    continue;
                }
                let (started, results) = {
                    let inputs: Vec<(&Message, u32)> = batch
                        .iter()
                        .map(|(delivery, _)| (&delivery.message, delivery.attempt))
                        .collect();
                    // One call for a batch: each delivery's handling spans
                    // it, and the plugin's log lines go to the first's.
                    let (first, handling) = match batch.as_slice() {
                        [(_, traced), ..] if traced.span.is_disabled() => {
                            (Span::none(), Vec::new())
                        }
                        _ => {
                            let mut handling: Vec<Span> = batch
                                .iter()
                                .map(|(delivery, traced)| traced.handling(delivery.attempt))
                                .collect();
                            (handling.swap_remove(0), handling)
                        }
                    };
                    let started = Instant::now();
                    let results = match inputs.as_slice() {
                        [(message, attempt)] => {
                            vec![worker.handle(message, *attempt).instrument(first).await]
                        }
                        _ => worker.handle_batch(&inputs).instrument(first).await,
                    };
                    drop(handling);
                    self.stats.handler_latency.observe(started.elapsed());
                    (started, results)
                };
                let count = batch.len();
                for ((delivery, traced), result) in batch.into_iter().zip(results) {
                    let (verdict, span) = self.verdict(worker, &delivery, traced, result).await;
                    if let (true, Verdict::Nack(delay), Some(key)) =
                        (self.spec.ordered, &verdict, &delivery.message.key)
                    {
                        sent_back.insert(key.clone(), *delay);
                    }
                    finished.push(Finished {
                        delivery,
                        verdict,
                        span,
                    });
                }
                // The pace counts an ordered route's retries in place too,
                // since the lane waits through them.
                self.pace.handled(count, started.elapsed());
                // A slow handler's results must not wait for the rest of
                // the chunk: what a long call finished goes in at once.
                if handed_in.elapsed() >= HAND_IN_AFTER {
                    // The settler outlives every worker.
                    let _ = settler.send(std::mem::take(&mut finished));
                    handed_in = Instant::now();
                }
            }
            if !finished.is_empty() {
                let _ = settler.send(finished);
            }
        }
    }

    /// What becomes of a delivery the handler answered `result` for. On an
    /// ordered route a failed message is retried here, holding back later
    /// messages of its key, until it succeeds or its attempts are used up.
    /// Returns the delivery's span with the outcome recorded.
    async fn verdict(
        &self,
        worker: &mut dyn Worker,
        delivery: &Delivery,
        mut traced: Traced,
        mut result: Result<Outcome, CallError>,
    ) -> (Verdict, Span) {
        let mut attempt = delivery.attempt;
        loop {
            let (cause, reason) = match result {
                Ok(Outcome::Outputs(mut outputs)) => {
                    if !outputs.is_empty() {
                        let hops = (delivery.message.hops() + 1).to_string();
                        let trace = traced.trace(&delivery.message);
                        let input = &delivery.message;
                        // An output to the input's reply topic is its reply.
                        let reply = input
                            .header(headers::REPLY_TO)
                            .zip(input.header(headers::CORRELATION_ID));
                        for output in &mut outputs {
                            output.set_header(headers::CAUSATION_ID, input.id.clone());
                            output.set_header(headers::HOPS, hops.clone());
                            trace.stamp(output);
                            if let Some((reply_to, correlation)) = reply
                                && output.topic == reply_to
                            {
                                output.set_header(headers::CORRELATION_ID, correlation);
                            }
                        }
                    }
                    let verdict = Verdict::Publish {
                        outputs,
                        dead_letter: false,
                    };
                    return (verdict, traced.ended("published"));
                }
                Ok(Outcome::Retry(reason)) => ("retry", reason),
                Ok(Outcome::Reject(reason)) => {
                    let trace = traced.trace(&delivery.message);
                    let verdict = Verdict::dead_letter(traced.span.in_scope(|| {
                        self.dead_letter(&delivery.message, attempt, "rejected", &reason, trace)
                    }));
                    return (verdict, traced.ended("dead-lettered"));
                }
                Err(error) => {
                    RouteStats::add(&self.stats.plugin_errors, 1);
                    (error.cause(), error.to_string())
                }
            };
            if !self.spec.retry.may_retry(attempt) {
                let reason = format!("{reason} (after {attempt} attempts)");
                let trace = traced.trace(&delivery.message);
                let verdict = Verdict::dead_letter(traced.span.in_scope(|| {
                    self.dead_letter(
                        &delivery.message,
                        attempt,
                        "attempts-exhausted",
                        &reason,
                        trace,
                    )
                }));
                return (verdict, traced.ended("dead-lettered"));
            }
            RouteStats::add(&self.stats.retried, 1);
            let delay = self.spec.retry.backoff(attempt);
            traced.span.in_scope(|| {
                tracing::debug!(message = %delivery.message.id, attempt, cause, ?delay, "{reason}");
            });
            if self.spec.ordered && !self.shutdown.is_cancelled() {
                // Hold the key's lane: later messages of this key must wait.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {
                        attempt += 1;
                        let started = Instant::now();
                        result = worker
                            .handle(&delivery.message, attempt)
                            .instrument(traced.handling(attempt))
                            .await;
                        self.stats.handler_latency.observe(started.elapsed());
                        continue;
                    }
                    _ = self.shutdown.cancelled() => {}
                }
            }
            return (Verdict::Nack(delay), traced.ended("retry"));
        }
    }

    /// Why a message must not be handled at all, if it must not: its
    /// backend could not decode it, it is larger than the host takes, or
    /// its chain has passed through
    /// `max_hops` routes already (a plugin feeding its own input, or two
    /// routes feeding each other, would loop forever).
    fn unfit(&self, message: &Message) -> Option<(&'static str, String)> {
        if let Some(error) = message.header(headers::UNDECODABLE) {
            // Reported once, here, loudly: the message leaves for the
            // dead-letter topic and is never fetched again.
            RouteStats::add(&self.stats.undecodable, 1);
            tracing::error!(message = %message.id, topic = %message.topic, "a stored message cannot be decoded; dead-lettering its raw bytes: {error}");
            return Some(("undecodable", error.to_string()));
        }
        let size = message.size();
        if size > self.spec.max_message_bytes {
            return Some((
                "too-large",
                format!(
                    "{size} bytes exceed max_message_bytes ({})",
                    self.spec.max_message_bytes
                ),
            ));
        }
        let hops = message.hops();
        (hops >= self.spec.max_hops).then(|| {
            (
                "hop-limit",
                format!(
                    "passed through {hops} routes (max_hops {})",
                    self.spec.max_hops
                ),
            )
        })
    }

    /// The input, unchanged, addressed to the dead-letter topic with headers
    /// saying why.
    pub(super) fn dead_letter(
        &self,
        original: &Message,
        attempt: u32,
        cause: &str,
        reason: &str,
        trace: Trace,
    ) -> Message {
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
        trace.stamp(&mut letter);
        tracing::warn!(message = %original.id, topic = %self.spec.dead_letter_topic, cause, "dead-lettering: {reason}");
        letter
    }
}
