//! The settler: settles what the workers finished, in batches.
//!
//! It takes everything that has gathered since its last round (no linger:
//! while one batch settles, the next gathers, so batches grow with the load
//! and a lone message at a low rate never waits for company), then:
//!
//! - publishes the outputs and dead letters of the whole batch in one
//!   `publish` call per output backend, at the same time (the dead letters
//!   in a call of their own where the route sends them to a backend of
//!   their own, as it always does with several output backends), and once
//!   every backend has accepted them, acks and nacks the inputs in one
//!   `settle` call; or, on a transactional route, hands each delivery's
//!   outputs and ack to the backend in one `settle` call, each
//!   all-or-nothing;
//! - retries what failed for a transient reason, with the route's backoff;
//!   a refused publish is tried again in place, on the refusing backends
//!   alone, where the route has several or is ordered (so no backend gets
//!   outputs twice and no later message of a key overtakes), and otherwise
//!   sends its inputs back (nack); with `output_failure = "dead-letter"`,
//!   an input whose outputs are refused past its attempts is dead-lettered;
//! - counts a lost lease (the delivery is another consumer's now) and
//!   stops the route on a fatal error.
//!
//! One settler per route settles its batches one after another, so outputs
//! reach the sink in the order the workers finished them.

use anyhow::Error;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc::UnboundedReceiver;

use super::trace::Trace;
use super::{Context, Finished, OutputFailure, RouteStats, Verdict};
use crate::backend::{Backend, Delivery, SettleError, Settlement};
use crate::message::Message;
use crate::telemetry::DELIVERY;

/// The most hand-ins (each a worker's finished deliveries) settled in one
/// round.
const SETTLE_HAND_INS_MAX: usize = 64;

impl Context {
    pub(super) async fn settle_loop(&self, mut queue: UnboundedReceiver<Vec<Finished>>) {
        let mut hand_ins = Vec::with_capacity(SETTLE_HAND_INS_MAX);
        while queue.recv_many(&mut hand_ins, SETTLE_HAND_INS_MAX).await > 0 {
            let count = hand_ins.iter().map(Vec::len).sum::<usize>();
            let batch: Vec<Finished> = hand_ins.drain(..).flatten().collect();
            // Each delivery's settling, a child of its span; the children
            // keep the delivery spans open until the round is done.
            let settling: Vec<tracing::Span> = batch
                .iter()
                .filter(|f| !f.span.is_disabled())
                .map(|f| tracing::debug_span!(target: DELIVERY, parent: &f.span, "settle", batch = count))
                .collect();
            if self.atomic {
                self.settle_atomically(batch.into_iter()).await;
            } else {
                self.publish_then_settle(batch.into_iter()).await;
            }
            drop(settling);
            // Counted down before the permits go back, so the count never
            // shows more than `max_in_flight`.
            self.stats
                .in_flight
                .fetch_sub(count as i64, Ordering::Relaxed);
            self.in_flight.add_permits(count);
            self.stats.touch();
            self.stats.progressed();
        }
    }

    /// All outputs in one publish per output backend (and dead letters in
    /// one more, where they go to a backend of their own), then all inputs
    /// settled in one call.
    async fn publish_then_settle(&self, batch: impl Iterator<Item = Finished>) {
        let mut outputs = Vec::new();
        let mut letters = Vec::new();
        let mut publishing = Vec::new();
        let mut nacks = Vec::new();
        for Finished {
            delivery,
            verdict,
            span,
        } in batch
        {
            match verdict {
                Verdict::Publish {
                    outputs: mut these,
                    dead_letter,
                } => {
                    let apart = dead_letter && self.dead_letters.is_some();
                    publishing.push(Publishing {
                        delivery,
                        span,
                        outputs: these.len() as u64,
                        dead_letter,
                        apart,
                    });
                    if apart {
                        letters.append(&mut these);
                    } else {
                        outputs.append(&mut these);
                    }
                }
                Verdict::Nack(delay) => nacks.push((delivery, delay)),
            }
        }
        let (published, letters_published) = tokio::join!(
            self.publish_to(&self.outputs, outputs),
            self.publish_dead_letters(letters)
        );
        let mut fates: Vec<Fate> = publishing
            .iter()
            .map(|p| match (p.apart, &published, &letters_published) {
                (false, Ok(()), _) | (true, _, Ok(())) => Fate::Published,
                (false, Err(refused), _)
                    if !p.dead_letter && self.gives_up(&p.delivery, refused) =>
                {
                    Fate::DeadLetter(self.output_failed(p, refused))
                }
                _ => Fate::Refused,
            })
            .collect();
        self.publish_late_letters(&mut fates).await;
        let mut items = Vec::with_capacity(publishing.len() + nacks.len());
        for (p, fate) in publishing.iter().zip(&fates) {
            let settlement = match fate {
                Fate::Published | Fate::DeadLetter(_) => Settlement::Ack,
                Fate::Refused => self.publish_failed(&p.delivery),
            };
            items.push((&p.delivery, settlement));
        }
        items.extend(nacks.iter().map(|(d, delay)| (d, Settlement::Nack(*delay))));
        let results = self.settle_retrying(items).await;
        let (acks, nacks) = results.split_at(publishing.len());
        for ((result, p), fate) in acks.iter().zip(&publishing).zip(&fates) {
            match fate {
                Fate::Published => self.account(result, p.outputs, p.dead_letter),
                Fate::DeadLetter(_) => self.account(result, 0, true),
                Fate::Refused => self.account_nack(result),
            }
        }
        nacks.iter().for_each(|result| self.account_nack(result));
    }

