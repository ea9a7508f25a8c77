//! The fetcher: pulls batches from the subscription and hands them to the
//! worker lanes in chunks, one hand-off per chunk rather than per message.
//!
//! How much it fetches is bounded twice: by the route's `max_in_flight`
//! (fetched and not yet settled), and by what the workers can start within
//! half a lease at the pace they are handling messages, so that a delivery
//! never waits in a lane until its lease runs out and a second consumer
//! gets it too. A route with `max_rate` also fetches no more than its token
//! bucket allows, so messages beyond the rate wait in the backend.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Context, RouteStats};
use crate::backend::Delivery;
use crate::message::headers;
use crate::rate::TokenBucket;

/// The smallest batch the fetcher asks for once it knows the handler's
/// pace: a round trip per few dozen messages held the routes of a low
/// concurrency well below a plain client loop (on SQLite, 0.63 of it with 32
/// at concurrency 1, 0.99 with 128).
const FETCH_BATCH_MIN: usize = 128;

/// What the fetcher asks for before the first handler call, while the
/// pace is unknown: a slow handler must not find a large batch waiting past
/// its lease.
const FIRST_FETCH: usize = 32;

/// The largest batch the fetcher asks for.
const FETCH_BATCH_MAX: usize = 256;

/// How long one fetch waits before the fetcher checks for shutdown again.
const FETCH_WAIT: Duration = Duration::from_millis(250);

impl Context {
    pub(super) async fn fetch_loop(&self, lanes: &[async_channel::Sender<Vec<Delivery>>]) {
        // Fetch well ahead of the workers: a round trip to the broker per
        // couple of messages would cap a route far below what it can do.
        // Fetched messages wait in the lanes, leased, until a worker is free.
        let batch = (self.spec.concurrency * 2).clamp(FETCH_BATCH_MIN, FETCH_BATCH_MAX);
        let mut failures = 0u32;
        let mut paused = self.control.paused.subscribe();
        // A tenth of a second's worth in a burst keeps any window of a
        // second or more within a tenth of the rate.
        let mut rate = self
            .spec
            .max_rate
            .map(|per_second| TokenBucket::new(per_second, per_second / 10.0));
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
            let Some(room) = self.reserve(batch).await else {
                break;
            };
            let room = match &mut rate {
                Some(bucket) => {
                    let Some(allowed) = self.within_rate(bucket, room).await else {
                        self.in_flight.add_permits(room);
                        break;
                    };
                    self.in_flight.add_permits(room - allowed);
                    allowed
                }
                None => room,
            };
            let deliveries = match self.subscription.fetch(room, FETCH_WAIT).await {
                Ok(deliveries) => {
                    failures = 0;
                    self.stats.fetch_succeeded();
                    if let Some(bucket) = &mut rate {
                        bucket.give_back(room - deliveries.len().min(room));
                    }
                    deliveries
                }
                Err(e) => {
                    if let Some(bucket) = &mut rate {
                        bucket.give_back(room);
                    }
                    self.in_flight.add_permits(room);
                    failures += 1;
                    self.stats.fetch_failed(&e);
                    RouteStats::add(&self.stats.backend_errors, 1);
                    let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tracing::warn!("fetch failed, retrying in {pause:?}: {e:#}");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            // The settler gives back a permit per delivery it settles.
            self.in_flight
                .add_permits(room - deliveries.len().min(room));
            if deliveries.is_empty() {
                continue;
            }
            let mut deliveries = deliveries;
            if self.spec.redriven {
                restore_topics(&mut deliveries);
            }
            self.stats.touch();
            RouteStats::add(&self.stats.received, deliveries.len() as u64);
            let held = self
                .stats
                .in_flight
                .fetch_add(deliveries.len() as i64, Ordering::Relaxed);
            if held == 0 {
                // A route that was idle starts the stall clock now.
                self.stats.progressed();
            }
            self.pace
                .queued
                .fetch_add(deliveries.len(), Ordering::Relaxed);
            // Sends fail only if every worker is gone, which happens only
            // after this loop ends.
            if lanes.len() == 1 {
                // One queue all workers share: a share for each, so idle
                // workers each take one.
                let share = deliveries.len().div_ceil(self.spec.concurrency.max(1));
                let mut rest = deliveries;
                while !rest.is_empty() {
                    let tail = rest.split_off(share.min(rest.len()));
                    let _ = lanes[0].send(rest).await;
                    rest = tail;
                }
            } else {
                // Ordered: every message of a key goes to the same lane.
                let mut chunks: Vec<Vec<Delivery>> = lanes.iter().map(|_| Vec::new()).collect();
                for delivery in deliveries {
                    let mut hasher = DefaultHasher::new();
                    match &delivery.message.key {
                        Some(key) => key.hash(&mut hasher),
                        None => delivery.message.id.hash(&mut hasher),
                    }
                    chunks[(hasher.finish() % lanes.len() as u64) as usize].push(delivery);
                }
                for (lane, chunk) in lanes.iter().zip(chunks) {
                    if !chunk.is_empty() {
                        let _ = lane.send(chunk).await;
                    }
                }
            }
        }
    }

    /// Waits for `bucket` to allow at least one message, then takes what it
    /// allows up to `room`; `None` on shutdown.
    async fn within_rate(&self, bucket: &mut TokenBucket, room: usize) -> Option<usize> {
        loop {
            match bucket.take_up_to(room) {
                Ok(allowed) => return Some(allowed),
                Err(wait) => tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.shutdown.cancelled() => return None,
                },
            }
        }
    }

