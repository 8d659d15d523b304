//! Errors of runtime operations: the anomaly contract of DESIGN.md §4.

use cnsm_core::TransitionError;
use cnsm_core::admission::Problem;
use cnsm_store::StoreError;

/// Why a runtime operation was refused. Every variant maps to one `error.type`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// TransitionFailure, StaleState or RaceCondition, decided by the engine or the committer.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("{0} not found")]
    NotFound(String),
    /// A definition failed admission; every problem is listed.
    #[error("invalid definition: {} problem(s)", .0.len())]
    Admission(Vec<Problem>),
    /// A request that is malformed (bad JSON shape, bad name...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The instance exists already, or an idempotency key was reused with another request.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store failed or the runtime is shutting down; nothing was committed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request's deadline passed: refused before it was applied (the message says so), or
    /// still waiting for its commit (outcome unknown).
    #[error("timeout: {0}")]
    Timeout(String),
}

impl RuntimeError {
    /// The `error.type` of the error (DESIGN.md §4).
    pub fn error_type(&self) -> &'static str {
        match self {
            RuntimeError::Transition(e) => e.error_type(),
            RuntimeError::NotFound(_) => "NotFound",
            RuntimeError::Admission(_) | RuntimeError::Invalid(_) => "Invalid",
            RuntimeError::Conflict(_) => "Conflict",
            RuntimeError::Unavailable(_) => "Unavailable",
            RuntimeError::Timeout(_) => "Timeout",
        }
    }
}

impl From<StoreError> for RuntimeError {
    fn from(e: StoreError) -> RuntimeError {
        match e {
            StoreError::Refused(msg) => RuntimeError::Conflict(msg),
            other => RuntimeError::Unavailable(other.to_string()),
        }
    }
}
