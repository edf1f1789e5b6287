//! The engine's lifecycle, observable through a `watch` receiver.
//!
//! `Created` → `Connecting` (in `start`) → `Running`; a failed `start` goes back to
//! `Created` (it may be called again). `shutdown` → `Draining` (no new items; accepted ones
//! flush) → `Stopped`. Anything that waits for the engine (a readiness probe, a caller that
//! must not submit before `start`, a test) watches the state instead of polling.

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// Built, not started: submits and reads return `EngineError::NotStarted`.
    Created,
    /// `start` is connecting L2 and L3 and opening the write-ahead log.
    Connecting,
    /// Accepting items and serving reads.
    Running,
    /// `shutdown` began: new items are refused, accepted ones are being flushed.
    Draining,
    /// Everything accepted was settled or, past the grace, abandoned.
    Stopped,
}

impl EngineState {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Created => "created",
            EngineState::Connecting => "connecting",
            EngineState::Running => "running",
            EngineState::Draining => "draining",
            EngineState::Stopped => "stopped",
        }
    }
}

/// The sending side, kept by the engine; `send_replace` never fails, with or without
/// receivers.
#[derive(Debug)]
pub(super) struct StateCell(watch::Sender<EngineState>);

impl StateCell {
    pub(super) fn new() -> StateCell {
        StateCell(watch::Sender::new(EngineState::Created))
    }

    pub(super) fn set(&self, state: EngineState) {
        let previous = self.0.send_replace(state);
        if previous != state {
            tracing::debug!(from = previous.as_str(), to = state.as_str(), "engine state");
        }
    }

    pub(super) fn get(&self) -> EngineState {
        *self.0.borrow()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<EngineState> {
        self.0.subscribe()
    }
}