    /// Waits until at least one delivery may be in flight and the workers
    /// can start it within half a lease, then takes room for up to `batch`
    /// such deliveries; `None` on shutdown.
    async fn reserve(&self, batch: usize) -> Option<usize> {
        let batch = loop {
            let startable = self.pace.startable(
                self.spec.subscribe.lease / 2,
                self.spec.concurrency.max(1),
                batch,
            );
            if startable > 0 {
                break startable;
            }
            tokio::select! {
                _ = self.pace.taken.notified() => {}
                _ = self.shutdown.cancelled() => return None,
            }
        };
        let first = tokio::select! {
            permit = self.in_flight.acquire() => permit.ok()?,
            _ = self.shutdown.cancelled() => return None,
        };
        first.forget();
        let more = self.in_flight.available_permits().min(batch - 1);
        if let Ok(permits) = self.in_flight.try_acquire_many(more as u32) {
            permits.forget();
            return Some(1 + more);
        }
        Some(1)
    }
}

/// Puts each redriven delivery back under the topic it was dead-lettered
/// from, so the plugin sees what it saw the first time. (Backends settle by
/// receipt, never by the message's topic.)
fn restore_topics(deliveries: &mut [Delivery]) {
    for delivery in deliveries {
        let message = &mut delivery.message;
        if let Some(original) = message.header(headers::ORIGINAL_TOPIC) {
            message.topic = original.to_string();
        }
    }
}

/// How fast the workers get through messages, for the fetcher to fetch no
/// more than they can start within a lease.
#[derive(Default)]
pub(super) struct Pace {
    /// Deliveries handed to the lanes and not yet started by a worker.
    queued: AtomicUsize,
    /// A worker's time per message, in nanoseconds: its handler calls and,
    /// on an ordered route, its retries in place (a moving average; 0 until
    /// the first call).
    per_message_nanos: AtomicU64,
    /// Woken when a worker starts deliveries.
    taken: Notify,
}

impl Pace {
    /// A worker started `count` more deliveries of what it took from its
    /// lane.
    pub(super) fn took(&self, count: usize) {
        self.queued.fetch_sub(count, Ordering::Relaxed);
        self.taken.notify_one();
    }

    /// A worker spent `elapsed` on `count` messages.
    pub(super) fn handled(&self, count: usize, elapsed: Duration) {
        let sample = (elapsed.as_nanos() / count.max(1) as u128).min(u64::MAX as u128) as u64;
        let old = self.per_message_nanos.load(Ordering::Relaxed);
        let average = if old == 0 {
            sample.max(1)
        } else {
            (old * 7 + sample) / 8
        };
        self.per_message_nanos
            .store(average.max(1), Ordering::Relaxed);
    }

    /// How many more deliveries `workers` can start within `window`, up to
    /// `batch`; before the first call, [`FIRST_FETCH`].
    fn startable(&self, window: Duration, workers: usize, batch: usize) -> usize {
        let queued = self.queued.load(Ordering::Relaxed);
        let per_message = self.per_message_nanos.load(Ordering::Relaxed);
        if per_message == 0 {
            return FIRST_FETCH.min(batch).saturating_sub(queued);
        }
        let budget = window.as_nanos() * workers as u128 / per_message as u128;
        // One at a time even when a message takes longer than the window:
        // the lease check at startup keeps a call shorter than the lease.
        (budget.clamp(1, usize::MAX as u128) as usize)
            .saturating_sub(queued)
            .min(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(15);

    #[test]
    fn before_any_call_fetches_a_small_batch() {
        let pace = Pace::default();
        assert_eq!(pace.startable(WINDOW, 4, 256), FIRST_FETCH);
        pace.queued.store(FIRST_FETCH, Ordering::Relaxed);
        assert_eq!(pace.startable(WINDOW, 4, 256), 0);
    }

    #[test]
    fn fast_handlers_get_whole_batches() {
        let pace = Pace::default();
        pace.handled(100, Duration::from_micros(500));
        assert_eq!(pace.startable(WINDOW, 1, 256), 256);
    }

    #[test]
    fn slow_handlers_get_what_they_can_start_within_the_window() {
        let pace = Pace::default();
        pace.handled(1, Duration::from_secs(1));
        // 2 workers × 15 s ÷ 1 s a message, 10 of them already waiting.
        pace.queued.store(10, Ordering::Relaxed);
        assert_eq!(pace.startable(WINDOW, 2, 256), 20);
    }

    #[test]
    fn a_handler_slower_than_the_window_still_gets_one_at_a_time() {
        let pace = Pace::default();
        pace.handled(1, Duration::from_secs(20));
        assert_eq!(pace.startable(WINDOW, 1, 256), 1);
        pace.queued.store(1, Ordering::Relaxed);
        assert_eq!(pace.startable(WINDOW, 1, 256), 0);
        pace.took(1);
        assert_eq!(pace.startable(WINDOW, 1, 256), 1);
    }
}
