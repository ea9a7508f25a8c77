//! The fetcher: pulls batches from the subscription, as many as the route's
//! in-flight bound allows, and hands each delivery to a worker lane.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Context, RouteStats};
use crate::backend::Delivery;

/// The smallest batch the fetcher asks for.
const FETCH_BATCH_MIN: usize = 32;

/// The largest batch the fetcher asks for.
const FETCH_BATCH_MAX: usize = 256;

/// How long one fetch waits before the fetcher checks for shutdown again.
const FETCH_WAIT: Duration = Duration::from_millis(250);

impl Context {
    pub(super) async fn fetch_loop(&self, lanes: &[async_channel::Sender<Delivery>]) {
        // Fetch well ahead of the workers: a round trip to the broker per
        // couple of messages would cap a route far below what it can do.
        // Fetched messages wait in the lanes, leased, until a worker is free.
        let batch = (self.spec.concurrency * 2).clamp(FETCH_BATCH_MIN, FETCH_BATCH_MAX);
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
            let Some(room) = self.reserve(batch).await else {
                break;
            };
            let deliveries = match self.subscription.fetch(room, FETCH_WAIT).await {
                Ok(deliveries) => {
                    failures = 0;
                    self.stats.backend_ok.store(true, Ordering::Relaxed);
                    deliveries
                }
                Err(e) => {
                    self.in_flight.add_permits(room);
                    failures += 1;
                    self.stats.backend_ok.store(false, Ordering::Relaxed);
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

    /// Waits until at least one delivery may be in flight, then takes room
    /// for up to `batch`; `None` on shutdown.
    async fn reserve(&self, batch: usize) -> Option<usize> {
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
