//! Workers: call the handler for each delivery and decide what becomes of
//! it, then hand that to the settler and take the next message at once.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::{Context, Finished, RouteStats, Verdict, Worker};
use crate::backend::Delivery;
use crate::message::{Message, headers};
use crate::runtime::{CallError, Outcome};

impl Context {
    /// Takes deliveries from `lane` (up to the route's batch size at a time,
    /// whatever is already waiting) until the fetcher closes it.
    pub(super) async fn work(
        &self,
        worker: &mut dyn Worker,
        lane: async_channel::Receiver<Delivery>,
        settler: UnboundedSender<Finished>,
    ) {
        let batch_size = self.spec.batch_size.max(1);
        let mut batch = Vec::with_capacity(batch_size);
        while let Ok(first) = lane.recv().await {
            batch.push(first);
            while batch.len() < batch_size {
                match lane.try_recv() {
                    Ok(delivery) => batch.push(delivery),
                    Err(_) => break,
                }
            }
            let results = {
                let inputs: Vec<(&Message, u32)> = batch
                    .iter()
                    .map(|delivery| (&delivery.message, delivery.attempt))
                    .collect();
                let started = Instant::now();
                let results = match inputs.as_slice() {
                    [(message, attempt)] => vec![worker.handle(message, *attempt).await],
                    _ => worker.handle_batch(&inputs).await,
                };
                self.stats.handler_latency.observe(started.elapsed());
                results
            };
            for (delivery, result) in batch.drain(..).zip(results) {
                let verdict = self.verdict(worker, &delivery, result).await;
                // The settler outlives every worker.
                let _ = settler.send(Finished { delivery, verdict });
            }
        }
    }

    /// What becomes of a delivery the handler answered `result` for. On an
    /// ordered route a failed message is retried here, holding back later
    /// messages of its key, until it succeeds or its attempts are used up.
    async fn verdict(
        &self,
        worker: &mut dyn Worker,
        delivery: &Delivery,
        mut result: Result<Outcome, CallError>,
    ) -> Verdict {
        let mut attempt = delivery.attempt;
        loop {
            let (cause, reason) = match result {
                Ok(Outcome::Outputs(mut outputs)) => {
                    for output in &mut outputs {
                        output.set_header(headers::CAUSATION_ID, delivery.message.id.clone());
                    }
                    return Verdict::Publish {
                        outputs,
                        dead_letter: false,
                    };
                }
                Ok(Outcome::Retry(reason)) => ("retry", reason),
                Ok(Outcome::Reject(reason)) => {
                    return self.dead_letter(&delivery.message, attempt, "rejected", &reason);
                }
                Err(error) => {
                    RouteStats::add(&self.stats.plugin_errors, 1);
                    (error.cause(), error.to_string())
                }
            };
            if !self.spec.retry.may_retry(attempt) {
                let reason = format!("{reason} (after {attempt} attempts)");
                return self.dead_letter(&delivery.message, attempt, "attempts-exhausted", &reason);
            }
            RouteStats::add(&self.stats.retried, 1);
            let delay = self.spec.retry.backoff(attempt);
            tracing::debug!(message = %delivery.message.id, attempt, cause, ?delay, "{reason}");
            if self.spec.ordered && !self.shutdown.is_cancelled() {
                // Hold the key's lane: later messages of this key must wait.
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {
                        attempt += 1;
                        let started = Instant::now();
                        result = worker.handle(&delivery.message, attempt).await;
                        self.stats.handler_latency.observe(started.elapsed());
                        continue;
                    }
                    _ = self.shutdown.cancelled() => {}
                }
            }
            return Verdict::Nack(delay);
        }
    }

    /// The input, unchanged, addressed to the dead-letter topic with headers
    /// saying why.
    fn dead_letter(&self, original: &Message, attempt: u32, cause: &str, reason: &str) -> Verdict {
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
        tracing::warn!(message = %original.id, topic = %self.spec.dead_letter_topic, cause, "dead-lettering: {reason}");
        Verdict::Publish {
            outputs: vec![letter],
            dead_letter: true,
        }
    }
}
