//! `rate_limit_per_second`: a token bucket per subscription and relay, which the deliverer
//! asks before each claim how many requests it may start.

use std::time::{Duration, Instant};

/// Per-relay token bucket for `rate_limit_per_second`. Holds at most one second of tokens
/// (at least one), so an idle subscriber gets a burst of at most its per-second rate.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate.max(1.0),
            refilled_at: now,
        }
    }

    pub fn set_rate(&mut self, rate: f64) {
        self.rate = rate;
    }

    fn capacity(&self) -> f64 {
        self.rate.max(1.0)
    }

    pub fn available(&mut self, now: Instant) -> usize {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity());
        self.refilled_at = now;
        self.tokens.floor().max(0.0) as usize
    }

    /// How long until the bucket holds a whole token again (as of its last refill).
    pub fn until_next_token(&self) -> Duration {
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        // A rate of 0 is refused by the table's CHECK, but any positive one is allowed, and
        // below about 1e-19/s the wait no longer fits a Duration: never a wake-up then.
        Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate).unwrap_or(Duration::MAX)
    }

    pub fn take(&mut self, count: u32) {
        self.tokens -= f64::from(count);
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;
    use std::time::{Duration, Instant};

    #[test]
    fn token_bucket_refills_at_its_rate_and_caps_at_one_second() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, start);
        assert_eq!(bucket.available(start), 2);
        bucket.take(2);
        assert_eq!(bucket.available(start), 0);
        assert_eq!(bucket.available(start + Duration::from_millis(500)), 1);
        assert_eq!(
            bucket.available(start + Duration::from_secs(60)),
            2,
            "capped"
        );
    }

    #[test]
    fn the_next_token_is_due_when_the_bucket_has_refilled_to_one() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(4.0, start);
        assert_eq!(bucket.until_next_token(), Duration::ZERO, "full");
        bucket.take(4);
        assert_eq!(bucket.until_next_token(), Duration::from_millis(250));
        assert_eq!(bucket.available(start + Duration::from_millis(125)), 0);
        assert_eq!(bucket.until_next_token(), Duration::from_millis(125));
    }

    #[test]
    fn slow_rates_still_allow_one_request() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(0.5, start);
        assert_eq!(bucket.available(start), 1);
        bucket.take(1);
        assert_eq!(bucket.available(start + Duration::from_secs(1)), 0);
        assert_eq!(bucket.available(start + Duration::from_secs(2)), 1);
    }

    /// The table allows any positive rate, however small: the wait for the next token then
    /// exceeds what a `Duration` holds, and must not panic the claim loop.
    #[test]
    fn a_vanishingly_small_rate_waits_forever_without_panicking() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1e-30, start);
        bucket.take(1);
        assert_eq!(bucket.until_next_token(), Duration::MAX);
    }
}
