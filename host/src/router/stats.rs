//! Counters of one route, shared by its tasks and read for the summary.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

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
    /// Deliveries fetched and not yet settled.
    pub in_flight: AtomicI64,
    /// Milliseconds since the epoch of the last fetch or settle.
    pub last_activity_ms: AtomicU64,
}

impl RouteStats {
    pub fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
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
    pub in_flight: i64,
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, succeeded {}, outputs {}, retried {}, dead-lettered {}, plugin errors {}, backend errors {}",
            self.received,
            self.succeeded,
            self.published,
            self.retried,
            self.dead_lettered,
            self.plugin_errors,
            self.backend_errors
        )
    }
}
