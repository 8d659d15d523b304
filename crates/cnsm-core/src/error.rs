//! The typed errors of the anomaly contract (DESIGN.md §4) that the core can decide.

use serde::Serialize;

/// Why an event found no transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "detail")]
#[non_exhaustive]
pub enum FailureReason {
    /// The state lists no entry for the event.
    NoTransition,
    /// Entries exist, but every guard was false or every flag denied.
    GuardsFalse,
    /// `fail` in a state that declares neither `retry` nor `onFailure`.
    ReservedEventNotHonoured,
    /// The instance has ended.
    InstanceFinal,
    /// The instance is suspended by an operator.
    Suspended,
    /// The instance waits out a retry back-off; the next attempt has not started.
    RetryBackoff,
    /// A guard or an assignment failed at run time (the message says which and why).
    GuardError(String),
    /// A chain of choice states did not settle (admission prevents this).
    ChoiceLoop,
    /// An operator control that does not apply to the instance as it is (the message says why).
    ControlRefused(String),
}

impl FailureReason {
    /// A stable short name.
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureReason::NoTransition => "NoTransition",
            FailureReason::GuardsFalse => "GuardsFalse",
            FailureReason::ReservedEventNotHonoured => "ReservedEventNotHonoured",
            FailureReason::InstanceFinal => "InstanceFinal",
            FailureReason::Suspended => "Suspended",
            FailureReason::RetryBackoff => "RetryBackoff",
            FailureReason::GuardError(_) => "GuardError",
            FailureReason::ChoiceLoop => "ChoiceLoop",
            FailureReason::ControlRefused(_) => "ControlRefused",
        }
    }
}

/// A rejected event. Values, never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(rename_all = "camelCase", tag = "type")]
#[non_exhaustive]
pub enum TransitionError {
    /// No transition for the event in this state.
    #[error("TransitionFailure: no transition for event '{event}' in state '{state}' ({message})")]
    TransitionFailure {
        state: String,
        event: String,
        reason: FailureReason,
        message: String,
    },
    /// The caller's expected version was already behind when the event arrived.
    #[error("StaleState: expected version {expected}, but the instance is at version {actual}")]
    StaleState { expected: u64, actual: u64 },
    /// The expected version matched on arrival, but another commit won while the event waited.
    #[error(
        "RaceCondition: expected version {expected} matched on arrival, but a concurrent commit moved the instance to version {actual}"
    )]
    RaceCondition { expected: u64, actual: u64 },
    /// The instance is locked by a migration's `pre` phase until `until_ms` (a lease): retry
    /// later; nothing was applied.
    #[error(
        "Locked: the instance is locked by migration '{migration}' (lease until {until_ms} ms since the epoch); retry after it"
    )]
    Locked { migration: String, until_ms: u64 },
}

impl TransitionError {
    /// The `error.type` of the error.
    pub fn error_type(&self) -> &'static str {
        match self {
            TransitionError::TransitionFailure { .. } => "TransitionFailure",
            TransitionError::StaleState { .. } => "StaleState",
            TransitionError::RaceCondition { .. } => "RaceCondition",
            TransitionError::Locked { .. } => "Locked",
        }
    }

    pub(crate) fn failure(state: &str, event: &str, reason: FailureReason) -> TransitionError {
        let message = match &reason {
            FailureReason::NoTransition => {
                format!("state '{state}' has no transition on '{event}'")
            }
            FailureReason::GuardsFalse => {
                format!("every guard or flag for '{event}' in state '{state}' said no")
            }
            FailureReason::ReservedEventNotHonoured => format!(
                "'{event}' is honoured only in a state that declares retry or onFailure, or while compensating"
            ),
            FailureReason::InstanceFinal => "the instance has already ended".to_owned(),
            FailureReason::Suspended => {
                "the instance is suspended by an operator; resume it first".to_owned()
            }
            FailureReason::RetryBackoff => {
                "the instance is waiting out a retry back-off; the next attempt has not started"
                    .to_owned()
            }
            FailureReason::GuardError(detail) => format!("expression failed: {detail}"),
            FailureReason::ChoiceLoop => "choice states did not settle".to_owned(),
            FailureReason::ControlRefused(detail) => format!("'{event}' refused: {detail}"),
        };
        TransitionError::TransitionFailure {
            state: state.to_owned(),
            event: event.to_owned(),
            reason,
            message,
        }
    }
}
