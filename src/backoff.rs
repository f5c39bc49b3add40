//! A pause that doubles after each use, up to a cap: the one shape of every retry and
//! look-again loop in the relay (database errors, reconnects, held locks, pending probes).

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `start` (never above `max`), doubling to `max`.
    pub fn new(start: Duration, max: Duration) -> Backoff {
        let start = start.min(max);
        Backoff {
            start,
            max,
            current: start,
        }
    }

    /// The pause the next wait will take (for logs: `retry_in`).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The pause to wait now; the one after it is twice as long, up to the cap.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.current;
        self.current = self
            .current
            .checked_mul(2)
            .map_or(self.max, |doubled| doubled.min(self.max));
        pause
    }

    /// Back to the first pause, after a success.
    pub fn reset(&mut self) {
        self.current = self.start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let pauses: Vec<Duration> = (0..5).map(|_| backoff.next_pause()).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        backoff.reset();
        assert_eq!(backoff.current(), ms(100));
    }

    #[test]
    fn a_start_above_the_cap_is_the_cap_and_huge_values_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(9), Duration::from_secs(5));
        assert_eq!(backoff.next_pause(), Duration::from_secs(5));
        let mut huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.next_pause(), Duration::MAX);
        assert_eq!(huge.next_pause(), Duration::MAX);
    }
}
