//! Counters of one route, shared by its tasks and read for the summary.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::message::now_ms;

#[derive(Debug, Default)]
pub struct RouteStats {
    /// Deliveries fetched (redeliveries included).
    pub received: AtomicU64,
    /// Inputs handled and acknowledged.
    pub succeeded: AtomicU64,
    /// Outputs published.
    pub published: AtomicU64,
    /// Failed attempts scheduled for another try.
    pub retried: AtomicU64,
    /// Inputs sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Calls that trapped, timed out or hit the memory cap.
    pub plugin_errors: AtomicU64,
    /// Backend operations that failed (publish, ack, nack, fetch).
    pub backend_errors: AtomicU64,
    /// Deliveries whose lease ran out before they were settled: another
    /// consumer has them now, and this one dropped its result.
    pub lease_lost: AtomicU64,
    /// Stored messages the backend could not decode, dead-lettered raw.
    pub undecodable: AtomicU64,
    /// Deliveries fetched and not yet settled.
    pub in_flight: AtomicI64,
    /// Milliseconds since the epoch of the last fetch or settle.
    pub last_activity_ms: AtomicU64,
    /// The subscription is open and its last fetch succeeded.
    pub backend_ok: AtomicBool,
    /// Milliseconds since the epoch of the first failed fetch since the last
    /// one that succeeded; 0 while fetches succeed.
    pub failing_since_ms: AtomicU64,
    /// Why the last fetch failed, while fetches fail.
    pub fetch_error: Mutex<Option<String>>,
    /// Milliseconds since the epoch of the last settlement, or of the moment
    /// the route went from holding nothing to holding deliveries.
    pub last_progress_ms: AtomicU64,
    /// Time spent in the handler per call.
    pub handler_latency: Histogram,
}

/// Upper bounds of the latency buckets, in seconds (Prometheus style).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A fixed-bucket histogram, updated without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative).
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bound, total count, and sum in seconds.
    pub fn read(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut running = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                running += n.load(Ordering::Relaxed);
                (*bound, running)
            })
            .collect();
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

impl RouteStats {
    pub fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A fetch failed with `error`.
    pub fn fetch_failed(&self, error: &anyhow::Error) {
        self.backend_ok.store(false, Ordering::Relaxed);
        let _ = self.failing_since_ms.compare_exchange(
            0,
            now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        *self.fetch_error.lock().unwrap() = Some(format!("{error:#}"));
    }

    /// A fetch succeeded.
    pub fn fetch_succeeded(&self) {
        self.backend_ok.store(true, Ordering::Relaxed);
        if self.failing_since_ms.swap(0, Ordering::Relaxed) != 0 {
            *self.fetch_error.lock().unwrap() = None;
        }
    }

    /// Deliveries were settled: the route moves.
    pub fn progressed(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Why the route cannot be counted on, if so: its fetches have failed
    /// for `after`, or it has held deliveries without settling any for
    /// `after` (a handler or a settlement that hangs).
    pub fn trouble(&self, after: Duration) -> Option<String> {
        let now = now_ms();
        let after_ms = after.as_millis() as u64;
        let failing_since = self.failing_since_ms.load(Ordering::Relaxed);
        if failing_since != 0 && now.saturating_sub(failing_since) >= after_ms {
            let why = self.fetch_error.lock().unwrap().clone().unwrap_or_default();
            return Some(format!(
                "fetches failing for {}s: {why}",
                now.saturating_sub(failing_since) / 1000
            ));
        }
        let held = self.in_flight.load(Ordering::Relaxed);
        let quiet = now.saturating_sub(self.last_progress_ms.load(Ordering::Relaxed));
        if held > 0 && quiet >= after_ms {
            return Some(format!(
                "stalled: {held} message(s) held, none settled for {}s",
                quiet / 1000
            ));
        }
        None
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            received: get(&self.received),
            succeeded: get(&self.succeeded),
            published: get(&self.published),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            plugin_errors: get(&self.plugin_errors),
            backend_errors: get(&self.backend_errors),
            lease_lost: get(&self.lease_lost),
            undecodable: get(&self.undecodable),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub succeeded: u64,
    pub published: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub plugin_errors: u64,
    pub backend_errors: u64,
    pub lease_lost: u64,
    pub undecodable: u64,
    pub in_flight: i64,
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, succeeded {}, outputs {}, retried {}, dead-lettered {}, plugin errors {}, backend errors {}, leases lost {}, undecodable {}",
            self.received,
            self.succeeded,
            self.published,
            self.retried,
            self.dead_lettered,
            self.plugin_errors,
            self.backend_errors,
            self.lease_lost,
            self.undecodable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_in_trouble_when_fetches_fail_or_nothing_settles_for_long() {
        let stats = RouteStats::default();
        let after = Duration::from_secs(1);
        stats.fetch_succeeded();
        assert_eq!(stats.trouble(after), None);

        // Holding deliveries is fine while they settle.
        stats.in_flight.store(3, Ordering::Relaxed);
        stats.progressed();
        assert_eq!(stats.trouble(after), None);
        stats
            .last_progress_ms
            .store(now_ms() - 5_000, Ordering::Relaxed);
        let why = stats.trouble(after).expect("stalled");
        assert!(why.starts_with("stalled: 3 message(s) held"), "{why}");
        // An idle route holds nothing, however long ago it settled.
        stats.in_flight.store(0, Ordering::Relaxed);
        assert_eq!(stats.trouble(after), None);

        // A failed fetch is forgiven until it has lasted `after`.
        stats.fetch_failed(&anyhow::anyhow!("connection refused"));
        assert_eq!(stats.trouble(after), None);
        stats
            .failing_since_ms
            .store(now_ms() - 2_000, Ordering::Relaxed);
        stats.fetch_failed(&anyhow::anyhow!("connection refused again"));
        let why = stats.trouble(after).expect("failing");
        assert!(
            why.starts_with("fetches failing for 2s: connection refused again"),
            "{why}"
        );
        stats.fetch_succeeded();
        assert_eq!(stats.trouble(after), None);
    }
}
