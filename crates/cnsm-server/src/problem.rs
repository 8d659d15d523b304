//! Errors as RFC 9457 `application/problem+json` responses: one stable `type` URI and one HTTP
//! status per kind of error (DESIGN.md §4), and no internals in any message.
//!
//! A handler returns an [`ApiError`]. Its response carries the problem as an extension and an
//! empty body; the outermost middleware (`finish_problems` in `lib.rs`) adds the request path as
//! the `instance` member, writes the body, and records the error for `/debug/statemachine`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cnsm_core::TransitionError;
use cnsm_runtime::RuntimeError;
use serde_json::{Map, Value, json};

use crate::wire::{PROBLEM_TYPE_BASE, ProblemItem};

/// Every kind of error the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// No transition for the event in the instance's state (422).
    TransitionFailure,
    /// The `If-Match` version was already behind when the event arrived (412).
    StaleState,
    /// The `If-Match` version matched on arrival but a concurrent commit won (409).
    RaceCondition,
    /// The instance is being migrated (423).
    Locked,
    /// A machine, revision, instance or route that does not exist (404).
    NotFound,
    /// A malformed request or a definition that fails admission (400).
    Invalid,
    /// The resource exists, an idempotency key was reused with another request, or a machine
    /// is still in use (409).
    Conflict,
    /// The store failed, the queue is full or the server is stopping (503, with `Retry-After`).
    Unavailable,
    /// The request did not complete within the server's request timeout (503, with
    /// `Retry-After`; `errorType` `Timeout`). An event refused this way before it was applied
    /// says so; otherwise its outcome is unknown.
    Timeout,
    /// The body is larger than the limit (413).
    PayloadTooLarge,
    /// No valid bearer token on a server with `--auth-file` (401, with `WWW-Authenticate`).
    Unauthorized,
    /// A known token without the role the route needs in its namespace (403).
    Forbidden,
    /// The route exists but not for this method (405).
    MethodNotAllowed,
    /// A body in a media type the route does not take (415).
    UnsupportedMediaType,
}

