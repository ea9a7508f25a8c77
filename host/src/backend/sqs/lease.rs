//! The lease: the visibility timeout a receive asks for, kept up by a
//! heartbeat while a delivery is held, and the delays nacks may ask for.
//!
//! SQS counts visibility in whole seconds, so a lease or delay is rounded
//! up (a 500 ms lease is 1 s; a nack is never redelivered early). A message
//! may stay invisible at most 12 hours from its first receive: a nack's
//! delay is cut to what is left of that, and the heartbeat stops extending
//! a delivery held that long.
//!
//! The heartbeat (`heartbeat=true`, the default) extends every delivery
//! held longer than half the lease by another lease, so a slow handler, a
//! backoff in an ordered lane or a full worker queue does not let the lease
//! run out under a live consumer. A consumer that made no call (fetch, ack,
//! nack) for a whole lease is taken for stalled and gets no more
//! extensions, so its deliveries return to the group.
//!
//! An extension leaves half a lease for SQS to take it, so a lease must be
//! more than twice SQS's slowest answer: with leases of 2 s, an emulator
//! that took up to 1.75 s per call on a busy machine let live consumers
//! lose their deliveries, which went round the group until their attempts
//! were spent.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::settle::change_visibility;
use super::subscription::Inner;

/// SQS's longest visibility, counted from a message's first receive.
const MAX_VISIBILITY_S: u64 = 12 * 60 * 60;

/// A lease in SQS's whole seconds.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSeconds {
    pub seconds: i32,
    pub duration: Duration,
}

impl LeaseSeconds {
    pub fn of(lease: Duration) -> Self {
        let seconds = whole_seconds(lease).clamp(1, MAX_VISIBILITY_S);
        LeaseSeconds {
            seconds: seconds as i32,
            duration: Duration::from_secs(seconds),
        }
    }
}

fn whole_seconds(duration: Duration) -> u64 {
    duration.as_millis().div_ceil(1000) as u64
}

/// The visibility timeout that redelivers a message received at
/// `received` after `delay` (or as late as SQS allows).
pub fn delay_seconds(delay: Duration, received: Instant) -> i32 {
    let left = MAX_VISIBILITY_S.saturating_sub(received.elapsed().as_secs() + 1);
    whole_seconds(delay).min(left) as i32
}

/// Extends held deliveries while the subscription shows signs of life.
pub async fn keep_alive(inner: Weak<Inner>) {
    let lease = match inner.upgrade() {
        Some(inner) => inner.lease,
        None => return,
    };
    let tick = (lease.duration / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if inner.last_call.lock().unwrap().elapsed() >= lease.duration {
            continue;
        }
        let now = Instant::now();
        let mut due: Vec<Vec<(String, i32)>> = vec![Vec::new(); inner.queues.len()];
        let mut tokens: Vec<Vec<u64>> = vec![Vec::new(); inner.queues.len()];
        {
            let state = inner.state.lock().unwrap();
            for (token, held) in &state.held {
                if now.duration_since(held.extended) < lease.duration / 2 {
                    continue;
                }
                let seconds = delay_seconds(lease.duration, held.received);
                if seconds == 0 {
                    continue;
                }
                due[held.queue].push((held.receipt.clone(), seconds));
                tokens[held.queue].push(*token);
            }
        }
        for (queue, entries) in due.iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            // Counted from when it was asked for, and only where SQS took
            // it: a delivery whose extension failed keeps its old lease, so
            // it is not handed out after SQS made it visible again.
            let refused =
                match change_visibility(&inner.sqs, &inner.queues[queue].url, entries).await {
                    Ok(refused) => refused,
                    Err(e) => {
                        tracing::debug!(group = %inner.group, "lease extension: {e:#}");
                        continue;
                    }
                };
            let mut state = inner.state.lock().unwrap();
            for (i, token) in tokens[queue].iter().enumerate() {
                if refused.contains(&i) {
                    continue;
                }
                if let Some(held) = state.held.get_mut(token) {
                    held.extended = now;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_and_delays_round_up_to_whole_seconds() {
        assert_eq!(LeaseSeconds::of(Duration::from_millis(500)).seconds, 1);
        assert_eq!(LeaseSeconds::of(Duration::from_millis(30_000)).seconds, 30);
        assert_eq!(
            LeaseSeconds::of(Duration::from_secs(100_000)).seconds,
            43_200
        );
        let now = Instant::now();
        assert_eq!(delay_seconds(Duration::ZERO, now), 0);
        assert_eq!(delay_seconds(Duration::from_millis(700), now), 1);
        assert_eq!(delay_seconds(Duration::from_secs(86_400), now), 43_199);
    }
}