    /// Whether a delivery whose outputs were refused is dead-lettered now
    /// rather than sent back: so the route's `output_failure` says, and
    /// its attempts are used up (tried in place, or delivered that often).
    fn gives_up(&self, delivery: &Delivery, refused: &Refused) -> bool {
        self.spec.output_failure == OutputFailure::DeadLetter
            && !self.shutdown.is_cancelled()
            && (refused.exhausted || !self.spec.retry.may_retry(delivery.attempt))
    }

    /// The dead letter of an input whose outputs were refused.
    fn output_failed(&self, publishing: &Publishing, refused: &Refused) -> Message {
        let delivery = &publishing.delivery;
        let trace = Trace::exported(&delivery.message, &publishing.span)
            .unwrap_or_else(|| Trace::of(&delivery.message));
        publishing.span.in_scope(|| {
            self.dead_letter(
                &delivery.message,
                delivery.attempt,
                "output-failed",
                &format!("publishing its outputs failed: {:#}", refused.error),
                trace,
            )
        })
    }

    /// Publishes the dead letters of inputs whose outputs were refused;
    /// those it cannot publish are sent back after all.
    async fn publish_late_letters(&self, fates: &mut [Fate]) {
        let letters: Vec<Message> = fates
            .iter()
            .filter_map(|fate| match fate {
                Fate::DeadLetter(letter) => Some(letter.clone()),
                _ => None,
            })
            .collect();
        if letters.is_empty() {
            return;
        }
        let backend = std::slice::from_ref(self.dead_letter_backend());
        if self.publish_to(backend, letters).await.is_err() {
            for fate in fates.iter_mut() {
                if matches!(fate, Fate::DeadLetter(_)) {
                    *fate = Fate::Refused;
                }
            }
        }
    }

    fn dead_letter_backend(&self) -> &Arc<dyn Backend> {
        super::dead_letter_backend(self.dead_letters.as_ref(), &self.outputs)
    }