impl ProblemKind {
    /// Every kind, for documentation and tests.
    pub const ALL: [ProblemKind; 14] = [
        ProblemKind::TransitionFailure,
        ProblemKind::StaleState,
        ProblemKind::RaceCondition,
        ProblemKind::Locked,
        ProblemKind::NotFound,
        ProblemKind::Invalid,
        ProblemKind::Conflict,
        ProblemKind::Unavailable,
        ProblemKind::Timeout,
        ProblemKind::PayloadTooLarge,
        ProblemKind::Unauthorized,
        ProblemKind::Forbidden,
        ProblemKind::MethodNotAllowed,
        ProblemKind::UnsupportedMediaType,
    ];

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::TransitionFailure => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::StaleState => StatusCode::PRECONDITION_FAILED,
            ProblemKind::RaceCondition | ProblemKind::Conflict => StatusCode::CONFLICT,
            ProblemKind::Locked => StatusCode::LOCKED,
            ProblemKind::NotFound => StatusCode::NOT_FOUND,
            ProblemKind::Invalid => StatusCode::BAD_REQUEST,
            ProblemKind::Unavailable | ProblemKind::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ProblemKind::Forbidden => StatusCode::FORBIDDEN,
            ProblemKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProblemKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    /// The last segment of the `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::TransitionFailure => "transition-failure",
            ProblemKind::StaleState => "stale-state",
            ProblemKind::RaceCondition => "race-condition",
            ProblemKind::Locked => "locked",
            ProblemKind::NotFound => "not-found",
            ProblemKind::Invalid => "invalid",
            ProblemKind::Conflict => "conflict",
            ProblemKind::Unavailable => "unavailable",
            ProblemKind::Timeout => "timeout",
            ProblemKind::PayloadTooLarge => "payload-too-large",
            ProblemKind::Unauthorized => "unauthorized",
            ProblemKind::Forbidden => "forbidden",
            ProblemKind::MethodNotAllowed => "method-not-allowed",
            ProblemKind::UnsupportedMediaType => "unsupported-media-type",
        }
    }

    /// The `type` URI, e.g. `https://statemachine.cn/problems/stale-state`.
    pub fn type_uri(self) -> String {
        format!("{PROBLEM_TYPE_BASE}{}", self.slug())
    }

    /// The short, fixed human summary (`title`).
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::TransitionFailure => "No transition for the event",
            ProblemKind::StaleState => "Expected version is stale",
            ProblemKind::RaceCondition => "Lost a race with a concurrent commit",
            ProblemKind::Locked => "Instance is locked",
            ProblemKind::NotFound => "Not found",
            ProblemKind::Invalid => "Invalid request",
            ProblemKind::Conflict => "Conflict",
            ProblemKind::Unavailable => "Service unavailable",
            ProblemKind::Timeout => "Request timed out",
            ProblemKind::PayloadTooLarge => "Request body too large",
            ProblemKind::Unauthorized => "Unauthorized",
            ProblemKind::Forbidden => "Forbidden",
            ProblemKind::MethodNotAllowed => "Method not allowed",
            ProblemKind::UnsupportedMediaType => "Unsupported media type",
        }
    }

    /// The `error.type` of DESIGN.md §4 (the `errorType` member).
    pub fn error_type(self) -> &'static str {
        match self {
            ProblemKind::TransitionFailure => "TransitionFailure",
            ProblemKind::StaleState => "StaleState",
            ProblemKind::RaceCondition => "RaceCondition",
            ProblemKind::Locked => "Locked",
            ProblemKind::NotFound => "NotFound",
            ProblemKind::Invalid
            | ProblemKind::PayloadTooLarge
            | ProblemKind::MethodNotAllowed
            | ProblemKind::UnsupportedMediaType => "Invalid",
            ProblemKind::Conflict => "Conflict",
            ProblemKind::Unavailable => "Unavailable",
            ProblemKind::Timeout => "Timeout",
            ProblemKind::Unauthorized => "Unauthorized",
            ProblemKind::Forbidden => "Forbidden",
        }
    }

    fn from_error_type(error_type: &str) -> ProblemKind {
        match error_type {
            "TransitionFailure" => ProblemKind::TransitionFailure,
            "StaleState" => ProblemKind::StaleState,
            "RaceCondition" => ProblemKind::RaceCondition,
            "Locked" => ProblemKind::Locked,
            "NotFound" => ProblemKind::NotFound,
            "Invalid" => ProblemKind::Invalid,
            "Conflict" => ProblemKind::Conflict,
            "Unauthorized" => ProblemKind::Unauthorized,
            "Forbidden" => ProblemKind::Forbidden,
            "Timeout" => ProblemKind::Timeout,
            _ => ProblemKind::Unavailable,
        }
    }
}

/// An error answer: a kind, a detail for people, and extension members.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Decides the status, the `type` URI and the `errorType`.
    pub kind: ProblemKind,
    /// For people: what went wrong with this request.
    pub detail: String,
    /// Extension members (`state`, `event`, `namespace`, `instanceId`, `problems`...).
    pub extensions: Map<String, Value>,
}

/// The message for an unavailable store or runtime; the real cause stays in the server.
const UNAVAILABLE_DETAIL: &str =
    "the store is unavailable; nothing was committed. Retry the request later";

