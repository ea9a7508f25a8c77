//! The settler: settles what the workers finished, in batches.
//!
//! It takes everything that has gathered since its last round (no linger:
//! while one batch settles, the next gathers, so batches grow with the load
//! and a lone message at a low rate never waits for company), then:
//!
//! - publishes the outputs and dead letters of the whole batch in one
//!   `publish` call (the dead letters in a second one, at the same time,
//!   where the route sends them to a backend of their own), and once the
//!   backends have accepted them, acks and nacks the
//!   inputs in one `settle` call; or, on a transactional route, hands each
//!   delivery's outputs and ack to the backend in one `settle` call, each
//!   all-or-nothing;
//! - retries what failed for a transient reason, with the route's backoff;
//!   a publish that still fails sends its inputs back (nack), except on an
//!   ordered route, where it is retried in place so no later message of a
//!   key overtakes it;
//! - counts a lost lease (the delivery is another consumer's now) and
//!   stops the route on a fatal error.
//!
//! One settler per route settles its batches one after another, so outputs
//! reach the sink in the order the workers finished them.

use anyhow::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{Context, Finished, RouteStats, Verdict};
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

    /// All outputs in one publish (and dead letters in one more, where
    /// they go to a backend of their own), then all inputs settled in one
    /// call.
    async fn publish_then_settle(&self, batch: impl Iterator<Item = Finished>) {
        let mut outputs = Vec::new();
        let mut letters = Vec::new();
        let mut publishing = Vec::new();
        let mut nacks = Vec::new();
        for Finished {
            delivery, verdict, ..
        } in batch
        {
            match verdict {
                Verdict::Publish {
                    outputs: mut these,
                    dead_letter,
                } => {
                    let apart = dead_letter && self.dead_letters.is_some();
                    publishing.push((delivery, these.len() as u64, dead_letter, apart));
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
            self.publish(&self.sink, outputs),
            self.publish_dead_letters(letters)
        );
        let mut items = Vec::with_capacity(publishing.len() + nacks.len());
        for (delivery, _, _, apart) in &publishing {
            let published = if *apart {
                &letters_published
            } else {
                &published
            };
            let settlement = match published {
                Ok(()) => Settlement::Ack,
                Err(_) => self.publish_failed(delivery),
            };
            items.push((delivery, settlement));
        }
        items.extend(nacks.iter().map(|(d, delay)| (d, Settlement::Nack(*delay))));
        let results = self.settle_retrying(items).await;
        let (acks, nacks) = results.split_at(publishing.len());
        for (result, (_, outputs, dead_letter, apart)) in acks.iter().zip(&publishing) {
            let published = if *apart {
                &letters_published
            } else {
                &published
            };
            match published {
                Ok(()) => self.account(result, *outputs, *dead_letter),
                Err(_) => self.account_nack(result),
            }
        }
        nacks.iter().for_each(|result| self.account_nack(result));
    }

    /// Publishes dead letters to their own backend, if they have one.
    async fn publish_dead_letters(&self, letters: Vec<Message>) -> Result<()> {
        match &self.dead_letters {
            Some(backend) => self.publish(backend, letters).await,
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

    /// Publishes `outputs` to `backend`; on an ordered route a failure is
    /// retried here, so that no later output of a key can overtake these.
    /// A failure that stays is logged and returned.
    async fn publish(&self, backend: &Arc<dyn Backend>, outputs: Vec<Message>) -> Result<()> {
        let published = self.publish_ordered(backend, outputs).await;
        if let Err(e) = &published {
            self.backend_failed(format_args!("publishing outputs failed: {e:#}"));
        }
        published
    }

    async fn publish_ordered(
        &self,
        backend: &Arc<dyn Backend>,
        outputs: Vec<Message>,
    ) -> Result<()> {
        if outputs.is_empty() {
            return Ok(());
        }
        if !self.spec.ordered {
            return backend.publish(outputs).await;
        }
        let mut attempt = 1;
        loop {
            match backend.publish(outputs.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if self.spec.retry.may_retry(attempt) && !self.shutdown.is_cancelled() => {
                    let delay = self.spec.retry.backoff(attempt);
                    self.backend_failed(format_args!(
                        "publishing outputs failed, retrying in {delay:?}: {e:#}"
                    ));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
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
