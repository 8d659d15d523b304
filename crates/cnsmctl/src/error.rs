//! The one error type of cnsmctl and its exit codes: what scripts can trust.
//!
//! Every failure becomes a [`CliError`]: an `error.type` of DESIGN.md §4 (`TransitionFailure`,
//! `NotFound`, `Invalid`...), a one-line message, and the process exit code derived from the
//! type. `main` prints it as `error: <type>: <message>` on stderr.

use std::fmt;

use cnsm_core::admission::{Problem, render_problem};
use cnsm_runtime::RuntimeError;
use cnsm_store::StoreError;

/// Success.
pub const EXIT_OK: u8 = 0;
/// Invalid input: admission errors, malformed JSON, unreadable files, verification problems.
pub const EXIT_INVALID: u8 = 1;
/// Usage error (clap's own exit code).
pub const EXIT_USAGE: u8 = 2;
/// A machine, revision or instance does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// An event or request was rejected: TransitionFailure, StaleState, RaceCondition, Locked,
/// Conflict.
pub const EXIT_REJECTED: u8 = 4;
/// The store cannot be used: locked by another process, failing, corrupt or too new.
pub const EXIT_UNAVAILABLE: u8 = 5;

/// A failed command.
#[derive(Debug, Clone)]
pub struct CliError {
    /// The `error.type` (DESIGN.md §4), e.g. `TransitionFailure`.
    pub error_type: String,
    /// One line, without the type.
    pub message: String,
    /// Lines printed to stderr before the error line (admission problems).
    pub diagnostics: Vec<String>,
}

impl CliError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> CliError {
        CliError {
            error_type: error_type.into(),
            message: message.into(),
            diagnostics: Vec::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> CliError {
        CliError::new("Invalid", message)
    }

    pub fn not_found(message: impl Into<String>) -> CliError {
        CliError::new("NotFound", message)
    }

    pub fn conflict(message: impl Into<String>) -> CliError {
        CliError::new("Conflict", message)
    }

    pub fn unavailable(message: impl Into<String>) -> CliError {
        CliError::new("Unavailable", message)
    }

    /// The process exit code of this error.
    pub fn exit_code(&self) -> u8 {
        exit_code_of(&self.error_type)
    }
}

/// The exit code of an `error.type`. Unknown types (a newer server) count as invalid input.
pub fn exit_code_of(error_type: &str) -> u8 {
    match error_type {
        "NotFound" => EXIT_NOT_FOUND,
        "TransitionFailure" | "StaleState" | "RaceCondition" | "Locked" | "Conflict" => {
            EXIT_REJECTED
        }
        "Unavailable" | "Timeout" => EXIT_UNAVAILABLE,
        _ => EXIT_INVALID,
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_type, self.message)
    }
}

impl std::error::Error for CliError {}

impl From<RuntimeError> for CliError {
    fn from(e: RuntimeError) -> CliError {
        let error_type = e.error_type();
        match e {
            RuntimeError::Transition(t) => {
                // The engine's message already starts with its type; keep the rest.
                let text = t.to_string();
                let prefix = format!("{error_type}: ");
                let message = text
                    .strip_prefix(&prefix)
                    .map(str::to_owned)
                    .unwrap_or(text);
                CliError::new(error_type, message)
            }
            RuntimeError::Admission(problems) => admission_error(&problems, None),
            RuntimeError::Invalid(m)
            | RuntimeError::Conflict(m)
            | RuntimeError::Unavailable(m)
            | RuntimeError::Timeout(m) => CliError::new(error_type, m),
            other => CliError::new(error_type, other.to_string()),
        }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> CliError {
        CliError::from(RuntimeError::from(e))
    }
}

/// The error for a definition that failed admission: every problem as a diagnostic line.
pub fn admission_error(problems: &[Problem], file: Option<&str>) -> CliError {
    let n_errors = problems
        .iter()
        .filter(|p| p.severity == cnsm_core::admission::Severity::Error)
        .count();
    let what = file.unwrap_or("definition");
    let mut error = CliError::invalid(format!("{what}: {n_errors} error(s); nothing was stored"));
    error.diagnostics = problems.iter().map(|p| render_problem(p, file)).collect();
    error
}