    /// Publishes dead letters to their own backend, if they have one.
    async fn publish_dead_letters(&self, letters: Vec<Message>) -> Result<(), Refused> {
        match &self.dead_letters {
            Some(backend) => {
                self.publish_to(std::slice::from_ref(backend), letters)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Each delivery's outputs and ack in one transaction, the whole batch
    /// in one call. Dead letters that go to a backend of their own are
    /// published there first; their inputs are then only acked.
    async fn settle_atomically(&self, batch: impl Iterator<Item = Finished>) {
        let (deliveries, mut verdicts): (Vec<Delivery>, Vec<Verdict>) =
            batch.map(|f| (f.delivery, f.verdict)).unzip();
        let letters: Vec<Message> = match self.dead_letters {
            Some(_) => verdicts
                .iter_mut()
                .filter_map(|verdict| match verdict {
                    Verdict::Publish {
                        outputs,
                        dead_letter: true,
                    } => Some(std::mem::take(outputs)),
                    _ => None,
                })
                .flatten()
                .collect(),
            None => Vec::new(),
        };
        let letters_published = self.publish_dead_letters(letters).await;
        let mut kinds = Vec::with_capacity(verdicts.len());
        let items = deliveries
            .iter()
            .zip(verdicts)
            .map(|(delivery, verdict)| match verdict {
                Verdict::Publish {
                    dead_letter: true, ..
                } if self.dead_letters.is_some() => match letters_published {
                    Ok(()) => {
                        kinds.push(Some((0, true)));
                        (delivery, Settlement::Ack)
                    }
                    Err(_) => {
                        kinds.push(None);
                        (delivery, self.publish_failed(delivery))
                    }
                },
                Verdict::Publish {
                    outputs,
                    dead_letter,
                } => {
                    kinds.push(Some((outputs.len() as u64, dead_letter)));
                    (delivery, Settlement::PublishAndAck(outputs))
                }
                Verdict::Nack(delay) => {
                    kinds.push(None);
                    (delivery, Settlement::Nack(delay))
                }
            })
            .collect();
        let results = self.settle_retrying(items).await;
        let mut failed = Vec::new();
        for ((result, kind), delivery) in results.iter().zip(&kinds).zip(&deliveries) {
            match (kind, result) {
                (Some(_), Err(SettleError::Unavailable(_))) => {
                    failed.push((delivery, self.publish_failed(delivery)));
                }
                (Some((outputs, dead_letter)), result) => {
                    self.account(result, *outputs, *dead_letter)
                }
                (None, result) => self.account_nack(result),
            }
        }
        for result in self.settle_retrying(failed).await {
            self.account_nack(&result);
        }
    }

    /// Publishes `messages` to each of `backends`. A lone backend of an
    /// unordered route gets one try (a failure sends the inputs back,
    /// to be handled again). Otherwise a backend that refuses them gets
    /// them again, alone, after the route's backoff, until it takes them,
    /// the route stops, or its `output_failure` gives up: so no backend
    /// gets them twice and, on an ordered route, no later output of a key
    /// overtakes them.
    async fn publish_to(
        &self,
        backends: &[Arc<dyn Backend>],
        messages: Vec<Message>,
    ) -> Result<(), Refused> {
        if messages.is_empty() {
            return Ok(());
        }
        if let [backend] = backends
            && !self.spec.ordered
        {
            return backend
                .publish(messages)
                .await
                .map_err(|error| self.refused(error, false));
        }
        let mut pending: Vec<&Arc<dyn Backend>> = backends.iter().collect();
        let mut attempt = 1;
        loop {
            let results = futures::future::join_all(
                pending
                    .iter()
                    .map(|backend| backend.publish(messages.clone())),
            )
            .await;
            let mut refusing = Vec::new();
            let mut errors = Vec::new();
            for (backend, result) in pending.iter().zip(results) {
                if let Err(e) = result {
                    errors.push(format!("{}: {e:#}", backend.kind()));
                    refusing.push(*backend);
                }
            }
            if refusing.is_empty() {
                return Ok(());
            }
            pending = refusing;
            let error = Error::msg(errors.join("; "));
            let exhausted = self.spec.output_failure == OutputFailure::DeadLetter
                && !self.spec.retry.may_retry(attempt);
            if exhausted || self.shutdown.is_cancelled() {
                return Err(self.refused(error, exhausted));
            }
            let delay = self.spec.retry.backoff(attempt);
            self.backend_failed(format_args!(
                "publishing {} messages failed on {} of {} backends, trying them again in \
                 {delay:?}: {error:#}",
                messages.len(),
                pending.len(),
                backends.len()
            ));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => {}
            }
            attempt += 1;
        }
    }

    /// A publish that failed for good: logged, and said why.
    fn refused(&self, error: Error, exhausted: bool) -> Refused {
        self.backend_failed(format_args!("publishing outputs failed: {error:#}"));
        Refused { error, exhausted }
    }

    /// Settles `items`, trying again with the route's backoff those that
    /// failed for a transient reason and can be repeated, for as many
    /// attempts as the route's retry policy allows.
    async fn settle_retrying(
        &self,
        items: Vec<(&Delivery, Settlement)>,
    ) -> Vec<Result<(), SettleError>> {
        if items.is_empty() {
            return Vec::new();
        }
        let ordered = self.spec.ordered;
        let mut again: Vec<Option<Settlement>> =
            items.iter().map(|(_, s)| repeatable(s, ordered)).collect();
        let deliveries: Vec<&Delivery> = items.iter().map(|(d, _)| *d).collect();
        let mut results = self.subscription.settle(items).await;
        let mut attempt = 1;
        loop {
            let retry: Vec<usize> = (0..results.len())
                .filter(|&i| {
                    matches!(results[i], Err(SettleError::Unavailable(_))) && again[i].is_some()
                })
                .collect();
            if retry.is_empty() || !self.spec.retry.may_retry(attempt) {
                return results;
            }
            let delay = self.spec.retry.backoff(attempt);
            if let Some(Err(e)) = retry.first().map(|&i| &results[i]) {
                self.backend_failed(format_args!(
                    "settling {} deliveries failed, retrying in {delay:?}: {e}",
                    retry.len()
                ));
            }
            tokio::time::sleep(delay).await;
            let items = retry
                .iter()
                .map(|&i| {
                    let settlement = again[i].take().expect("repeatable");
                    again[i] = repeatable(&settlement, ordered);
                    (deliveries[i], settlement)
                })
                .collect();
            for (i, result) in retry.into_iter().zip(self.subscription.settle(items).await) {
                results[i] = result;
            }
            attempt += 1;
        }
    }

    /// The settlement of a delivery whose outputs could not be published:
    /// it comes back after the route's backoff.
    fn publish_failed(&self, delivery: &Delivery) -> Settlement {
        RouteStats::add(&self.stats.retried, 1);
        Settlement::Nack(self.spec.retry.backoff(delivery.attempt))
    }

    /// Counts how a publish-and-ack ended.
    fn account(&self, result: &Result<(), SettleError>, outputs: u64, dead_letter: bool) {
        match result {
            Ok(()) if dead_letter => RouteStats::add(&self.stats.dead_lettered, 1),
            Ok(()) => {
                RouteStats::add(&self.stats.succeeded, 1);
                RouteStats::add(&self.stats.published, outputs);
            }
            Err(e) => self.settle_failed(e),
        }
    }

    fn account_nack(&self, result: &Result<(), SettleError>) {
        if let Err(e) = result {
            self.settle_failed(e);
        }
    }

    fn settle_failed(&self, error: &SettleError) {
        match error {
            SettleError::LeaseLost => {
                // Another consumer has the message now; handling it again
                // here would only duplicate its outputs.
                RouteStats::add(&self.stats.lease_lost, 1);
                tracing::debug!("{error}");
            }
            SettleError::Closed => tracing::debug!("{error}"),
            SettleError::Unavailable(e) => {
                // The message comes back after its lease; outputs may repeat.
                self.backend_failed(format_args!("settling failed: {e:#}"));
            }
            SettleError::Fatal(e) => {
                RouteStats::add(&self.stats.backend_errors, 1);
                self.stop_with(Error::msg(format!("settling failed: {e:#}")));
            }
        }
    }

    fn backend_failed(&self, what: std::fmt::Arguments<'_>) {
        RouteStats::add(&self.stats.backend_errors, 1);
        tracing::error!("{what}");
    }
}

/// A copy of a settlement to send again if it fails for a transient
/// reason. Outputs are copied only on ordered routes, where a failed
/// publish-and-ack is retried in place; elsewhere its input comes back.
fn repeatable(settlement: &Settlement, ordered: bool) -> Option<Settlement> {
    match settlement {
        Settlement::Ack => Some(Settlement::Ack),
        Settlement::Nack(delay) => Some(Settlement::Nack(*delay)),
        Settlement::PublishAndAck(outputs) if ordered => {
            Some(Settlement::PublishAndAck(outputs.clone()))
        }
        Settlement::PublishAndAck(_) => None,
    }
}

/// A delivery whose outputs (or dead letter) the settler publishes.
struct Publishing {
    delivery: Delivery,
    span: tracing::Span,
    outputs: u64,
    dead_letter: bool,
    /// Its dead letter goes to a backend of its own.
    apart: bool,
}

/// How a publishing delivery ends.
enum Fate {
    /// Its outputs (or dead letter) were published: ack it.
    Published,
    /// Its outputs were refused: send it back.
    Refused,
    /// Its outputs were refused for good: dead-letter it, then ack it.
    DeadLetter(Message),
}

/// Why messages were not published.
struct Refused {
    error: Error,
    /// Tried in place until the route's `output_failure` gave up (not
    /// tried once only, nor cut short by the route stopping).
    exhausted: bool,
}
