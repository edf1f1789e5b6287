//! A circuit breaker per backend: closed (calls go through), open (calls are skipped until a
//! cool-down passes), half-open (one probe call decides). Pure: time is passed in.
//!
//! For L3, "skipped" means the batch goes straight to the write-ahead log instead of waiting
//! for a connection timeout; the WAL's drain task is the probe.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cool_down: Duration,
    state: BreakerState,
}

impl CircuitBreaker {
    pub fn new(failure_threshold: u32, cool_down: Duration) -> CircuitBreaker {
        CircuitBreaker {
            failure_threshold: failure_threshold.max(1),
            cool_down,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    /// May a call go through now? An open breaker lets one probe through after its cool-down.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => false,
        }
    }

    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.failure_threshold => {
                BreakerState::Closed { failures: failures + 1 }
            }
            _ => BreakerState::Open { until: now + self.cool_down },
        };
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// 0 closed, 1 open, 2 half-open: the `sync_circuit_state` gauge.
    pub fn gauge_value(&self) -> f64 {
        match self.state {
            BreakerState::Closed { .. } => 0.0,
            BreakerState::Open { .. } => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

/// A breaker shared by the tasks that call one backend, exporting its state as
/// `sync_circuit_state{backend}`.
#[derive(Debug)]
pub struct SharedBreaker {
    backend: &'static str,
    // A std Mutex: held for a state check or update, never across an await.
    inner: std::sync::Mutex<CircuitBreaker>,
}

impl SharedBreaker {
    pub fn new(backend: &'static str, failure_threshold: u32, cool_down: Duration) -> SharedBreaker {
        metrics::gauge!(crate::metrics::CIRCUIT_STATE, "backend" => backend).set(0.0);
        SharedBreaker { backend, inner: std::sync::Mutex::new(CircuitBreaker::new(failure_threshold, cool_down)) }
    }

    pub fn allows(&self) -> bool {
        self.inner.lock().map(|mut breaker| breaker.allow(Instant::now())).unwrap_or(true)
    }

    /// The current state, for health checks.
    pub fn state(&self) -> BreakerState {
        match self.inner.lock() {
            Ok(breaker) => breaker.state(),
            Err(poisoned) => poisoned.into_inner().state(),
        }
    }

    pub fn record(&self, success: bool) {
        if let Ok(mut breaker) = self.inner.lock() {
            if success {
                breaker.on_success();
            } else {
                breaker.on_failure(Instant::now());
            }
            metrics::gauge!(crate::metrics::CIRCUIT_STATE, "backend" => self.backend).set(breaker.gauge_value());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_opens_after_the_threshold_and_probes_after_the_cool_down() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(2, Duration::from_secs(1));
        breaker.on_failure(start);
        assert!(breaker.allow(start));
        breaker.on_failure(start);
        assert!(!breaker.allow(start + Duration::from_millis(999)));
        assert!(breaker.allow(start + Duration::from_secs(1)), "one probe after the cool-down");
        assert!(!breaker.allow(start + Duration::from_secs(1)), "only one probe at a time");
        breaker.on_failure(start + Duration::from_secs(1));
        assert_eq!(breaker.gauge_value(), 1.0);
        assert!(breaker.allow(start + Duration::from_secs(2)));
        breaker.on_success();
        assert_eq!(breaker.state(), BreakerState::Closed { failures: 0 });
    }
}
