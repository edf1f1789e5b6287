//! Exponential backoff with jitter, for transient (infrastructure) errors only: permanent
//! per-item errors are dead-lettered, never retried. Pure: the jitter is passed in.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    pub first: Duration,
    pub max: Duration,
}

impl Default for RetryConfig {
    fn default() -> RetryConfig {
        RetryConfig { first: Duration::from_millis(50), max: Duration::from_secs(5) }
    }
}

impl RetryConfig {
    /// The wait before retry `attempt` (0-based): `first * 2^attempt`, capped at `max`, plus
    /// up to half of it again as jitter (`jitter` in 0.0..1.0), so retries do not align.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self.first.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(self.max);
        base + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// Counts attempts for one operation.
#[derive(Debug)]
pub struct Backoff {
    config: RetryConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Backoff {
        Backoff { config, attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.config.delay(self.attempt, rand::random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let config = RetryConfig { first: Duration::from_millis(100), max: Duration::from_secs(1) };
        let delays: Vec<u128> = (0..6).map(|attempt| config.delay(attempt, 0.0).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(config.delay(0, 1.0), Duration::from_millis(150));
    }

    proptest! {
        #[test]
        fn a_delay_never_exceeds_one_and_a_half_times_the_cap(attempt: u32, jitter in 0.0f64..1.0) {
            let config = RetryConfig::default();
            let delay = config.delay(attempt, jitter);
            prop_assert!(delay >= config.first.min(config.max));
            prop_assert!(delay <= config.max.mul_f64(1.5));
        }
    }
}