impl ApiError {
    /// A problem of `kind` without extension members.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            detail: detail.into(),
            extensions: Map::new(),
        }
    }

    /// A 400.
    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemKind::Invalid, detail)
    }

    /// A 404.
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemKind::NotFound, detail)
    }

    /// A 503 (with `Retry-After: 1`).
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        ApiError::new(ProblemKind::Unavailable, detail)
    }

    /// Adds an extension member.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extensions.insert(key.to_owned(), value.into());
        self
    }

    /// Adds `namespace` and `instanceId` unless already present.
    pub fn at_instance(mut self, namespace: &str, id: &str) -> ApiError {
        self.extensions
            .entry("namespace")
            .or_insert_with(|| Value::from(namespace));
        self.extensions
            .entry("instanceId")
            .or_insert_with(|| Value::from(id));
        self
    }

    /// A malformed JSON body: the serde message with its line and column.
    pub fn json(what: &str, error: &serde_json::Error) -> ApiError {
        ApiError::invalid(format!("{what} is not valid: {error}"))
            .with("line", error.line())
            .with("column", error.column())
    }

    /// Maps a runtime error onto its problem, keeping messages the user can act on and hiding
    /// storage internals.
    pub fn from_runtime(error: RuntimeError) -> ApiError {
        let error_type = error.error_type();
        match error {
            RuntimeError::Transition(t) => {
                let text = t.to_string();
                let prefix = format!("{error_type}: ");
                let detail = text
                    .strip_prefix(&prefix)
                    .map(str::to_owned)
                    .unwrap_or(text);
                let problem = ApiError::new(ProblemKind::from_error_type(error_type), detail);
                match t {
                    TransitionError::TransitionFailure {
                        state,
                        event,
                        reason,
                        ..
                    } => problem
                        .with("state", state)
                        .with("event", event)
                        .with("reason", reason.as_str()),
                    TransitionError::StaleState { expected, actual }
                    | TransitionError::RaceCondition { expected, actual } => problem
                        .with("expectedVersion", expected)
                        .with("actualVersion", actual),
                    _ => problem,
                }
            }
            RuntimeError::Admission(problems) => {
                let n_errors = problems
                    .iter()
                    .filter(|p| p.severity == cnsm_core::admission::Severity::Error)
                    .count();
                let items: Vec<Value> = problems
                    .iter()
                    .map(|p| serde_json::to_value(ProblemItem::from(p)).unwrap_or(Value::Null))
                    .collect();
                ApiError::invalid(format!(
                    "definition: {n_errors} error(s); nothing was stored"
                ))
                .with("problems", items)
            }
            RuntimeError::Invalid(m) => ApiError::invalid(m),
            RuntimeError::Conflict(m) => ApiError::new(ProblemKind::Conflict, m),
            RuntimeError::Unavailable(m) => ApiError::unavailable(unavailable_detail(&m)),
            RuntimeError::Timeout(m) => ApiError::new(ProblemKind::Timeout, m),
            RuntimeError::NotFound(m) => ApiError::not_found(format!("{m} not found")),
            other => {
                let kind = ProblemKind::from_error_type(other.error_type());
                if kind == ProblemKind::Unavailable {
                    ApiError::unavailable(UNAVAILABLE_DETAIL)
                } else {
                    ApiError::new(kind, other.to_string())
                }
            }
        }
    }

    /// The problem+json body, without the `instance` member (the middleware adds it).
    pub fn body(&self) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("type".into(), json!(self.kind.type_uri()));
        body.insert("title".into(), json!(self.kind.title()));
        body.insert("status".into(), json!(self.kind.status().as_u16()));
        body.insert("detail".into(), json!(self.detail));
        body.insert("errorType".into(), json!(self.kind.error_type()));
        for (key, value) in &self.extensions {
            body.entry(key.clone()).or_insert_with(|| value.clone());
        }
        body
    }
}

/// Runtime messages that are safe and useful to pass on; anything else is replaced.
fn unavailable_detail(message: &str) -> String {
    let safe = [
        "the request queue is full",
        "the runtime has stopped",
        "the runtime stopped before answering",
        "the instance is contended by other nodes",
    ];
    if safe.iter().any(|s| message.starts_with(s)) {
        format!("{message}; nothing was committed")
    } else {
        UNAVAILABLE_DETAIL.to_owned()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(error: RuntimeError) -> ApiError {
        ApiError::from_runtime(error)
    }
}

/// The problem of a response, left for the outermost middleware to render.
#[derive(Debug, Clone)]
pub(crate) struct PendingProblem(pub ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = self.kind.status().into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::wire::CONTENT_TYPE_PROBLEM),
        );
        if matches!(self.kind, ProblemKind::Unavailable | ProblemKind::Timeout) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(PendingProblem(self));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_distinct_type_and_an_error_status() {
        let mut seen = std::collections::HashSet::new();
        for kind in ProblemKind::ALL {
            assert!(seen.insert(kind.type_uri()), "{kind:?}");
            assert!(kind.status().is_client_error() || kind.status().is_server_error());
        }
    }

    #[test]
    fn storage_internals_are_not_passed_on() {
        let e = ApiError::from_runtime(RuntimeError::Unavailable(
            "storage I/O failed: /var/lib/cnsm/store.redb: Input/output error".into(),
        ));
        assert_eq!(e.kind, ProblemKind::Unavailable);
        assert!(!e.detail.contains("/var/lib"), "{}", e.detail);
        let full = ApiError::from_runtime(RuntimeError::Unavailable(
            "the request queue is full; retry later".into(),
        ));
        assert!(full.detail.starts_with("the request queue is full"));
    }
}
