//! A token bucket: so many things per second, with a bounded burst. Limits
//! a route's message rate (`max_rate`) and a plugin's log lines.

use std::time::{Duration, Instant};

/// Tokens earned at a steady rate up to a capacity; taking one is doing
/// one thing.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket earning `per_second` tokens a second and holding at
    /// most `capacity` (at least one).
    pub fn new(per_second: f64, capacity: f64) -> Self {
        let capacity = capacity.max(1.0);
        TokenBucket {
            per_second,
            capacity,
            tokens: capacity,
            refilled: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.capacity);
        self.refilled = now;
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        self.refill(Instant::now());
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes as many whole tokens as there are, up to `want`; when there is
    /// not one, how long until there is.
    pub fn take_up_to(&mut self, want: usize) -> Result<usize, Duration> {
        self.refill(Instant::now());
        if self.tokens < 1.0 {
            return Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ));
        }
        let taken = (self.tokens.floor() as usize).min(want);
        self.tokens -= taken as f64;
        Ok(taken)
    }

    /// Gives back tokens taken and not used.
    pub fn give_back(&mut self, count: usize) {
        self.tokens = (self.tokens + count as f64).min(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_gives_its_capacity_then_says_how_long_to_wait() {
        let mut bucket = TokenBucket::new(10.0, 5.0);
        assert_eq!(bucket.take_up_to(100), Ok(5));
        let wait = bucket.take_up_to(1).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(wait > Duration::from_millis(50), "{wait:?}");
    }

    #[test]
    fn tokens_earned_over_time_never_exceed_the_capacity() {
        let mut bucket = TokenBucket::new(1_000_000.0, 3.0);
        assert_eq!(bucket.take_up_to(3), Ok(3));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(bucket.take_up_to(100), Ok(3));
    }

    #[test]
    fn tokens_given_back_can_be_taken_again() {
        let mut bucket = TokenBucket::new(0.001, 4.0);
        assert_eq!(bucket.take_up_to(4), Ok(4));
        bucket.give_back(2);
        assert_eq!(bucket.take_up_to(4), Ok(2));
        assert!(!bucket.try_take());
    }
}
