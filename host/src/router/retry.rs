//! The retry policy: how many attempts, and how long to wait between them.

use std::time::Duration;

use rand::Rng;

use crate::config::RetryConfig;

/// Exponential backoff with jitter, capped, over a bounded number of attempts.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// Fraction of random spread around each delay.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Whether a message that failed its `attempt`-th attempt may be tried again.
    pub fn may_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay after the `attempt`-th attempt failed (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            rand::rng().random_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        Duration::from_secs_f64((capped * (1.0 + spread)).max(0.0))
    }
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(config: &RetryConfig) -> Self {
        RetryPolicy {
            max_attempts: config.max_attempts,
            initial_backoff: Duration::from_millis(config.initial_backoff_ms),
            max_backoff: Duration::from_millis(config.max_backoff_ms),
            multiplier: config.multiplier,
            jitter: config.jitter,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        (&RetryConfig::default()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1_000),
            multiplier: 2.0,
            jitter: 0.0,
        };
        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(4), Duration::from_millis(800));
        assert_eq!(policy.backoff(5), Duration::from_millis(1_000));
        assert!(policy.may_retry(4));
        assert!(!policy.may_retry(5));
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let policy = RetryPolicy {
            jitter: 0.5,
            initial_backoff: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        for _ in 0..200 {
            let delay = policy.backoff(1).as_millis();
            assert!((50..=150).contains(&delay), "{delay}");
        }
    }
}
