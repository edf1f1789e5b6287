//! A circuit breaker per backend: closed (calls go through), open (calls are skipped until a
//! cool-down passes), half-open (one probe call decides). Pure: time is passed in.
//!
//! For L3, "skipped" means the batch goes straight to the write-ahead log instead of waiting
//! for a connection timeout; the WAL's drain task is the probe.

use std::future::Future;
use std::time::{Duration, Instant};

/// When a breaker opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Consecutive failures that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long an open breaker skips calls before it lets one probe through.
    pub cool_down: Duration,
}

impl Default for CircuitConfig {
    fn default() -> CircuitConfig {
        CircuitConfig { failure_threshold: 3, cool_down: Duration::from_secs(2) }
    }
}

/// What a call through a breaker returns besides its own result.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CircuitError<E> {
    /// The breaker is open: the call was not made.
    #[error("the {0} circuit is open: calls are skipped until its cool-down ends")]
    Open(&'static str),
    /// The call was made and failed (and counted as a failure).
    #[error(transparent)]
    Failed(E),
}

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
    pub fn new(config: CircuitConfig) -> CircuitBreaker {
        CircuitBreaker {
            failure_threshold: config.failure_threshold.max(1),
            cool_down: config.cool_down,
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

/// The engine's breakers, one per store behind L1.
#[derive(Debug)]
pub struct BackendCircuits {
    pub l3: SharedBreaker,
    pub l2: SharedBreaker,
}

impl BackendCircuits {
    pub fn new(config: CircuitConfig) -> BackendCircuits {
        BackendCircuits { l3: SharedBreaker::new("l3", config), l2: SharedBreaker::new("l2", config) }
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
    pub fn new(backend: &'static str, config: CircuitConfig) -> SharedBreaker {
        metrics::gauge!(crate::metrics::CIRCUIT_STATE, "backend" => backend).set(0.0);
        SharedBreaker { backend, inner: std::sync::Mutex::new(CircuitBreaker::new(config)) }
    }

    /// Makes the call unless the breaker is open, and counts its outcome.
    pub async fn call<T, E>(&self, call: impl Future<Output = Result<T, E>>) -> Result<T, CircuitError<E>> {
        if !self.allows() {
            return Err(CircuitError::Open(self.backend));
        }
        let result = call.await;
        self.record(result.is_ok());
        result.map_err(CircuitError::Failed)
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
        let mut breaker =
            CircuitBreaker::new(CircuitConfig { failure_threshold: 2, cool_down: Duration::from_secs(1) });
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

    #[tokio::test]
    async fn a_call_through_an_open_breaker_is_not_made() {
        let breaker =
            SharedBreaker::new("test", CircuitConfig { failure_threshold: 1, cool_down: Duration::from_secs(60) });
        let failed: Result<(), CircuitError<&str>> = breaker.call(async { Err("down") }).await;
        assert_eq!(failed, Err(CircuitError::Failed("down")));
        let mut made = false;
        let skipped = breaker
            .call(async {
                made = true;
                Ok::<_, &str>(())
            })
            .await;
        assert_eq!(skipped, Err(CircuitError::Open("test")));
        assert!(!made, "an open breaker skips the call");
    }
}
